"""The symmetries of a square tile (8: quarter turns x a flip) and of a cubic one (48: the 24
rotations of the cube x a mirror), applied per sample to a whole batch with one gather.

A symmetry only moves pixels, so it is a table: for each output pixel, the source pixel it
reads. Gathering every array of the batch (image, mask, weight) through its sample's table
costs a few kernels whatever the batch holds, keeps the arrays aligned (they read the same
sources), and never waits for the host: the per-sample codes stay a tensor on the device.

Codes: square ``2 * turns + flip`` (``turns`` quarter turns in the last two axes, then a flip
of the last axis); cube ``8 * order + mirrors``: the axes of the last three taken in
``AXIS_ORDERS[order]``, then each axis flipped whose bit is set (4: z, 2: y, 1: x). Code 0 is
the identity in both.
"""

from __future__ import annotations

import itertools

import torch

AXIS_ORDERS = tuple(itertools.permutations(range(3)))  # the 6 orders of (z, y, x)
CUBE_SYMMETRIES = 8 * len(AXIS_ORDERS)  # x the 8 mirror patterns: 48, the cube's full symmetry group


def flip_rot90(array: torch.Tensor, turns: int, flip: bool) -> torch.Tensor:
    """One square symmetry of the last two axes, by torch's own ops (the tables' reference)."""
    array = torch.rot90(array, turns, dims=(-2, -1))
    return array.flip(-1) if flip else array


def cube_symmetry(array: torch.Tensor, code: int) -> torch.Tensor:
    """One cube symmetry of the last three axes (``code`` as the module says), by permute and flip:
    the reference the gather of :func:`cube_symmetries` reproduces."""
    order, mirrors = divmod(code, 8)
    lead = array.ndim - 3
    array = array.permute(*range(lead), *(lead + axis for axis in AXIS_ORDERS[order]))
    flipped = [lead + axis for axis in range(3) if mirrors >> (2 - axis) & 1]
    return array.flip(flipped) if flipped else array


_SQUARE_SOURCES: dict[tuple[int, str], torch.Tensor] = {}
_CUBE_TERMS: dict[tuple[int, str], torch.Tensor] = {}


def _gather(arrays: list[torch.Tensor | None], sources: torch.Tensor) -> list[torch.Tensor | None]:
    """Every array [B, ..., *tile] read at its sample's ``sources`` [B, tile pixels]; the leading
    axes (channels, a volume's z slices for a square table) each take the same permutation."""
    pixels = sources.shape[1]
    out: list[torch.Tensor | None] = []
    for array in arrays:
        if array is None:
            out.append(None)
            continue
        flat = array.reshape(array.shape[0], -1, pixels)
        index = sources[:, None, :].expand(-1, flat.shape[1], -1)
        out.append(torch.gather(flat, 2, index).view(array.shape))
    return out


def square_symmetries(arrays: list[torch.Tensor | None], codes: torch.Tensor) -> list[torch.Tensor | None]:
    """Each sample's square symmetry ``codes`` [B] (long) applied to every array [B, ..., S, S]."""
    size = arrays[0].shape[-1]
    key = (size, str(arrays[0].device))
    if key not in _SQUARE_SOURCES:  # [8, S*S]: small enough to keep per tile size and device
        pixels = torch.arange(size * size).view(size, size)
        _SQUARE_SOURCES[key] = torch.stack(
            [flip_rot90(pixels, turns, bool(flip)).reshape(-1) for turns in range(4) for flip in (0, 1)]
        ).to(arrays[0].device)
    return _gather(arrays, _SQUARE_SOURCES[key][codes])


def _cube_terms(size: int) -> torch.Tensor:
    """int64 [48, 4]: the source pixel of output (z, y, x) is ``z*t0 + y*t1 + x*t2 + t3``.

    Output axis a reads input axis ``order[a]`` (stride ``S**(2 - order[a])``), backwards where
    mirrored; so a table is 4 numbers, not S**3 (48 full tables of a 128**3 tile: 800 MB)."""
    terms = []
    for order in AXIS_ORDERS:
        for mirrors in range(8):
            strides = [size ** (2 - order[axis]) for axis in range(3)]
            signs = [-1 if mirrors >> (2 - axis) & 1 else 1 for axis in range(3)]
            offset = sum((size - 1) * stride for stride, sign in zip(strides, signs, strict=True) if sign < 0)
            terms.append([sign * stride for sign, stride in zip(signs, strides, strict=True)] + [offset])
    return torch.tensor(terms, dtype=torch.int64)


def cube_symmetries(arrays: list[torch.Tensor | None], codes: torch.Tensor) -> list[torch.Tensor | None]:
    """Each sample's cube symmetry ``codes`` [B] (long) applied to every array [B, ..., S, S, S]."""
    shape, device = tuple(arrays[0].shape[-3:]), arrays[0].device
    if len(set(shape)) != 1:
        raise ValueError(f"3-D rotations (data.augment_rotate_3d) need cubic tiles, got {shape}")
    size = shape[0]
    key = (size, str(device))
    if key not in _CUBE_TERMS:
        _CUBE_TERMS[key] = _cube_terms(size).to(device)
    terms = _CUBE_TERMS[key][codes].view(-1, 4, 1, 1, 1)  # [B, 4, 1, 1, 1]
    axis = torch.arange(size, device=device)
    sources = (terms[:, 0] * axis.view(1, -1, 1, 1) + terms[:, 1] * axis.view(1, 1, -1, 1)
               + terms[:, 2] * axis.view(1, 1, 1, -1) + terms[:, 3])  # fmt: skip
    return _gather(arrays, sources.view(len(codes), -1))
