"""eplb.metrics against SPEC.md "Measures", and eplb.loads readers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from eplb.loads import read_load, synthetic_load
from eplb.metrics import (
    balancedness,
    colocated_replicas,
    contiguous_placement,
    gpu_loads,
    max_load_lower_bound,
)
from eplb.reference import rebalance_experts, replicate_experts


def test_gpu_loads_split_each_expert_over_its_replicas():
    weight = np.array([[6.0, 2.0, 4.0]])
    phy2log = np.array([[0, 1, 0, 2]])
    logcnt = np.array([[2, 1, 1]])
    np.testing.assert_array_equal(gpu_loads(weight, phy2log, logcnt, 2), [[5.0, 7.0]])
    np.testing.assert_array_equal(balancedness(np.array([[5.0, 7.0]])), [6.0 / 7.0])


def test_idle_layer_is_perfectly_balanced():
    assert balancedness(np.zeros((1, 4)))[0] == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_lower_bound_matches_greedy_replication(seed):
    # SPEC.md: m* is what replicate(load, R) over the whole layer achieves.
    rng = np.random.default_rng(seed)
    weight = rng.integers(0, 100, size=(3, 12)).astype(np.float64)
    bound = max_load_lower_bound(weight, 20, 4)
    _, _, logcnt = replicate_experts(weight, 20)
    m_star = (weight / logcnt).max(-1)
    np.testing.assert_array_equal(bound, np.maximum(weight.sum(-1) / 4, m_star))


def test_every_placement_is_at_or_above_the_lower_bound():
    weight = synthetic_load(4, 32, seed=3)
    phy2log, _, logcnt = rebalance_experts(weight, 48, 4, 2, 8)
    achieved = gpu_loads(weight, phy2log, logcnt, 8).max(-1)
    # Float sums in a different order: allow one ulp-scale slack.
    assert (achieved >= max_load_lower_bound(weight, 48, 8) * (1 - 1e-12)).all()


def test_colocated_replicas_counts_duplicates_on_one_gpu():
    phy2log = np.array([[0, 0, 1, 2, 2, 2]])
    # GPUs [0 0 1] [2 2 2]: one extra 0, two extra 2s.
    np.testing.assert_array_equal(colocated_replicas(phy2log, 2), [3])
    # GPUs [0 0] [1 2] [2 2]
    np.testing.assert_array_equal(colocated_replicas(phy2log, 3), [2])
    np.testing.assert_array_equal(colocated_replicas(phy2log, 6), [0])


def test_contiguous_placement_is_identity():
    phy2log, logcnt = contiguous_placement(2, 4)
    np.testing.assert_array_equal(phy2log, [[0, 1, 2, 3]] * 2)
    assert (logcnt == 1).all()


def test_balancing_beats_the_contiguous_layout_on_real_loads(real_loads):
    weight = real_loads["decode_in1000out1000"][:8]
    before = balancedness(gpu_loads(weight, *contiguous_placement(8, 256), 32))
    phy2log, _, logcnt = rebalance_experts(weight, 288, 8, 4, 32)
    after = balancedness(gpu_loads(weight, phy2log, logcnt, 32))
    assert (after > before).all()


def test_synthetic_load_is_deterministic_integer_and_skewed():
    a = synthetic_load(3, 64, seed=7)
    np.testing.assert_array_equal(a, synthetic_load(3, 64, seed=7))
    assert not np.array_equal(a, synthetic_load(3, 64, seed=8))
    np.testing.assert_array_equal(a, np.round(a))
    assert (a.max(-1) > 4 * a.mean(-1)).all()


def test_read_load_formats(tmp_path):
    data = [[1, 2, 3], [4, 5, 6]]
    (tmp_path / "plain.json").write_text(json.dumps(data))
    (tmp_path / "object.json").write_text(json.dumps({"logical_count": data}))
    np.save(tmp_path / "array.npy", np.array(data))
    for name in ("plain.json", "object.json", "array.npy"):
        np.testing.assert_array_equal(read_load(tmp_path / name), data)


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("x.json", "{not json", "cannot read"),
        ("x.json", '{"other": 1}', "logical_count"),
        ("x.json", "[1, 2, 3]", "2-D"),
        ("x.csv", "1,2", "suffix"),
    ],
)
def test_read_load_refuses_bad_files(tmp_path, name, content, words):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=words):
        read_load(tmp_path / name)


def test_read_load_missing_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_load(tmp_path / "missing.json")
