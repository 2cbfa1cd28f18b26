"""The `eplb rebalance` and `eplb demo` commands."""

from __future__ import annotations

import json
import subprocess
import sys

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


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (
            ["missing.json", "--replicas", "8", "--groups", "1", "--nodes", "1", "--gpus", "1"],
            "does not exist",
        ),
        (
            ["LOAD", "--replicas", "10", "--groups", "1", "--nodes", "1", "--gpus", "4"],
            "num_gpus must divide num_replicas",
        ),
        (["LOAD", "--replicas", "8", "--groups", "3", "--nodes", "1", "--gpus", "1"], "num_groups"),
        (
            [
                "LOAD",
                "--replicas",
                "8",
                "--groups",
                "1",
                "--nodes",
                "1",
                "--gpus",
                "1",
                "--layers",
                "x",
            ],
            "--layers",
        ),
        (
            [
                "LOAD",
                "--replicas",
                "8",
                "--groups",
                "1",
                "--nodes",
                "1",
                "--gpus",
                "1",
                "--layers",
                "5:",
            ],
            "selects no layer",
        ),
        (
            [
                "LOAD",
                "--replicas",
                "8",
                "--groups",
                "1",
                "--nodes",
                "1",
                "--gpus",
                "1",
                "--output",
                "maps.txt",
            ],
            ".json or .pt",
        ),
        (["BAD", "--replicas", "8", "--groups", "1", "--nodes", "1", "--gpus", "1"], ">= 0"),
    ],
    ids=["missing-file", "R%P", "E%G", "layers-syntax", "layers-empty", "output-suffix", "neg"],
)
def test_bad_arguments_give_one_line_and_nonzero_exit(tmp_path, monkeypatch, capsys, args, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "LOAD.json").write_text(json.dumps([[1, 2, 3, 4, 5, 6, 7, 8]] * 2))
    (tmp_path / "BAD.json").write_text(json.dumps([[1, -2, 3, 4, 5, 6, 7, 8]]))
    args = [a.replace("LOAD", "LOAD.json").replace("BAD", "BAD.json") for a in args]
    assert main(["rebalance", *args]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err


def test_console_script_runs_without_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "eplb.cli",
            "rebalance",
            str(tmp_path / "none.npy"),
            "--replicas",
            "8",
            "--groups",
            "1",
            "--nodes",
            "1",
            "--gpus",
            "1",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "does not exist" in result.stderr


def test_help_does_not_import_torch():
    code = (
        "import sys; from eplb.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
