"""Load traces: read per-expert load statistics from files, or make synthetic ones.

A load trace is ``[layers, num_logical_experts]``: tokens routed to each expert.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from eplb._validation import check_real_dtype

__all__ = [
    "DATA_ENV_VAR",
    "find_data_dir",
    "read_load",
    "real_loads",
    "synthetic_load",
]

#: Environment variable naming the folder of real load statistics.
DATA_ENV_VAR = "EPLB_DATA_DIR"
_DATA_SUBDIR = Path("data") / "deepseek-r1-expert-load"


def find_data_dir() -> Path | None:
    """The folder of real DeepSeek-R1 load statistics, or None if it is not found.

    Looked for in ``$EPLB_DATA_DIR``, then ``../shared/data/deepseek-r1-expert-load``
    beside the source checkout, then beside the current directory.
    """
    candidates = []
    if os.environ.get(DATA_ENV_VAR):
        candidates.append(Path(os.environ[DATA_ENV_VAR]))
    repo_root = Path(__file__).resolve().parents[1]
    candidates.append(repo_root.parent / "shared" / _DATA_SUBDIR)
    candidates.append(Path.cwd().parent / "shared" / _DATA_SUBDIR)
    candidates.append(Path.cwd() / "shared" / _DATA_SUBDIR)
    for path in candidates:
        if path.is_dir() and any(path.glob("*.json")):
            return path
    return None


def read_load(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a load trace from ``.json``, ``.npy`` or ``.pt``.

    JSON holds a 2-D list of numbers, or an object whose ``logical_count`` is
    one (the format of the real statistics). Returns ``[layers,
    num_logical_experts]`` float64.

    Refuses, before anything is computed, what ``rebalance_experts`` refuses
    for its dtype and shape, plus what only a file can get wrong: TypeError
    for booleans, complex numbers, strings (``"12"`` included) or nulls
    (JSON values or array dtypes); ValueError for a missing, empty or corrupt
    file, a suffix other than those three, or a shape other than 2-D. Every
    message names the file. Values (finite, ``>= 0``) are left to the API.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _READERS:
        raise ValueError(f"load file {str(path)!r}: the suffix must be .json, .npy or .pt")
    if not path.is_file():
        raise ValueError(f"load file {str(path)!r} does not exist")
    try:
        array = _READERS[suffix](path)
    except TypeError as exc:
        raise TypeError(f"load file {str(path)!r}: {exc}") from None
    except _UnreadableFile as exc:
        raise ValueError(f"cannot read load file {str(path)!r}: {exc}") from None
    if array.ndim != 2:
        raise ValueError(
            f"load file {str(path)!r} must hold a 2-D [layers, experts] array, "
            f"got shape {array.shape}"
        )
    return array.astype(np.float64)


class _UnreadableFile(Exception):
    """The file's bytes do not parse as its format."""


def _read_json(path: Path) -> np.ndarray:
    try:
        with path.open() as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _UnreadableFile(exc) from None
    if isinstance(data, dict):
        if "logical_count" not in data:
            raise _UnreadableFile("a JSON object must have a 'logical_count' entry")
        data = data["logical_count"]
    _check_json_numbers(data, "")
    try:
        return np.array(data, dtype=np.float64)
    except (ValueError, OverflowError) as exc:  # ragged rows, ints past float64
        raise _UnreadableFile(exc) from None


def _check_json_numbers(data: object, where: str) -> None:
    """TypeError naming the first entry that is not a JSON number (bool, string, null, ...)."""
    if isinstance(data, list):
        for i, item in enumerate(data):
            _check_json_numbers(item, f"{where}[{i}]")
    elif isinstance(data, bool) or not isinstance(data, int | float):
        # json gives bool for true/false, str for "12": the API refuses both.
        kind = {bool: "boolean", str: "string", type(None): "null"}.get(type(data), "non-number")
        raise TypeError(f"weight must hold real numbers, got the JSON {kind} {data!r} at {where}")


def _read_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as exc:
        # A truncated or foreign file fails deep in numpy's parser with any of
        # ValueError, EOFError, OSError or worse; each is one unreadable file.
        raise _UnreadableFile(f"{type(exc).__name__}: {exc}") from None
    if not isinstance(array, np.ndarray):  # an .npz archive under an .npy name
        raise _UnreadableFile(f"expected one array, got {type(array).__name__}")
    check_real_dtype(array.dtype)
    return array


def _read_pt(path: Path) -> np.ndarray:
    import torch  # only .pt files need torch

    try:
        tensor = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # Corrupt or empty files raise EOFError, RuntimeError, UnpicklingError...
        raise _UnreadableFile(f"{type(exc).__name__}: {exc}") from None
    if not isinstance(tensor, torch.Tensor):
        raise _UnreadableFile(f"expected a tensor, got {type(tensor).__name__}")
    tensor = tensor.detach()
    if tensor.dtype == torch.bool:
        raise TypeError("weight must hold real numbers, got boolean dtype")
    if tensor.is_complex():
        raise TypeError(f"weight must hold real numbers, got dtype {tensor.dtype}")
    if tensor.is_floating_point() and tensor.dtype not in (torch.float32, torch.float64):
        tensor = tensor.to(torch.float32)  # bfloat16, float16, float8: exact in float32
    return tensor.numpy()


_READERS = {".json": _read_json, ".npy": _read_npy, ".pt": _read_pt}


def real_loads(moe_layers_only: bool = True) -> dict[str, np.ndarray]:
    """The real DeepSeek-R1 statistics by workload name (file stem).

    Each value: [58, 256] float64 (layers 3..60; the dense layers 0-2 are all
    zero and dropped unless ``moe_layers_only`` is False). Empty if the data
    folder is not found.
    """
    data_dir = find_data_dir()
    if data_dir is None:
        return {}
    loads = {}
    for file in sorted(data_dir.glob("*.json")):
        array = read_load(file)
        loads[file.stem] = array[3:] if moe_layers_only else array
    return loads


def synthetic_load(
    num_layers: int, num_experts: int, *, seed: int = 0, skew: float = 1.2, tokens: int = 8192
) -> np.ndarray:
    """A deterministic skewed integer load: ``[num_layers, num_experts]`` float64.

    Each layer routes ``tokens`` tokens over a Zipf-like popularity (exponent
    ``skew``) shuffled per layer, so every layer has different hot experts; the
    counts are integers, with ties, as real token counts are.
    """
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, num_experts + 1) ** skew
    load = np.empty((num_layers, num_experts), dtype=np.float64)
    for layer in range(num_layers):
        probs = rng.permutation(popularity)
        load[layer] = rng.multinomial(tokens, probs / probs.sum())
    return load
