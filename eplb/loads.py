"""Load traces: read per-expert load statistics from files, or make synthetic ones.

A load trace is ``[layers, num_logical_experts]``: tokens routed to each expert.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

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

    JSON holds a 2-D list, or an object whose ``logical_count`` is one (the format
    of the real statistics). Returns ``[layers, num_logical_experts]`` float64.
    Raises ValueError naming the file when it cannot be read as such.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise ValueError(f"load file {str(path)!r} does not exist")
    try:
        if suffix == ".json":
            with path.open() as f:
                data = json.load(f)
            if isinstance(data, dict):
                if "logical_count" not in data:
                    raise ValueError("a JSON object must have a 'logical_count' entry")
                data = data["logical_count"]
            array = np.asarray(data, dtype=np.float64)
        elif suffix == ".npy":
            array = np.asarray(np.load(path, allow_pickle=False), dtype=np.float64)
        elif suffix == ".pt":
            import torch  # only .pt files need torch

            tensor = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"expected a tensor, got {type(tensor).__name__}")
            array = tensor.detach().to(torch.float64).numpy()
        else:
            raise ValueError("the suffix must be .json, .npy or .pt")
    except ValueError as exc:
        raise ValueError(f"cannot read load file {str(path)!r}: {exc}") from None
    except (OSError, TypeError, RuntimeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read load file {str(path)!r}: {exc}") from None
    if array.ndim != 2:
        raise ValueError(
            f"load file {str(path)!r} must hold a 2-D [layers, experts] array, "
            f"got shape {array.shape}"
        )
    return array


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
