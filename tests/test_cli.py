"""The `eplb rebalance` and `eplb demo` commands."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from eplb.cli import main
from eplb.loads import find_data_dir, read_load
from eplb.production import rebalance_experts


def test_demo_prints_the_report(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "58 layers x 256 experts -> 288 slots, 8 groups, 4 nodes, 32 GPUs" in out
    rows = {line.split("  ")[0]: line.split()[-2:] for line in out.splitlines() if "  " in line}
    before, after = (float(x) for x in rows["balancedness, mean"])
    assert 0 < before < after <= 1
    assert "placement computed in" in out


def test_rebalance_real_file_writes_maps_equal_to_production(tmp_path, capsys, real_loads):
    data = find_data_dir()
    assert data is not None
    path = data / "decode_in1000out1000.json"
    out_json, out_pt = tmp_path / "maps.json", tmp_path / "maps.pt"
    common = ["--replicas", "288", "--groups", "8", "--nodes", "4", "--gpus", "32"]
    assert main(["rebalance", str(path), *common, "--layers", "3:", "--output", str(out_json)]) == 0
    assert main(["rebalance", str(path), *common, "--layers", "3:13", "--output", str(out_pt)]) == 0
    out = capsys.readouterr().out
    assert "58 layers" in out and "10 layers" in out

    weight = torch.from_numpy(read_load(path)[3:])
    expected = rebalance_experts(weight, 288, 8, 4, 32)
    written = json.loads(out_json.read_text())
    for name, tensor in zip(("phy2log", "log2phy", "logcnt"), expected, strict=True):
        np.testing.assert_array_equal(np.array(written[name]), tensor.numpy())
    saved = torch.load(out_pt, weights_only=True)
    assert torch.equal(saved["phy2log"], expected[0][:10])


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "balance.png"
    assert main(["demo", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# Each case: the command line after `eplb rebalance` (split on spaces), and
# words the one error line must hold. LOAD and BAD become small JSON files.
_OK = "--replicas 8 --groups 1 --nodes 1 --gpus 1"
BAD_ARGUMENTS = {
    "missing-file": (f"missing.json {_OK}", "does not exist"),
    "R%P": (
        "LOAD --replicas 10 --groups 1 --nodes 1 --gpus 4",
        "num_gpus must divide num_replicas",
    ),
    "E%G": ("LOAD --replicas 8 --groups 3 --nodes 1 --gpus 1", "num_groups"),
    "layers-syntax": (f"LOAD {_OK} --layers x", "--layers"),
    "layers-empty": (f"LOAD {_OK} --layers 5:", "selects no layer"),
    "output-suffix": (f"LOAD {_OK} --output maps.txt", ".json or .pt"),
    "neg": (f"BAD {_OK}", ">= 0"),
    "plot-suffix": (f"LOAD {_OK} --plot plot.jpg", ".png"),
}


@pytest.mark.parametrize(
    ("args", "words"),
    [(line.split(), words) for line, words in BAD_ARGUMENTS.values()],
    ids=list(BAD_ARGUMENTS),
)
def test_bad_arguments_give_one_line_and_nonzero_exit(tmp_path, monkeypatch, capsys, args, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "LOAD.json").write_text(json.dumps([[1, 2, 3, 4, 5, 6, 7, 8]] * 2))
    (tmp_path / "BAD.json").write_text(json.dumps([[1, -2, 3, 4, 5, 6, 7, 8]]))
    args = [a.replace("LOAD", "LOAD.json").replace("BAD", "BAD.json") for a in args]
    assert main(["rebalance", *args]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["rebalance", "x.json", "--replicas", "8", "--groups", "1", "--nodes", "1"], "--gpus"),
        ("rebalance x.json --replicas eight --groups 1 --nodes 1 --gpus 1".split(), "int"),
        (["demo", "--bogus"], "unrecognized"),
    ],
    ids=["missing-option", "not-a-number", "unknown-option"],
)
def test_argparse_errors_exit_2_with_usage(capsys, args, words):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and words in err.strip().splitlines()[-1]


def _console_script() -> str:
    """The installed ``eplb`` entry point (pip install -e . puts it beside python)."""
    script = Path(sysconfig.get_path("scripts")) / "eplb"
    if not script.exists():
        script = Path(sys.executable).with_name("eplb")
    assert script.exists(), "the eplb console script is not installed: pip install -e ."
    return str(script)


def test_console_script_runs_and_fails_cleanly(tmp_path):
    good = subprocess.run([_console_script(), "demo"], capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert "balancedness, mean" in good.stdout and "placement computed in" in good.stdout
    counts = "--replicas 8 --groups 1 --nodes 1 --gpus 1".split()
    bad = subprocess.run(
        [_console_script(), "rebalance", str(tmp_path / "none.npy"), *counts],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and "does not exist" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_idle_layers_are_reported_not_averaged(tmp_path, capsys):
    load = np.concatenate([np.zeros((2, 16)), np.arange(48.0).reshape(3, 16)])
    np.save(tmp_path / "load.npy", load)
    args = ["rebalance", str(tmp_path / "load.npy"), "--replicas", "20"]
    assert main([*args, "--groups", "4", "--nodes", "2", "--gpus", "4"]) == 0
    out = capsys.readouterr().out
    assert "2 idle layer(s)" in out and "5 layers" in out


def test_help_does_not_import_torch():
    code = (
        "import sys; from eplb.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def _write_npy(path: Path, array: np.ndarray) -> None:
    np.save(path, array)


def _write_pt(path: Path, tensor: torch.Tensor) -> None:
    torch.save(tensor, path)


_ROW = [1, 2, 3, 4, 5, 6, 7, 8]
# Each bad load file: (file name, how to write it, words in the one error line).
BAD_FILES = {
    "empty-pt": ("load.pt", lambda p: p.write_bytes(b""), "cannot read load file"),
    "corrupt-pt": ("load.pt", lambda p: p.write_bytes(b"PK\x03\x04 not a zip"), "cannot read"),
    "empty-npy": ("load.npy", lambda p: p.write_bytes(b""), "cannot read load file"),
    "corrupt-npy": ("load.npy", lambda p: p.write_bytes(b"\x93NUMPY garbage"), "cannot read"),
    "empty-json": ("load.json", lambda p: p.write_text(""), "cannot read load file"),
    "json-bool": ("load.json", lambda p: p.write_text(json.dumps([[True, *_ROW[1:]]])), "boolean"),
    "json-string": ("load.json", lambda p: p.write_text(json.dumps([["12", *_ROW[1:]]])), "'12'"),
    "json-null": ("load.json", lambda p: p.write_text(json.dumps([[None, *_ROW[1:]]])), "null"),
    "json-ragged": ("load.json", lambda p: p.write_text(json.dumps([_ROW, _ROW[:3]])), "cannot"),
    "json-1d": ("load.json", lambda p: p.write_text(json.dumps(_ROW)), "2-D"),
    "npy-bool": ("load.npy", lambda p: _write_npy(p, np.ones((1, 8), bool)), "boolean"),
    "npy-complex": ("load.npy", lambda p: _write_npy(p, np.ones((1, 8), complex)), "complex"),
    "npy-string": ("load.npy", lambda p: _write_npy(p, np.full((1, 8), "12")), "real numbers"),
    "pt-bool": ("load.pt", lambda p: _write_pt(p, torch.ones(1, 8, dtype=torch.bool)), "boolean"),
    "pt-complex": ("load.pt", lambda p: _write_pt(p, torch.ones(1, 8).to(torch.cfloat)), "complex"),
    "pt-dict": ("load.pt", lambda p: _write_pt(p, {"w": torch.ones(1, 8)}), "expected a tensor"),
    "suffix": ("load.csv", lambda p: p.write_text("1,2"), "suffix"),
}


@pytest.mark.parametrize(("name", "write", "words"), BAD_FILES.values(), ids=list(BAD_FILES))
def test_bad_load_files_give_one_line_and_nonzero_exit(tmp_path, capsys, name, write, words):
    path = tmp_path / name
    write(path)
    assert main(["rebalance", str(path), *_OK.split()]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and name in err[0], err
    assert "Traceback" not in err[0]


@pytest.mark.parametrize(
    "array",
    [np.ones((1, 8), bool), np.ones((1, 8), complex), np.full((1, 8), "12")],
    ids=["bool", "complex", "string"],
)
def test_loader_refuses_with_the_api_exception_type(tmp_path, array):
    from eplb.reference import rebalance_experts as reference

    np.save(tmp_path / "load.npy", array)
    with pytest.raises(TypeError) as from_api:
        reference(array, 8, 1, 1, 1)
    with pytest.raises(TypeError) as from_file:
        read_load(tmp_path / "load.npy")
    assert str(from_api.value) in str(from_file.value)


def test_loader_keeps_what_the_api_accepts(tmp_path):
    # int and bfloat16 loads, and the DeepSeek statistics' JSON object, read exactly.
    np.save(tmp_path / "ints.npy", np.arange(16, dtype=np.int32).reshape(2, 8))
    torch.save(torch.full((2, 8), 1.5, dtype=torch.bfloat16), tmp_path / "bf16.pt")
    (tmp_path / "stats.json").write_text(json.dumps({"logical_count": [_ROW, [0.5] * 8]}))
    assert read_load(tmp_path / "ints.npy").tolist() == [list(range(8)), list(range(8, 16))]
    assert (read_load(tmp_path / "bf16.pt") == 1.5).all()
    assert read_load(tmp_path / "stats.json").dtype == np.float64


def test_report_says_when_the_hierarchy_caps_balance(tmp_path, capsys):
    # All load in group 0: its node is busy, the other idle, whatever the placement.
    np.save(tmp_path / "load.npy", np.array([[10.0, 10, 10, 10, 0, 0, 0, 0]]))
    args = ["rebalance", str(tmp_path / "load.npy"), "--replicas", "8", "--gpus", "4"]
    assert main([*args, "--groups", "2", "--nodes", "2"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("  ")[0]: line.split()[-1] for line in out.splitlines() if "  " in line}
    assert float(rows["balancedness, mean"]) == 0.5
    assert float(rows["balancedness, mean, global policy (no groups)"]) == 1.0
    assert "the hierarchy caps the balance" in out and "reaches 1.0000" in out
    # One node: the hierarchy constrains nothing, no comparison.
    assert main([*args, "--groups", "2", "--nodes", "1"]) == 0
    out = capsys.readouterr().out
    assert "global policy" not in out and "caps" not in out
