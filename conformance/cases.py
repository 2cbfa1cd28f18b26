"""Test cases without hypothesis: the problem types, the load kinds, SPEC.md's example.

Everything here needs numpy only, so that the device check
(``python -m eplb.conformance.device_check``) runs where hypothesis is not
installed. ``strategies`` draws from the same load kinds.

The load kinds are where implementations drift apart; each is built to
break one shortcut: integer token counts with heavy ties (sort stability,
tie-breaking), all-equal and zero rows (lowest index among equal totals),
decimals ``0.1 * k`` and groups that are permutations of one multiset
(summation order), integers near ``2**24`` and ``2**53`` (float32
arithmetic: distinct in float64, equal in float32), rare huge spikes, loads
near the float64 maximum whose sums overflow to inf, continuous floats,
float32-representable floats, and subnormal loads (which XLA flushes to zero).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from eplb._validation import EplbConfig

__all__ = [
    "DEFAULT_EXAMPLES",
    "LOAD_KINDS",
    "SHAPE_MENU",
    "SPEC_EXAMPLE",
    "SPEC_LOGCNT",
    "SPEC_PHY2LOG",
    "InvalidProblem",
    "Problem",
    "make_load",
]


#: Valid inputs ``check_candidate``/``check_project`` (and ``eplb conformance``)
#: draw when not told: enough to catch each single deviation of
#: tests/conformance_variants.py, derandomized.
DEFAULT_EXAMPLES = 300


@dataclass(frozen=True)
class Problem:
    """One valid input of ``rebalance_experts``.

    weight: [L, E] float64, load of each logical expert in each layer.
    kinds: the load kind of each layer (see ``LOAD_KINDS``), for reports.
    """

    weight: np.ndarray = field(repr=False)
    num_replicas: int
    num_groups: int
    num_nodes: int
    num_gpus: int
    kinds: tuple[str, ...] = ()

    @property
    def counts(self) -> tuple[int, int, int, int]:
        """``(num_replicas, num_groups, num_nodes, num_gpus)``, in call order."""
        return (self.num_replicas, self.num_groups, self.num_nodes, self.num_gpus)

    @property
    def hierarchical(self) -> bool:
        """SPEC.md policy choice: True when ``G % N == 0``."""
        return self.num_groups % self.num_nodes == 0

    def __repr__(self) -> str:
        num_layers, num_experts = self.weight.shape
        policy = "hierarchical" if self.hierarchical else "global"
        return (
            f"Problem(L={num_layers}, E={num_experts}, R={self.num_replicas}, "
            f"G={self.num_groups}, N={self.num_nodes}, P={self.num_gpus}, {policy}, "
            f"kinds={list(self.kinds)})"
        )


@dataclass(frozen=True)
class InvalidProblem:
    """An input that breaks exactly one rule of SPEC.md "Valid input".

    weight: usually a numpy array, of any shape and dtype the rule calls for.
    rule: which rule is broken, e.g. ``"nan"`` or ``"num_gpus % num_nodes"``.
    error: the exception type every implementation must raise.
    """

    weight: object = field(repr=False)
    num_replicas: object
    num_groups: object
    num_nodes: object
    num_gpus: object
    rule: str
    error: type[Exception]

    @property
    def counts(self) -> tuple[object, object, object, object]:
        """``(num_replicas, num_groups, num_nodes, num_gpus)``, in call order."""
        return (self.num_replicas, self.num_groups, self.num_nodes, self.num_gpus)

    def __repr__(self) -> str:
        shape = getattr(self.weight, "shape", None)
        dtype = getattr(self.weight, "dtype", type(self.weight).__name__)
        return (
            f"InvalidProblem(rule={self.rule!r}, weight shape={shape} dtype={dtype}, "
            f"R={self.num_replicas!r}, G={self.num_groups!r}, N={self.num_nodes!r}, "
            f"P={self.num_gpus!r}, expects {self.error.__name__})"
        )


def _small_ints(rng: np.random.Generator, n: int, group_size: int) -> np.ndarray:
    return rng.integers(0, 4, n).astype(np.float64)


def _token_counts(rng: np.random.Generator, n: int, group_size: int) -> np.ndarray:
    # Skewed integer counts over a drawn magnitude: few ties at 10**6, many at 10.
    scale = 10.0 ** rng.integers(1, 7)
    return np.floor(scale * rng.random(n) ** 3)


def _equal(rng: np.random.Generator, n: int, group_size: int) -> np.ndarray:
    value = rng.choice([0.0, 1.0, 7.0, 0.1, 3e5, 2.0**53])
    return np.full(n, value)


def _sparse(rng: np.random.Generator, n: int, group_size: int) -> np.ndarray:
    # -0.0 is a valid load (it is >= 0) and must tie with 0.0.
    row = rng.choice([0.0, -0.0], n)
    hot = rng.random(n) < 0.2
    row[hot] = rng.integers(1, 4, int(hot.sum()))
    return row


def _spikes(rng: np.random.Generator, n: int, group_size: int) -> np.ndarray:
    row = rng.integers(0, 100, n).astype(np.float64)
    where = rng.integers(0, n, rng.integers(1, 3))
    row[where] = rng.choice([1e12, 2.0**52, 1e18])
    return row


def _decimals(rng: np.random.Generator, n: int, group_size: int) -> np.ndarray:
    # 0.1 * k is inexact; sums of such values depend on the order of addition.
    return 0.1 * rng.integers(0, 30, n)


def _permuted_groups(rng: np.random.Generator, n: int, group_size: int) -> np.ndarray:
    # Every group holds the same values in another order: the group loads are
    # equal in exact arithmetic and differ only by rounding, so the group
    # ranking is decided by the order of addition alone. The values: decimals
    # (last-bit rounding), or one 2**53 among small integers, which absorbs
    # each 1 added after it but not those added before.
    if rng.random() < 0.5:
        base = 0.1 * rng.integers(1, 10, group_size)
    else:
        base = rng.integers(1, 3, group_size).astype(np.float64)
        base[0] = 2.0**53
    return np.concatenate([rng.permutation(base) for _ in range(n // group_size)])


def _near_float_limits(rng: np.random.Generator, n: int, group_size: int) -> np.ndarray:
    # Integers just below 2**24 (float32's last exact integer) or 2**53
    # (float64's): distinct in float64, equal once rounded to float32; sums
    # near 2**53 round in float64 as well.
    top = rng.choice([2.0**24 + 8, 2.0**53])
    return top - rng.integers(0, 16, n)


def _overflow(rng: np.random.Generator, n: int, group_size: int) -> np.ndarray:
    # Finite loads whose sums overflow to inf: pack totals tie at inf, and a
    # "mask full packs with inf" shortcut then picks a full pack.
    return rng.choice([0.0, 1.0, 1e308, np.finfo(np.float64).max], n)


def _floats(rng: np.random.Generator, n: int, group_size: int) -> np.ndarray:
    return 10.0 ** rng.uniform(-3, 6, n)


def _float32(rng: np.random.Generator, n: int, group_size: int) -> np.ndarray:
    return rng.uniform(0, 1e4, n).astype(np.float32).astype(np.float64)


def _subnormal(rng: np.random.Generator, n: int, group_size: int) -> np.ndarray:
    # Below float64's normal range, where XLA computes 0 and numpy does not:
    # multiples of the smallest subnormal (ties, exact sums), zeros, and
    # normal loads near 2**-1022 whose shares per replica are subnormal.
    values = [0.0, 2.0**-1074, 3 * 2.0**-1074, 2.0**-1040, 2.0**-1022, 3 * 2.0**-1022]
    return rng.choice(values, n)


_KINDS: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "small_ints": _small_ints,
    "token_counts": _token_counts,
    "equal": _equal,
    "sparse": _sparse,
    "spikes": _spikes,
    "decimals": _decimals,
    "permuted_groups": _permuted_groups,
    "near_float_limits": _near_float_limits,
    "overflow": _overflow,
    "floats": _floats,
    "float32": _float32,
    "subnormal": _subnormal,
}
#: The load kinds, simplest first (hypothesis shrinks toward it).
LOAD_KINDS: tuple[str, ...] = tuple(_KINDS)


def make_load(
    kinds: tuple[str, ...], rng: np.random.Generator, num_experts: int, group_size: int = 1
) -> np.ndarray:
    """A load ``[len(kinds), num_experts]`` float64, layer ``l`` of kind ``kinds[l]``.

    group_size: experts per group, for the ``permuted_groups`` kind.
    """
    return np.stack([_KINDS[kind](rng, num_experts, group_size) for kind in kinds]).astype(
        np.float64
    )


#: SPEC.md's worked example (two layers, 12 experts, R=16, G=4, N=2, P=8).
SPEC_EXAMPLE = Problem(
    np.array(
        [
            [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
            [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
        ],
        dtype=np.float64,
    ),
    16,
    4,
    2,
    8,
    ("spec",),
)
#: SPEC.md's expected phy2log [2, 16] and logcnt [2, 12] for ``SPEC_EXAMPLE``.
SPEC_PHY2LOG = np.array(
    [
        [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
        [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
    ]
)
SPEC_LOGCNT = np.array(
    [
        [1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1],
        [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1],
    ]
)

#: A fixed menu of configurations, one per case of SPEC.md's hierarchy: what
#: the JAX reference is checked on (it compiles once per shape and counts,
#: seconds each, while torch gets every drawn shape), and what the
#: hypothesis-free device check fills with every load kind.
SHAPE_MENU: tuple[EplbConfig, ...] = (
    EplbConfig(2, 12, 16, 4, 2, 8),  # SPEC.md's worked example: hierarchical, G/N = 2
    EplbConfig(3, 8, 8, 4, 4, 8),  # G == N, R == E, one slot per GPU
    EplbConfig(1, 18, 72, 3, 2, 2),  # global (G % N != 0), one layer, P == N, R = 4E
    EplbConfig(2, 40, 48, 4, 2, 8),  # groups of 10: the order of addition shows
)
