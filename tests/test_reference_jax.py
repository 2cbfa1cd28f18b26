"""The JAX reference against SPEC.md and the numpy reference: same integers, same refusals.

JAX compiles once per (shape, counts), so every agreement case stacks its
kinds of load as the layers of one matrix: one compile per configuration.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eplb.reference as numpy_ref
import eplb.reference.jax as jax_ref

# SPEC.md's worked example, as the conformance suite ships it.
from eplb.conformance.cases import SPEC_EXAMPLE, SPEC_LOGCNT, SPEC_PHY2LOG

SPEC_WEIGHT = SPEC_EXAMPLE.weight

# (E, R, G, N, P): each one a shape class of SPEC.md's hierarchy.
CONFIGS = {
    "hierarchical": (16, 24, 4, 2, 8),
    "global": (16, 24, 4, 3, 6),  # G % N != 0
    "R==E, one slot per GPU": (8, 8, 4, 2, 8),
    "G==N": (12, 16, 4, 4, 8),
    "P==N": (16, 20, 4, 2, 2),
    "one GPU": (8, 11, 2, 1, 1),
    "one expert per group": (8, 12, 8, 2, 4),
    "larger": (64, 80, 8, 4, 16),
}


def _mixed_loads(num_experts: int, seed: int) -> np.ndarray:
    """[10, E] float64: one layer per kind of load that has tripped float code before."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 4, num_experts)
    rows = [
        small,  # many ties
        rng.integers(0, 2, num_experts),  # even more ties
        rng.random(num_experts),  # continuous
        rng.integers(0, 30, num_experts) * 0.1,  # decimals: summation order matters
        np.zeros(num_experts),
        np.full(num_experts, 7.0),
        2.0**53 - 16 + 2 * small,  # near 2**53: group sums round
        rng.random(num_experts).astype(np.float32),  # float32-valued
        np.where(small == 0, -0.0, small),  # -0.0 must tie with 0.0
        np.eye(1, num_experts, rng.integers(num_experts))[0] * 1e6,  # one hot expert
    ]
    return np.stack(rows).astype(np.float64)


def _as_jax(weight: np.ndarray) -> jax.Array:
    """weight as a jax.Array without loss: with x64 off, jnp.asarray would round to float32."""
    with jax.enable_x64(True):
        return jnp.asarray(weight)


def _assert_same(jax_out: tuple[jax.Array, ...], numpy_out: tuple[np.ndarray, ...]) -> None:
    for got, want in zip(jax_out, numpy_out, strict=True):
        assert isinstance(got, jax.Array)
        assert got.dtype == jnp.int64
        np.testing.assert_array_equal(np.asarray(got), want)


def test_spec_worked_example():
    phy2log, log2phy, logcnt = jax_ref.rebalance_experts(_as_jax(SPEC_WEIGHT), 16, 4, 2, 8)
    np.testing.assert_array_equal(np.asarray(phy2log), SPEC_PHY2LOG)
    np.testing.assert_array_equal(np.asarray(logcnt), SPEC_LOGCNT)
    _assert_same((phy2log, log2phy, logcnt), numpy_ref.rebalance_experts(SPEC_WEIGHT, 16, 4, 2, 8))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_agrees_with_numpy(name):
    num_experts, *counts = CONFIGS[name]
    weight = _mixed_loads(num_experts, seed=len(name))
    _assert_same(
        jax_ref.rebalance_experts(_as_jax(weight), *counts),
        numpy_ref.rebalance_experts(weight, *counts),
    )


def test_numpy_input_and_batch_share_the_compiled_program():
    """A numpy load and a batch of the same rows give what one matrix does."""
    num_experts, *counts = CONFIGS["hierarchical"]
    weight = _mixed_loads(num_experts, seed=11)
    want = numpy_ref.rebalance_experts(weight, *counts)
    _assert_same(jax_ref.rebalance_experts(weight, *counts), want)

    batch = weight.reshape(2, 5, num_experts)
    phy2log, log2phy, logcnt = jax_ref.rebalance_experts_batched(_as_jax(batch), *counts)
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == jnp.int64
    np.testing.assert_array_equal(np.asarray(phy2log), want[0].reshape(2, 5, -1))
    np.testing.assert_array_equal(np.asarray(log2phy), want[1].reshape(2, 5, num_experts, -1))
    np.testing.assert_array_equal(np.asarray(logcnt), want[2].reshape(2, 5, -1))


def test_steps_agree_with_numpy():
    rng = np.random.default_rng(3)
    weight = rng.integers(0, 3, (6, 12)).astype(np.float64)
    _assert_same(
        jax_ref.balanced_packing(_as_jax(weight), 3), numpy_ref.balanced_packing(weight, 3)
    )
    _assert_same(
        jax_ref.balanced_packing(_as_jax(weight), 12), numpy_ref.balanced_packing(weight, 12)
    )
    _assert_same(
        jax_ref.replicate_experts(_as_jax(weight), 20), numpy_ref.replicate_experts(weight, 20)
    )


