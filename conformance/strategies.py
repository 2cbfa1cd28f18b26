"""Hypothesis strategies for inputs of ``rebalance_experts``, valid and invalid.

``problems()`` draws only valid inputs (SPEC.md "Valid input"): a configuration
from ``configs()`` and a load from ``loads()``. The configurations cover both
policies (``G % N == 0`` and not), ``G == N``, ``P == N``, one slot per GPU,
zero redundancy (``R == E``), many replicas per expert, one layer, and, now
and then, realistic sizes (hundreds of experts, dozens of layers).

The loads are where implementations drift apart, so each layer draws one
*kind* (``LOAD_KINDS``) built to break one shortcut: integer token counts with
heavy ties (sort stability, tie-breaking), all-equal and zero rows (lowest
index among equal totals), decimals ``0.1 * k`` and groups that are
permutations of one multiset (summation order), integers near ``2**24`` and
``2**53`` (float32 arithmetic: distinct in float64, equal in float32), rare
huge spikes, loads near the float64 maximum whose sums overflow to inf,
continuous floats and float32-representable floats. The values
come from a numpy generator seeded by a drawn integer, so that layers of
hundreds of experts cost one draw; hypothesis still shrinks the
configuration, the kinds and the seed.

``invalid_problems()`` breaks exactly one rule of "Valid input" per example.

Settings profiles (registered on import of this module, see
``register_profiles``):

- ``ci``: derandomized (same examples on every run), no example database,
  100 examples per test: what CI runs.
- ``thorough``: random, 2000 examples per test, for a long run before a
  release or after changing an implementation.

Select one with ``HYPOTHESIS_PROFILE=thorough pytest tests/test_conformance.py``
(``tests/conftest.py`` loads ``$HYPOTHESIS_PROFILE``, default ``ci``), or
``pytest --hypothesis-profile=thorough``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from eplb._validation import EplbConfig

__all__ = [
    "INVALID_RULES",
    "LOAD_KINDS",
    "InvalidProblem",
    "Problem",
    "configs",
    "invalid_problems",
    "loads",
    "problems",
    "register_profiles",
]


class _Sizes(NamedTuple):
    max_layers: int
    max_experts: int
    nodes: tuple[int, ...]
    gpus_per_node: tuple[int, ...]
    redundancy: tuple[str, ...]


# Small enough that the numpy reference answers in milliseconds. The
# realistic class is drawn about one time in ten (and shrinks to small); it
# has no "many" redundancy, which no deployment uses at that size and which
# would cost the reference seconds per example.
_SMALL = _Sizes(3, 64, (1, 2, 3, 4), (1, 2, 3, 4), ("some", "none", "many"))
_LARGE = _Sizes(32, 384, (1, 2, 4, 8), (1, 2, 4, 8), ("some", "none"))


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


def register_profiles() -> None:
    """Register the ``ci`` and ``thorough`` settings profiles (idempotent)."""
    quiet_slow = [HealthCheck.too_slow, HealthCheck.data_too_large]
    # No deadline: the numpy reference's run time grows with the drawn size,
    # and a first JAX call compiles.
    settings.register_profile(
        "ci",
        derandomize=True,
        database=None,
        deadline=None,
        max_examples=100,
        print_blob=True,
        suppress_health_check=quiet_slow,
    )
    settings.register_profile(
        "thorough",
        deadline=None,
        max_examples=2000,
        print_blob=True,
        suppress_health_check=quiet_slow,
    )


register_profiles()


@st.composite
def configs(
    draw: st.DrawFn,
    *,
    max_layers: int = _SMALL.max_layers,
    max_experts: int = _SMALL.max_experts,
    nodes: tuple[int, ...] = _SMALL.nodes,
    gpus_per_node: tuple[int, ...] = _SMALL.gpus_per_node,
    redundancy: tuple[str, ...] = _SMALL.redundancy,
    hierarchical: bool | None = None,
) -> EplbConfig:
    """A valid configuration: shape of the load and the four counts.

    nodes, gpus_per_node: the values N and P/N are drawn from.
    redundancy: drawn from "some" (up to 2 spare slots per GPU), "none"
        (``R == E``) and "many" (2-4 times the slots the experts need).
    hierarchical: force the policy (True: ``G % N == 0``; False: not, which
        needs two nodes or more); None draws it.
    """
    num_nodes = draw(st.sampled_from(nodes))
    if hierarchical is False and num_nodes == 1:
        num_nodes = max(nodes)
    num_gpus = num_nodes * draw(st.sampled_from(gpus_per_node))
    if hierarchical is None:
        hierarchical = num_nodes == 1 or draw(st.booleans())
    if hierarchical:
        # G == N (one group per node: packing's one-item-per-pack case) twice as
        # often as each other ratio.
        num_groups = num_nodes * draw(st.sampled_from((1, 2, 1, 3, 4)))
    else:
        num_groups = num_nodes * draw(st.integers(0, 2)) + draw(st.integers(1, num_nodes - 1))
    widest = max(1, max_experts // num_groups)
    if widest >= 9 and hierarchical and num_groups >= 2 and draw(st.booleans()):
        # Groups of 9 or more experts: where numpy's pairwise summation starts
        # to differ from adding left to right.
        group_size = draw(st.integers(9, widest))
    else:
        group_size = draw(st.integers(1, widest))
    num_experts = num_groups * group_size

    spare = draw(st.sampled_from(redundancy))
    # R == E needs E to be a multiple of both G and P; where that is too many
    # experts, a little redundancy instead.
    step = math.lcm(num_groups, num_gpus)
    if spare == "none" and step <= max_experts:
        num_experts = step * draw(st.integers(1, max_experts // step))
        num_replicas = num_experts
    else:
        min_per_gpu = -(-num_experts // num_gpus)
        if spare != "many":
            per_gpu = min_per_gpu + draw(st.integers(0, 2))
        else:
            # Many replicas per expert: a few hot experts take most slots.
            per_gpu = min_per_gpu * draw(st.integers(2, 4)) + draw(st.integers(0, 3))
        num_replicas = num_gpus * per_gpu
    num_layers = draw(st.integers(1, max_layers))
    return EplbConfig(num_layers, num_experts, num_replicas, num_groups, num_nodes, num_gpus)


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
}
#: The load kinds ``loads()`` draws from, simplest first (hypothesis shrinks toward it).
LOAD_KINDS: tuple[str, ...] = tuple(_KINDS)


@st.composite
def loads(
    draw: st.DrawFn,
    num_layers: int,
    num_experts: int,
    group_size: int = 1,
    kinds: tuple[str, ...] = LOAD_KINDS,
) -> tuple[np.ndarray, tuple[str, ...]]:
    """A valid load ``[num_layers, num_experts]`` float64 and the kind of each layer.

    group_size: experts per group, for the ``permuted_groups`` kind.
    kinds: the kinds to draw from (default: all of ``LOAD_KINDS``).
    """
    # Permuted groups twice as often as the other kinds: they alone expose
    # the order of addition, and only where groups are wide and G/N > 1.
    weighted = kinds + tuple(k for k in kinds if k == "permuted_groups")
    row_kinds = tuple(
        draw(st.lists(st.sampled_from(weighted), min_size=num_layers, max_size=num_layers))
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    weight = np.stack([_KINDS[kind](rng, num_experts, group_size) for kind in row_kinds])
    return weight.astype(np.float64), row_kinds


@st.composite
def problems(
    draw: st.DrawFn,
    *,
    large: bool | None = None,
    hierarchical: bool | None = None,
    kinds: tuple[str, ...] = LOAD_KINDS,
) -> Problem:
    """A valid input: a configuration and a load for it.

    large: True draws realistic sizes (up to 64 layers, 384 experts, 8 nodes of
        8 GPUs), False small ones; None draws realistic sizes one time in ten.
    hierarchical: force the policy, or None to draw it.
    kinds: the load kinds to draw from.
    """
    if large is None:
        large = draw(st.integers(0, 9)) == 9
    sizes = _LARGE if large else _SMALL
    config = draw(configs(**sizes._asdict(), hierarchical=hierarchical))
    group_size = config.num_logical_experts // config.num_groups
    weight, row_kinds = draw(
        loads(config.num_layers, config.num_logical_experts, group_size, kinds)
    )
    return Problem(
        weight,
        config.num_replicas,
        config.num_groups,
        config.num_nodes,
        config.num_gpus,
        row_kinds,
    )


_COUNT_NAMES = ("num_replicas", "num_groups", "num_nodes", "num_gpus")

#: The rules of SPEC.md "Valid input" that ``invalid_problems`` breaks, one per
#: example; ``InvalidProblem.rule`` starts with one of them.
INVALID_RULES: tuple[str, ...] = (
    "nan",
    "inf",
    "negative",
    "not 2-D",
    "no layer",
    "no expert",
    "bool dtype",
    "non-numeric dtype",
    "count < 1",
    "count not an int",
    "num_experts % num_groups",
    "num_gpus % num_nodes",
    "num_replicas % num_gpus",
    "num_replicas < num_experts",
)


@st.composite
def invalid_problems(draw: st.DrawFn) -> InvalidProblem:
    """An input that breaks exactly one rule of SPEC.md "Valid input".

    The rules: a NaN, an infinity or a negative load (float or integer
    arrays); weight not 2-D, with no layer, or with no expert; weight of
    boolean or non-numeric dtype; a count that is zero, negative, a float or
    a bool; ``E % G != 0``; ``P % N != 0``; ``R % P != 0``; ``R < E``.
    """
    # No "overflow" loads: a float32 or int64 copy of them would break a second rule.
    base = draw(problems(large=False, kinds=tuple(k for k in LOAD_KINDS if k != "overflow")))
    weight = base.weight.copy()
    counts: list[object] = list(base.counts)
    num_layers, num_experts = weight.shape
    rule = draw(st.sampled_from(INVALID_RULES))
    error: type[Exception] = ValueError
    at = (draw(st.integers(0, num_layers - 1)), draw(st.integers(0, num_experts - 1)))
    if rule in ("nan", "inf", "negative"):
        dtype = draw(
            st.sampled_from(["float64", "float32", "int64"][: 3 if rule == "negative" else 2])
        )
        if rule == "nan":
            bad = math.nan
        elif rule == "inf":
            bad = draw(st.sampled_from([math.inf, -math.inf]))
        else:
            # Each of these stays negative in every dtype drawn (-1e-300 would
            # round to -0.0 in float32, which is a valid load).
            bad = draw(st.sampled_from([-1.0, -(2.0**53), -3.0]))
        weight = weight.astype(dtype)
        weight[at] = bad
        rule = f"{rule} ({dtype})"
    elif rule == "not 2-D":
        weight = draw(st.sampled_from([weight[0], weight[None], np.array(1.0)]))
    elif rule == "no layer":
        weight = weight[:0]
    elif rule == "no expert":
        weight = weight[:, :0]
    elif rule == "bool dtype":
        weight, error = weight > 0, TypeError
    elif rule == "non-numeric dtype":
        weight = draw(st.sampled_from([weight.astype(np.complex128), weight.astype(str)]))
        error = TypeError
    elif rule in ("count < 1", "count not an int"):
        which = draw(st.integers(0, 3))
        if rule == "count < 1":
            counts[which] = draw(st.integers(-3, 0))
        else:
            counts[which] = draw(st.sampled_from([float(base.counts[which]), True, None, "8"]))
            error = TypeError
        rule = f"{rule}: {_COUNT_NAMES[which]}"
    else:
        counts, weight = _break_divisibility(draw, rule, weight)
    replicas, groups, nodes, gpus = counts
    return InvalidProblem(weight, replicas, groups, nodes, gpus, rule, error)


def _break_divisibility(
    draw: st.DrawFn, rule: str, weight: np.ndarray
) -> tuple[list[object], np.ndarray]:
    """Counts (and a reshaped weight) that break ``rule`` and keep every other rule."""
    nodes = draw(st.integers(1, 4))
    gpus = nodes * draw(st.integers(1, 4))
    groups = draw(st.integers(1, 8))
    num_layers = weight.shape[0]
    if rule == "num_experts % num_groups":
        groups = max(groups, 2)
        experts = groups * draw(st.integers(1, 4)) + draw(st.integers(1, groups - 1))
        replicas = gpus * -(-experts // gpus)
    elif rule == "num_gpus % num_nodes":
        nodes = max(nodes, 2)
        gpus = nodes * draw(st.integers(1, 4)) + draw(st.integers(1, nodes - 1))
        experts = groups * draw(st.integers(1, 4))
        replicas = gpus * -(-experts // gpus)
    elif rule == "num_replicas % num_gpus":
        if gpus == 1:
            gpus, nodes = 2, 1
        experts = groups * draw(st.integers(1, 4))
        replicas = gpus * -(-experts // gpus) + draw(st.integers(1, gpus - 1))
    else:  # num_replicas < num_experts, with R still a multiple of P.
        replicas = gpus * draw(st.integers(1, 3))
        experts = groups * (replicas // groups + 1)
    weight = np.resize(weight, (num_layers, experts))
    return [replicas, groups, nodes, gpus], weight
