"""Input rules shared by every implementation (SPEC.md "Inputs").

Each rule raises before anything is computed, naming the argument, the rule
and the value it got, so that all implementations refuse the same inputs with
the same exception type.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np

__all__ = [
    "EplbConfig",
    "check_count",
    "check_real_dtype",
    "validate_config",
    "validate_placement",
    "validate_tolerance",
    "validate_weight",
]


class EplbConfig(NamedTuple):
    """A validated configuration for one placement problem."""

    num_layers: int
    num_logical_experts: int
    num_replicas: int
    num_groups: int
    num_nodes: int
    num_gpus: int

    @property
    def hierarchical(self) -> bool:
        """True when SPEC.md's policy choice keeps the given groups and nodes."""
        return self.num_groups % self.num_nodes == 0


def check_count(name: str, value: object) -> int:
    """Return ``value`` as an int if it is a positive integer, else raise.

    Booleans are refused although Python counts them as integers: ``True``
    replicas is a bug in the caller, not a request for one replica.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    as_int = int(value)
    if as_int < 1:
        raise ValueError(f"{name} must be >= 1, got {as_int}")
    return as_int


def check_real_dtype(dtype: np.dtype) -> None:
    """Raise TypeError unless ``dtype`` holds real numbers (integer or float, not bool)."""
    if dtype.kind == "b":
        raise TypeError("weight must hold real numbers, got boolean dtype")
    if dtype.kind not in "iuf":
        raise TypeError(f"weight must hold real numbers, got dtype {dtype}")


def validate_config(
    shape: tuple[int, ...],
    num_replicas: object,
    num_groups: object,
    num_nodes: object,
    num_gpus: object,
) -> EplbConfig:
    """Check the shape of ``weight`` and the four counts against SPEC.md.

    shape: the shape of ``weight``, which must be ``[layers, num_logical_experts]``.
    """
    if len(shape) != 2:
        raise ValueError(
            f"weight must be 2-D [layers, num_logical_experts], got {len(shape)}-D shape "
            f"{tuple(shape)}"
        )
    num_layers, num_experts = (int(d) for d in shape)
    if num_layers < 1:
        raise ValueError(f"weight must have at least one layer, got shape {tuple(shape)}")
    if num_experts < 1:
        raise ValueError(f"weight must have at least one expert, got shape {tuple(shape)}")
    replicas = check_count("num_replicas", num_replicas)
    groups = check_count("num_groups", num_groups)
    nodes = check_count("num_nodes", num_nodes)
    gpus = check_count("num_gpus", num_gpus)
    if num_experts % groups:
        raise ValueError(
            f"num_groups must divide the number of logical experts: "
            f"{num_experts} experts % num_groups={groups} != 0"
        )
    if gpus % nodes:
        raise ValueError(
            f"num_nodes must divide num_gpus: num_gpus={gpus} % num_nodes={nodes} != 0"
        )
    if replicas % gpus:
        raise ValueError(
            f"num_gpus must divide num_replicas: num_replicas={replicas} % num_gpus={gpus} != 0"
        )
    if replicas < num_experts:
        raise ValueError(
            f"num_replicas must be >= the number of logical experts: "
            f"num_replicas={replicas} < {num_experts} experts"
        )
    return EplbConfig(num_layers, num_experts, replicas, groups, nodes, gpus)


def validate_weight(
    weight: np.ndarray,
    num_replicas: object,
    num_groups: object,
    num_nodes: object,
    num_gpus: object,
) -> tuple[np.ndarray, EplbConfig]:
    """Validate a host array of loads and return it as float64 with its config.

    weight: [layers, num_logical_experts] real, tokens routed to each expert.

    Returns a C-contiguous float64 copy-or-view of ``weight`` and the config.
    """
    if not isinstance(weight, np.ndarray):
        raise TypeError(f"weight must be a numpy.ndarray, got {type(weight).__name__}")
    check_real_dtype(weight.dtype)
    kind = weight.dtype.kind
    config = validate_config(weight.shape, num_replicas, num_groups, num_nodes, num_gpus)
    as_f64 = np.ascontiguousarray(weight, dtype=np.float64)
    if kind == "f":
        if not np.isfinite(weight).all():
            bad = np.argwhere(~np.isfinite(weight))[0]
            raise ValueError(
                f"weight must be finite, got {weight[tuple(bad)]} at [layer, expert]={bad.tolist()}"
            )
        if not np.isfinite(as_f64).all():
            raise ValueError("weight must be finite as float64")
    if (as_f64 < 0).any():
        bad = np.argwhere(as_f64 < 0)[0]
        raise ValueError(
            f"weight must be >= 0, got {weight[tuple(bad)]} at [layer, expert]={bad.tolist()}"
        )
    return as_f64, config


def validate_placement(name: str, phy2log: object, config: EplbConfig) -> np.ndarray:
    """Check a placement the weights hold for ``config`` and return it as int64.

    phy2log: [layers, num_replicas] integer numpy array, the logical expert of
        each slot; every expert ``0 .. E-1`` must hold a slot in every layer.
    name: the argument's name, for the messages.
    """
    if not isinstance(phy2log, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(phy2log).__name__}")
    if phy2log.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {phy2log.dtype}")
    shape = (config.num_layers, config.num_replicas)
    if phy2log.shape != shape:
        raise ValueError(
            f"{name} must have shape [layers, num_replicas] = {list(shape)}, "
            f"got {list(phy2log.shape)}"
        )
    experts = config.num_logical_experts
    if phy2log.min() < 0 or phy2log.max() >= experts:
        bad = np.argwhere((phy2log < 0) | (phy2log >= experts))[0]
        raise ValueError(
            f"{name} must hold expert ids in 0..{experts - 1}, got {phy2log[tuple(bad)]} "
            f"at [layer, slot]={bad.tolist()}"
        )
    as_int64 = np.ascontiguousarray(phy2log, dtype=np.int64)
    held = np.zeros((config.num_layers, experts), dtype=bool)
    held[np.arange(config.num_layers)[:, None], as_int64] = True
    if not held.all():
        layer, expert = np.argwhere(~held)[0]
        raise ValueError(
            f"{name} must hold every expert in every layer: layer {layer} has no slot of "
            f"expert {expert}"
        )
    return as_int64


def validate_tolerance(tolerance: object, name: str = "tolerance") -> float:
    """``tolerance`` as a float if it is a finite real number >= 0, else raise naming ``name``."""
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real):
        raise TypeError(
            f"{name} must be a real number, got {type(tolerance).__name__} {tolerance!r}"
        )
    as_float = float(tolerance)
    if not math.isfinite(as_float) or as_float < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {as_float}")
    return as_float
