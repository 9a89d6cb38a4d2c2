"""Tile-size arithmetic of the U-Net presets, without building a model.

The data path needs to know which tile sizes a model accepts and how large
its logits are before any tensor exists (to cut tiles and crop targets), so
this module is plain integer arithmetic and does not import torch.

Every preset has the same skeleton; only the 3x3 convolution padding differs:

    per level down:  two 3x3 convs, 2x2 max-pool (halves; needs an even size)
    bottom:          two 3x3 convs
    per level up:    up-convolution (doubles), two 3x3 convs

A 3x3 conv with padding ``p`` changes a size by ``2p - 2``: it shrinks by 2
for the valid convs of ``paper``, ``article`` and ``cicek`` and keeps it for
``padded``. Both up-convolutions in use (the paper's k2 s2 and the article's
k3 s2 p1 output_padding 1) exactly double.

Each axis follows that path on its own, so a 3-D tile is three 1-D questions.
An axis may pool at its deepest ``pools`` levels only (a 3-D model's z with
``z_pools``): at the other levels it is neither halved nor doubled, but its
3x3x3 convs still change it. ``output_shape`` and ``check_input_shape`` take a
shape ``(Y, X)`` or ``(Z, Y, X)``; z is the first of three.
"""

from __future__ import annotations

PRESETS: tuple[str, ...] = ("paper", "article", "padded", "cicek")

_CONV_PADDING = {"paper": 0, "article": 0, "padded": 1, "cicek": 0}
_DEFAULT_DEPTH = {"paper": 4, "article": 3, "padded": 4, "cicek": 3}
_CONVS_PER_BLOCK = 2
_AXES = {2: ("y", "x"), 3: ("z", "y", "x")}


def conv_padding(preset: str) -> int:
    """Padding of the preset's 3x3 convolutions (0: valid, 1: same)."""
    _check_preset(preset)
    return _CONV_PADDING[preset]


def default_depth(preset: str) -> int:
    """The preset's own number of pooling levels (paper 4, article 3, padded 4, cicek 3)."""
    _check_preset(preset)
    return _DEFAULT_DEPTH[preset]


def output_size(preset: str, depth: int, input_size: int, pools: int | None = None) -> int:
    """Length of the logits along one axis of length ``input_size``.

    ``pools``: how many of the deepest levels halve this axis (None: all ``depth``).
    Raises ValueError when the size is not valid for the preset and depth.
    """
    size, problem = _trace(preset, depth, input_size, pools)
    if problem is not None:
        raise ValueError(_invalid_message(preset, depth, input_size, problem, pools))
    return size


def check_input_size(preset: str, depth: int, size: int, pools: int | None = None) -> None:
    """Raise ValueError naming the nearest valid sizes when ``size`` is not valid."""
    output_size(preset, depth, size, pools)


def is_valid_input_size(preset: str, depth: int, size: int, pools: int | None = None) -> bool:
    return _trace(preset, depth, size, pools)[1] is None


def valid_input_sizes(preset: str, depth: int, low: int, high: int, pools: int | None = None) -> list[int]:
    """All valid tile sizes in ``[low, high]`` (both ends included), ascending."""
    _check_preset(preset)
    _check_depth(depth)
    return [size for size in range(max(low, 1), high + 1) if is_valid_input_size(preset, depth, size, pools)]


def nearest_valid_input_sizes(
    preset: str, depth: int, size: int, count: int = 2, pools: int | None = None
) -> list[int]:
    """The ``count`` valid tile sizes nearest to ``size`` (``size`` itself excluded), ascending.

    Valid sizes are evenly spaced, so for the default ``count=2`` these are the
    nearest valid size below and the nearest above (only sizes above when
    ``size`` is below the smallest valid one). Ties go to the smaller size.
    """
    _check_preset(preset)
    _check_depth(depth)
    _check_pools(pools, depth)
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    found: list[int] = []
    distance = 1
    # Terminates: there are valid sizes above any size (every multiple of a
    # large enough power of two plus the right offset).
    while len(found) < count:
        for candidate in (size - distance, size + distance):
            if candidate >= 1 and len(found) < count and is_valid_input_size(preset, depth, candidate, pools):
                found.append(candidate)
        distance += 1
    return sorted(found)


