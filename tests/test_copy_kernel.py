"""The CUDA copy kernel: its chunk table (built on the host, checked here) and the kernel."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from eplb.production._copy_kernel import CHUNK_WORDS, chunk_table, copy_rows, kernel_available


def _covered(table: np.ndarray, base: int, nbytes: int, column: int) -> np.ndarray:
    """How often each byte of [base, base + nbytes) is named by the table's ``column``."""
    count = np.zeros(nbytes, dtype=np.int64)
    for row in table:
        start = int(row[column]) - base
        count[start : start + 8 * int(row[2])] += 1
    return count


@pytest.mark.parametrize(
    "words", [[1], [CHUNK_WORDS], [CHUNK_WORDS + 1, 3], [5, 2 * CHUNK_WORDS + 7, 1]]
)
def test_chunks_cover_every_byte_once_and_pair_up(words):
    src = torch.arange(sum(words) + 1, dtype=torch.int64)
    dst = torch.zeros_like(src)
    cuts = np.cumsum([0, *words])
    sources = [src[a:b] for a, b in itertools.pairwise(cuts)]
    destinations = [dst[a + 1 : b + 1] for a, b in itertools.pairwise(cuts)]
    table = chunk_table(destinations, sources)
    assert table is not None
    assert (table[:, 2] > 0).all() and (table[:, 2] <= CHUNK_WORDS).all()
    nbytes = 8 * sum(words)
    assert (_covered(table, src.data_ptr(), nbytes, 0) == 1).all()
    assert (_covered(table, dst.data_ptr() + 8, nbytes, 1) == 1).all()
    # Each chunk keeps its offset: destination - source is the pair's shift (one word here).
    assert (table[:, 1] - table[:, 0] == dst.data_ptr() + 8 - src.data_ptr()).all()


def test_chunk_table_refuses_what_it_cannot_copy_as_words():
    block = torch.zeros(4, 6, dtype=torch.int16)
    assert chunk_table([block[:, :4]], [block[:, 2:]]) is None  # not one dense block
    raw = torch.zeros(64, dtype=torch.uint8)
    assert chunk_table([raw[1:9]], [raw[16:24]]) is None  # misaligned
    assert chunk_table([raw[0:12]], [raw[16:28]]) is None  # not whole words
    assert chunk_table([], []).shape == (0, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_copies_bit_for_bit_on_cuda():
    device = torch.device("cuda")
    if not kernel_available(device):
        pytest.skip("Triton is not installed")
    generator = torch.Generator(device=device).manual_seed(0)
    src = torch.randint(
        -(2**62), 2**62, (3 * CHUNK_WORDS + 11,), device=device, generator=generator
    )
    dst = torch.zeros_like(src)
    pieces = [(0, 5), (5, CHUNK_WORDS + 9), (CHUNK_WORDS + 9, 3 * CHUNK_WORDS + 11)]
    table = chunk_table([dst[a:b] for a, b in pieces], [src[a:b] for a, b in pieces])
    copy_rows(torch.from_numpy(table).ravel().to(device), programs=3)
    torch.cuda.synchronize()
    assert torch.equal(dst, src)
