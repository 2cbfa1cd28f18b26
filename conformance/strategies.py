"""Hypothesis strategies for inputs of ``rebalance_experts``, valid and invalid.

``problems()`` draws only valid inputs (SPEC.md "Valid input"): a configuration
from ``configs()`` and a load from ``loads()``. The configurations cover both
policies (``G % N == 0`` and not), ``G == N``, ``P == N``, one slot per GPU,
zero redundancy (``R == E``), many replicas per expert, one layer, and, now
and then, realistic sizes (hundreds of experts, dozens of layers).

Each layer of a load draws one *kind* (``LOAD_KINDS``, described in
``eplb.conformance.cases``), each built to break one shortcut (sort
stability, tie-breaking, summation order, float32 arithmetic, overflow,
subnormal numbers).
The values come from a numpy generator seeded by a drawn integer, so that
layers of hundreds of experts cost one draw; hypothesis still shrinks the
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
from typing import NamedTuple

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from eplb._validation import EplbConfig

from .cases import LOAD_KINDS, InvalidProblem, Problem, make_load

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
    return make_load(row_kinds, rng, num_experts, group_size), row_kinds


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
