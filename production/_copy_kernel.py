"""Slot copies on CUDA in one Triton kernel that uses a bounded number of SMs.

Why not ``torch._foreach_copy_``: it launches as many blocks as the data needs
and takes every SM. NCCL's kernels, moving the messages of the same step, then
wait for SMs: beside such copies the wire ran at about half its rate. With a
fixed grid of about half the SMs, copies run as fast (1.5 TB/s on an H200) and
hide behind the wire (``benchmarks/probe_overlap.py``: a 2 GiB exchange took
6.17 ms alone and 6.37 ms beside a 2 GiB copy, against 6.88 ms with
``_foreach_copy_``).

Copies are cut into chunks of at most ``CHUNK_WORDS`` 8-byte words, listed as
(source address, destination address, words) rows; program i of the grid
copies chunks i, i + grid, ... The caller sends the tables of a whole
call to the GPU in one copy, before the first launch.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

import numpy as np
import torch

__all__ = ["CHUNK_WORDS", "chunk_table", "copy_rows", "kernel_available"]

#: Words (8 bytes) one chunk copies at most: 512 KiB.
CHUNK_WORDS = 1 << 16
_BLOCK_WORDS = 4096  # words one program moves per loop iteration


@cache
def _kernel() -> Any:
    """The Triton kernel, compiled on first use; None where Triton is missing."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def copy_chunks(table, num_chunks, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
        for chunk in range(tl.program_id(0), num_chunks, tl.num_programs(0)):
            src = tl.load(table + 3 * chunk).to(tl.pointer_type(tl.int64))
            dst = tl.load(table + 3 * chunk + 1).to(tl.pointer_type(tl.int64))
            words = tl.load(table + 3 * chunk + 2)
            for start in range(0, CHUNK, BLOCK):
                offsets = start + tl.arange(0, BLOCK)
                inside = offsets < words
                tl.store(dst + offsets, tl.load(src + offsets, mask=inside), mask=inside)

    return copy_chunks


def kernel_available(device: torch.device) -> bool:
    """Whether copies on ``device`` can use the kernel (a CUDA device and Triton)."""
    return device.type == "cuda" and _kernel() is not None


def chunk_table(
    destinations: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]
) -> np.ndarray | None:
    """[chunks, 3] int64 rows (source address, destination address, words), or None.

    destinations, sources: tensors copied pairwise, each pair the same number of
    bytes. None when any tensor is not one dense block of whole 8-byte words at
    an 8-byte-aligned address: those go through ``_foreach_copy_`` instead.
    """
    if not destinations:
        return np.zeros((0, 3), dtype=np.int64)
    addresses = np.empty((2, len(destinations)), dtype=np.int64)
    nbytes = np.empty(len(destinations), dtype=np.int64)
    for i, (dst, src) in enumerate(zip(destinations, sources, strict=True)):
        size = dst.numel() * dst.element_size()
        if not (dst.is_contiguous() and src.is_contiguous()):
            return None
        if size != src.numel() * src.element_size():
            raise AssertionError("copy pair differs in size")  # a bug, never bad input
        addresses[0, i], addresses[1, i], nbytes[i] = src.data_ptr(), dst.data_ptr(), size
    if (addresses % 8).any() or (nbytes % 8).any():
        return None
    words = nbytes // 8
    chunks = -(-words // CHUNK_WORDS)
    pair = np.repeat(np.arange(len(words)), chunks)
    # Index of each chunk within its pair: 0, 1, ... restarting at every pair.
    within = np.arange(pair.size) - np.repeat(np.cumsum(chunks) - chunks, chunks)
    offset = within * CHUNK_WORDS
    table = np.empty((pair.size, 3), dtype=np.int64)
    table[:, 0] = addresses[0, pair] + 8 * offset
    table[:, 1] = addresses[1, pair] + 8 * offset
    table[:, 2] = np.minimum(CHUNK_WORDS, words[pair] - offset)
    return table[table[:, 2] > 0]


@cache
def _sm_count(device: torch.device) -> int:
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def grid_size(device: torch.device, share: float) -> int:
    """Programs for a copy kernel that may take ``share`` of the device's SMs."""
    return max(1, int(_sm_count(device) * share))


def copy_rows(table: torch.Tensor, programs: int) -> None:
    """Launch the copies of ``table`` on the current stream.

    table: [3 * chunks] int64 on the GPU, the rows of :func:`chunk_table` in order.
    programs: the grid; the kernel uses that many SMs at most.
    """
    chunks = table.numel() // 3
    if chunks:
        _kernel()[(min(programs, chunks),)](
            table, chunks, BLOCK=_BLOCK_WORDS, CHUNK=CHUNK_WORDS, num_warps=8
        )