def output_shape(
    preset: str, depth: int, shape: tuple[int, ...], z_pools: int | None = None
) -> tuple[int, ...]:
    """The logits' spatial shape for a tile of ``shape`` ((Y, X) or (Z, Y, X)).

    ``z_pools`` (3-D only; None: all levels): how many of the deepest levels pool z.
    Raises the ValueError of ``check_input_shape`` for a shape that is not valid.
    """
    check_input_shape(preset, depth, shape, z_pools)
    axis_pools = _axis_pools(shape, z_pools)
    return tuple(_trace(preset, depth, size, pools)[0] for size, pools in zip(shape, axis_pools, strict=True))


def check_input_shape(preset: str, depth: int, shape: tuple[int, ...], z_pools: int | None = None) -> None:
    """Raise ValueError naming the first invalid axis (z, y or x) and its nearest valid sizes."""
    axis_pools = _axis_pools(shape, z_pools)  # first: it refuses a shape of the wrong length
    for axis, size, pools in zip(_AXES[len(shape)], shape, axis_pools, strict=True):
        _, problem = _trace(preset, depth, size, pools)
        if problem is not None:
            message = _invalid_message(preset, depth, size, problem, pools)
            raise ValueError(f"tile shape {tuple(shape)}: the {axis} axis: {message}")


def _axis_pools(shape: tuple[int, ...], z_pools: int | None) -> tuple[int | None, ...]:
    if len(shape) not in _AXES:
        raise ValueError(f"a tile shape has 2 (y, x) or 3 (z, y, x) axes, got {tuple(shape)}")
    if len(shape) == 2:
        if z_pools is not None:
            raise ValueError(f"z_pools is for 3-D tiles; {tuple(shape)} has no z axis")
        return (None, None)
    return (z_pools, None, None)


def _trace(preset: str, depth: int, input_size: int, pools: int | None = None) -> tuple[int, str | None]:
    """Follow a size through the network; return (output size, problem or None)."""
    _check_preset(preset)
    _check_depth(depth)
    _check_pools(pools, depth)
    if isinstance(input_size, bool) or not isinstance(input_size, int):
        raise ValueError(f"tile size must be an int, got {input_size!r}")
    conv_change = _CONVS_PER_BLOCK * (2 * _CONV_PADDING[preset] - 2)
    first_pooling_level = depth - (depth if pools is None else pools)

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
        if level < first_pooling_level:
            continue  # this axis is not pooled here
        if size % 2:
            return size, (
                f"every 2x2 max-pool must see an even size, but the one after level {level} sees {size}"
            )
        size //= 2
    size, problem = after_convs(size, "at the bottom")
    if problem:
        return size, problem
    for level in reversed(range(depth)):
        if level >= first_pooling_level:
            size *= 2
        size, problem = after_convs(size, f"at level {level} of the expansive path")
        if problem:
            return size, problem
    return size, None


def _invalid_message(preset: str, depth: int, size: int, problem: str, pools: int | None = None) -> str:
    nearest = ", ".join(str(valid) for valid in nearest_valid_input_sizes(preset, depth, size, pools=pools))
    if pools is None or pools == depth:
        pooled = ""
    elif pools == 0:
        pooled = ", this axis never pooled"
    else:
        pooled = f", this axis pooled at its deepest {pools} level{'s' * (pools > 1)} only"
    return (
        f"tile size {size} is not valid for the {preset} preset (depth {depth}{pooled}): {problem}; "
        f"nearest valid sizes: {nearest}"
    )


def _check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; allowed: {', '.join(PRESETS)}")


def _check_depth(depth: int) -> None:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an int >= 1, got {depth!r}")


def _check_pools(pools: int | None, depth: int) -> None:
    if pools is None:
        return
    if isinstance(pools, bool) or not isinstance(pools, int) or not 0 <= pools <= depth:
        raise ValueError(f"pools must be an int from 0 to the depth ({depth}), or None for all; got {pools!r}")
