"""Every bad input is refused by the numpy reference with the rule in the message."""

from __future__ import annotations

import numpy as np
import pytest

from eplb.reference import rebalance_experts

GOOD = np.ones((2, 8))
# Each case breaks one rule: (weight, R, G, N, P, exception, words in the message)
BAD_INPUTS = [
    ("nan", np.array([[1.0, np.nan, 1, 1]]), 4, 1, 1, 1, ValueError, "finite"),
    ("inf", np.array([[1.0, np.inf, 1, 1]]), 4, 1, 1, 1, ValueError, "finite"),
    ("negative", np.array([[1.0, -1.0, 1, 1]]), 4, 1, 1, 1, ValueError, ">= 0"),
    ("1-D", np.ones(8), 8, 1, 1, 1, ValueError, "2-D"),
    ("3-D", np.ones((1, 2, 8)), 8, 1, 1, 1, ValueError, "2-D"),
    ("no layers", np.ones((0, 8)), 8, 1, 1, 1, ValueError, "layer"),
    ("no experts", np.ones((2, 0)), 8, 1, 1, 1, ValueError, "expert"),
    ("bool", np.ones((2, 8), dtype=bool), 8, 1, 1, 1, TypeError, "boolean"),
    ("complex", np.ones((2, 8), dtype=complex), 8, 1, 1, 1, TypeError, "real"),
    ("strings", np.full((2, 8), "a"), 8, 1, 1, 1, TypeError, "real"),
    ("objects", np.full((2, 8), None, dtype=object), 8, 1, 1, 1, TypeError, "real"),
    ("zero replicas", GOOD, 0, 1, 1, 1, ValueError, "num_replicas"),
    ("negative groups", GOOD, 8, -2, 1, 1, ValueError, "num_groups"),
    ("zero nodes", GOOD, 8, 1, 0, 1, ValueError, "num_nodes"),
    ("zero gpus", GOOD, 8, 1, 1, 0, ValueError, "num_gpus"),
    ("float count", GOOD, 8.0, 1, 1, 1, TypeError, "num_replicas"),
    ("bool count", GOOD, 8, True, 1, 1, TypeError, "num_groups"),
    ("E % G", GOOD, 8, 3, 1, 1, ValueError, "num_groups"),
    ("P % N", GOOD, 8, 2, 2, 3, ValueError, "num_nodes"),
    ("R % P", GOOD, 10, 2, 1, 4, ValueError, "num_gpus"),
    ("R < E", GOOD, 4, 2, 1, 4, ValueError, "num_replicas"),
]


@pytest.mark.parametrize(
    ("weight", "R", "G", "N", "P", "exc", "words"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_input_is_refused(weight, R, G, N, P, exc, words):
    with pytest.raises(exc, match=words):
        rebalance_experts(weight, R, G, N, P)


def test_valid_input_next_to_the_bad_ones_is_accepted():
    # The bad cases above differ from this one in one argument each.
    phy2log, _, _ = rebalance_experts(GOOD, 8, 2, 1, 4)
    assert phy2log.shape == (2, 8)


def test_numpy_integer_counts_are_accepted():
    phy2log, _, _ = rebalance_experts(GOOD, np.int64(8), np.int32(2), 1, 4)
    assert phy2log.shape == (2, 8)
