"""Tile-size arithmetic of the U-Net presets, without building a model.

The data path needs to know which tile sizes a model accepts and how large
its logits are before any tensor exists (to cut tiles and crop targets), so
this module is plain integer arithmetic and does not import torch.

Every preset has the same skeleton; only the 3x3 convolution padding differs:

    per level down:  two 3x3 convs, 2x2 max-pool (halves; needs an even size)
    bottom:          two 3x3 convs
    per level up:    up-convolution (doubles), two 3x3 convs

A 3x3 conv with padding ``p`` changes a size by ``2p - 2``: it shrinks by 2
for the valid convs of ``paper`` and ``article`` and keeps it for ``padded``.
Both up-convolutions in use (the paper's k2 s2 and the article's k3 s2 p1
output_padding 1) exactly double.
"""

from __future__ import annotations

PRESETS: tuple[str, ...] = ("paper", "article", "padded")

_CONV_PADDING = {"paper": 0, "article": 0, "padded": 1}
_DEFAULT_DEPTH = {"paper": 4, "article": 3, "padded": 4}
_CONVS_PER_BLOCK = 2


def conv_padding(preset: str) -> int:
    """Padding of the preset's 3x3 convolutions (0: valid, 1: same)."""
    _check_preset(preset)
    return _CONV_PADDING[preset]


def default_depth(preset: str) -> int:
    """The preset's own number of pooling levels (paper 4, article 3, padded 4)."""
    _check_preset(preset)
    return _DEFAULT_DEPTH[preset]


def output_size(preset: str, depth: int, input_size: int) -> int:
    """Side length of the logits for a square tile of side ``input_size``.

    Raises ValueError when the size is not valid for the preset and depth.
    """
    size, problem = _trace(preset, depth, input_size)
    if problem is not None:
        raise ValueError(_invalid_message(preset, depth, input_size, problem))
    return size


def check_input_size(preset: str, depth: int, size: int) -> None:
    """Raise ValueError naming the nearest valid sizes when ``size`` is not valid."""
    output_size(preset, depth, size)


def is_valid_input_size(preset: str, depth: int, size: int) -> bool:
    return _trace(preset, depth, size)[1] is None


def valid_input_sizes(preset: str, depth: int, low: int, high: int) -> list[int]:
    """All valid tile sizes in ``[low, high]`` (both ends included), ascending."""
    _check_preset(preset)
    _check_depth(depth)
    return [size for size in range(max(low, 1), high + 1) if is_valid_input_size(preset, depth, size)]


def nearest_valid_input_sizes(preset: str, depth: int, size: int, count: int = 2) -> list[int]:
    """The ``count`` valid tile sizes nearest to ``size`` (``size`` itself excluded), ascending.

    Valid sizes are evenly spaced, so for the default ``count=2`` these are the
    nearest valid size below and the nearest above (only sizes above when
    ``size`` is below the smallest valid one). Ties go to the smaller size.
    """
    _check_preset(preset)
    _check_depth(depth)
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    found: list[int] = []
    distance = 1
    # Terminates: there are valid sizes above any size (every multiple of a
    # large enough power of two plus the right offset).
    while len(found) < count:
        for candidate in (size - distance, size + distance):
            if candidate >= 1 and len(found) < count and is_valid_input_size(preset, depth, candidate):
                found.append(candidate)
        distance += 1
    return sorted(found)


def _trace(preset: str, depth: int, input_size: int) -> tuple[int, str | None]:
    """Follow a size through the network; return (output size, problem or None)."""
    _check_preset(preset)
    _check_depth(depth)
    if isinstance(input_size, bool) or not isinstance(input_size, int):
        raise ValueError(f"tile size must be an int, got {input_size!r}")
    conv_change = _CONVS_PER_BLOCK * (2 * _CONV_PADDING[preset] - 2)

    def after_convs(size: int, where: str) -> tuple[int, str | None]:
        size += conv_change
        if size <= 0:
            return size, f"the 3x3 convolutions {where} shrink the feature map to nothing"
        return size, None

    size = input_size
    if size <= 0:
        return size, "a tile size must be positive"
    for level in range(depth):
        size, problem = after_convs(size, f"at level {level} of the contracting path")
        if problem:
            return size, problem
        if size % 2:
            return size, (
                f"every 2x2 max-pool must see an even size, but the one after level {level} sees {size}"
            )
        size //= 2
    size, problem = after_convs(size, "at the bottom")
    if problem:
        return size, problem
    for level in reversed(range(depth)):
        size *= 2
        size, problem = after_convs(size, f"at level {level} of the expansive path")
        if problem:
            return size, problem
    return size, None


def _invalid_message(preset: str, depth: int, size: int, problem: str) -> str:
    nearest = ", ".join(str(valid) for valid in nearest_valid_input_sizes(preset, depth, size))
    return f"tile size {size} is not valid for the {preset} preset (depth {depth}): {problem}; nearest valid sizes: {nearest}"


def _check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; allowed: {', '.join(PRESETS)}")


def _check_depth(depth: int) -> None:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an int >= 1, got {depth!r}")
