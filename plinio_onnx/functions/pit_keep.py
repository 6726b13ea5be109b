"""What PIT's masks keep, in numpy: the finalizer's, the reports' and the search flow's view.

The same decisions as the ``ai.plinio`` PIT functions (`plinio_onnx.functions.pit`) at the
current parameter values: θ = |x| with the last entry forced to 1 (keep-alive), kept means
θ > threshold; a Conv1d's taps are kept by β (receptive field) and γ (dilation) together, and
`kernel_plan` turns a tap mask into the shortest exported kernel. `gamma_map` is the constant
that the PIT pass stores beside every time mask.

Channel blocks (``channel_multiple`` N of `plinio_onnx.passes.pit`): a mask parameter of
⌈C/N⌉ entries, one per block of N consecutive channels, cut from the end of its C channels (the
first block holds the C mod N left over, when C is not a multiple of N); `block_index` maps
every channel to its entry. The last (kept-alive) block is a full one, so a pruned layer keeps a
multiple of N channels, plus the C mod N of the first block when that block survives.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def dilation_levels(kernel: int) -> int:
    """L = max(⌈log2 k⌉, 1) dilation mask entries for a kernel of k taps."""
    return max(math.ceil(math.log2(kernel)), 1)


def gamma_map(kernel: int) -> np.ndarray:
    """[k, L] 0/1 matrix: tap j counts γ_p when (k-1-j) mod 2^p = 0 (anchored at the newest tap).

    Stored as int64 so the loader keeps it a buffer, not a trainable parameter."""
    levels = dilation_levels(kernel)
    return np.array([[1 if (kernel - 1 - j) % (2 ** p) == 0 else 0 for p in range(levels)]
                     for j in range(kernel)], dtype=np.int64)


def keep_alive(values: np.ndarray) -> np.ndarray:
    """θ = |values| with the last entry forced to 1 (a new array)."""
    theta = np.abs(np.asarray(values, dtype=np.float32)).reshape(-1).copy()
    theta[-1] = 1.0
    return theta


def channel_keep(alpha: np.ndarray, threshold: float) -> np.ndarray:
    """Indices of kept channels."""
    return np.flatnonzero(keep_alive(alpha) > threshold)


def block_count(channels: int, block: int) -> int:
    """Mask entries of ``channels`` channels searched in blocks of ``block``: ⌈C/N⌉."""
    return -(-int(channels) // int(block))


def block_index(channels: int, block: int) -> np.ndarray:
    """The mask entry of every one of ``channels`` channels in blocks of ``block`` (blocks cut
    from the end: the first one holds the C mod N left over). ``block`` 1: the identity."""
    pad = block_count(channels, block) * block - channels
    return (np.arange(channels, dtype=np.int64) + pad) // block


def block_sizes(channels: int, block: int) -> np.ndarray:
    """How many channels each mask entry stands for (see `block_index`)."""
    return np.bincount(block_index(channels, block), minlength=block_count(channels, block))


def blocked_keep(alpha: np.ndarray, channels: int, block: int, threshold: float) -> np.ndarray:
    """Indices of the kept channels of ``channels`` channels masked in blocks by ``alpha``."""
    entries = keep_alive(alpha) > threshold
    return np.flatnonzero(entries[block_index(channels, block)])


def group_keep(values_of, group, threshold: float) -> np.ndarray:
    """Kept channels of a PIT group record (`plinio_onnx.records.GroupRecord`): its one mask
    parameter, or one per atom (a group whose layers hold parts of it; see
    `plinio_onnx.analysis.ChannelGroup.atoms`), each entry masking a block of ``group.block``
    channels. ``values_of(name)`` reads a parameter's values."""
    block = int(group.block)
    if not group.atoms:
        return blocked_keep(values_of(group.alpha[0]), group.size, block, threshold)
    kept = [np.asarray(atom)[blocked_keep(values_of(name), len(atom), block, threshold)]
            for name, atom in zip(group.alpha, group.atoms)]
    return np.sort(np.concatenate(kept))


def tap_mask(beta: np.ndarray, gamma: np.ndarray, threshold: float) -> np.ndarray:
    """0/1 per tap (oldest first): kept by θβ = cumsum(β̂) and by θγ = gamma_map · γ̂."""
    kernel = np.asarray(beta).size
    theta_beta = np.cumsum(keep_alive(beta))
    theta_gamma = gamma_map(kernel).astype(np.float32) @ keep_alive(gamma)
    return ((theta_beta > threshold) & (theta_gamma > threshold)).astype(np.float32)


@dataclass(frozen=True)
class KernelPlan:
    """How a masked Conv1d kernel is exported: ``taps`` lists, oldest first, the original tap
    index of every exported tap (None: a zero tap that only keeps the alignment), with
    ``dilation`` and ``pads`` of the exported conv."""
    taps: tuple
    dilation: int
    pads: tuple[int, int]


def kernel_plan(mask: np.ndarray, dilation: int, pads: tuple[int, int]) -> KernelPlan:
    """The shortest kernel computing exactly what the masked kernel computes.

    Kept taps form a progression ending at the newest tap (β drops from the old end, γ keeps
    every 2^p-th tap counted from the newest), so they are a kernel of |J| taps at dilation d·step
    whose first tap sits J0·d later: its left pad shrinks by J0·d. Where that pad would be
    negative (a centred kernel that lost its older half), zero taps are prepended until it is not.
    """
    kernel = mask.size
    kept = np.flatnonzero(mask)
    if kept.size == kernel:
        return KernelPlan(tuple(range(kernel)), dilation, tuple(pads))
    step = int(kept[1] - kept[0]) if kept.size > 1 else 1
    if kept[-1] != kernel - 1 or np.any(np.diff(kept) != step):
        return KernelPlan(tuple(int(j) if mask[j] else None for j in range(kernel)), dilation, tuple(pads))
    begin = pads[0] - int(kept[0]) * dilation
    new_dilation = dilation * step
    taps: list = [int(j) for j in kept]
    if begin < 0:
        if kept.size == 1:
            new_dilation, extra = -begin, 1
        else:
            extra = -(-(-begin) // new_dilation)
        taps = [None] * extra + taps
        begin += extra * new_dilation
    return KernelPlan(tuple(taps), new_dilation, (begin, pads[1]))