def test_hierarchy_traces_inside_jit_and_vmap_with_x64_on():
    batch = np.random.default_rng(4).integers(0, 3, (2, 6, 12)).astype(np.float64)

    def place(weight: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        return jax_ref.rebalance_experts_hierarchical(weight, 24, 4, 2, 8)

    with jax.enable_x64(False), pytest.raises(TypeError, match="enable_x64"):
        jax.jit(place)(jnp.asarray(batch[0]))
    with jax.enable_x64(True):
        got = jax.jit(jax.vmap(place))(jnp.asarray(batch))
    for index, weight in enumerate(batch):
        _assert_same(
            tuple(out[index] for out in got),
            numpy_ref.rebalance_experts_hierarchical(weight, 24, 4, 2, 8),
        )


@pytest.mark.parametrize("caller_x64", [False, True])
def test_float64_whatever_the_caller_setting(caller_x64):
    """Also the one-layer case (a shape of its own: one compile for both settings)."""
    # 2**24 + 1 is not a float32: in float32 the two experts tie and the spare
    # slot would go to expert 0; in float64 it goes to expert 1.
    weight = np.array([[2**24, 2**24 + 1]])
    assert not np.array_equal(
        numpy_ref.rebalance_experts(weight.astype(np.float32), 3, 1, 1, 1)[2],
        numpy_ref.rebalance_experts(weight, 3, 1, 1, 1)[2],
    )
    with jax.enable_x64(caller_x64):
        # Created in the caller's mode: int32 or int64, both exact here.
        got = jax_ref.rebalance_experts(jnp.asarray(weight), 3, 1, 1, 1)
        # Documented: the caller's setting is left as it was.
        assert jax.enable_x64.value is caller_x64
    _assert_same(got, numpy_ref.rebalance_experts(weight, 3, 1, 1, 1))


BAD_INPUTS = {
    "NaN": (np.array([[1.0, np.nan]]), (2, 1, 1, 1)),
    "negative": (np.array([[1.0, -2.0]]), (2, 1, 1, 1)),
    "1-D": (np.array([1.0, 2.0]), (2, 1, 1, 1)),
    "bool dtype": (np.array([[True, False]]), (2, 1, 1, 1)),
    "R % P != 0": (np.array([[1.0, 2.0]]), (3, 1, 1, 2)),
    "bool count": (np.array([[1.0, 2.0]]), (2, 1, 1, True)),
    "string": ("weights", (2, 1, 1, 1)),
    "None": (None, (2, 1, 1, 1)),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_refuses_what_numpy_refuses(name):
    weight, counts = BAD_INPUTS[name]
    with pytest.raises((ValueError, TypeError)) as numpy_error:
        numpy_ref.rebalance_experts(weight, *counts)
    as_jax = _as_jax(weight) if isinstance(weight, np.ndarray) else weight
    with pytest.raises(numpy_error.type):
        jax_ref.rebalance_experts(as_jax, *counts)


def test_batched_refuses_a_matrix():
    with pytest.raises(ValueError, match="3-D"):
        jax_ref.rebalance_experts_batched(jnp.ones((2, 4)), 4, 1, 1, 1)


def _flushed(weight: np.ndarray) -> np.ndarray:
    """What XLA computes with: subnormal loads as zero."""
    return np.where(np.abs(weight) < np.finfo(np.float64).tiny, 0.0, weight)


@pytest.mark.parametrize("name", ["hierarchical", "global"])
def test_subnormal_loads_agree_with_numpy(name):
    num_experts, *counts = CONFIGS[name]
    rng = np.random.default_rng(7)
    tiny, smallest = np.finfo(np.float64).tiny, 2.0**-1074
    weight = np.stack(
        [
            rng.integers(0, 5, num_experts) * smallest,  # subnormal only, ties
            rng.choice([0.0, smallest, 2.0**-1030], num_experts),  # subnormals and zeros
            rng.choice([tiny, 3 * tiny], num_experts),  # normal; shares per replica are not
            rng.choice([smallest, 1.0, 1e6], num_experts),  # subnormals beside large loads
        ]
    )
    expected = numpy_ref.rebalance_experts(weight, *counts)
    got = jax_ref.rebalance_experts(weight, *counts)
    for want, have in zip(expected, got, strict=True):
        np.testing.assert_array_equal(np.asarray(have), want)
    # The check can fail: flushing the subnormals (XLA's arithmetic) changes the placement.
    flushed = numpy_ref.rebalance_experts(_flushed(weight), *counts)[0]
    assert not np.array_equal(flushed[:2], expected[0][:2])
