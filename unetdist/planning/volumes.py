"""The planner's rules for volumes (3-D data, issue 19): the tile, the pooling per axis, and 3-D vs
slice-wise, by nnU-Net's 3-D planning (Isensee et al. 2021, Nat. Methods 18:203; the code's
``ExperimentPlanner`` and ``get_pool_and_conv_props``). Pure arithmetic over a
:class:`~unetdist.data.fingerprint_volumes.VolumeFingerprint`; the budget enters as ``fits``
and ``cost`` (:mod:`unetdist.planning.rules` owns them, as it owns batch, schedule and the rest)::

    net, choices = volume_tile(fp, width=32, num_classes=3, fits=fits, cost=cost)

1. 3-D or slice-wise: a 3-D network unless the slices are thick and too few for it: z spacing
   more than ``ANISOTROPY_RATIO`` (3) x the in-plane one (nnU-Net's anisotropy threshold) *and*
   a 3-D tile of the median volume's whole depth would never pool z by rule 3 (under 16 slices,
   or z so coarse that y and x never catch up within the depth). Such a 3-D network builds no
   z context of its own: its only 3-D reach is its convs' 3 slices, at 3x the cost of 2-D ones;
   that is nnU-Net's case for its 2-D configuration (the nnU-Net paper: 2-D tends to win on
   strongly anisotropic data). nnU-Net settles it by cross-validating both; a plan must choose
   without training. Not nnU-Net's own "anisotropic voxels" test (fewer than a third as many
   slices as in-plane pixels): that holds for nearly every microscopy stack, physically cubic
   ones (128 x 512 x 512 at 4:1:1) among them, where z pools twice and 3-D context is real.
   Slice-wise here is a 3-D network of ``tile_depth`` 1 that never pools z: its 3x3x3 convs see
   zeros above and below, so it is a 2-D U-Net over slices (3x the FLOPs of a 2-D one: the zero
   taps still compute) that the volume loader and predictor run as they are.
2. the tile: nnU-Net's target spacing is the median spacing (the volumes are planned in their
   voxels; nothing is resampled); the tile starts at the median volume (capped by the smallest,
   which every volume must hold), in-plane square (y = x: ``data.tile_size``), and while a
   batch of 2 does not fit the budget it shrinks along the axis of the largest physical extent
   (voxels x spacing) by what that axis must be divisible by, as nnU-Net shrinks its patch
   one divisibility step at a time, so an anisotropic tile ends about as deep (physically) as
   wide. (nnU-Net v2 starts at an isotropic 256**3-voxel patch clipped to the median shape and
   shrinks the axis largest against the median; starting at the median and shrinking the
   physically largest reaches the same physically cubic-ish patches.)
3. pooling: y and x pool at every level while the bottom edge stays >= 8 px (depth <= 4, as
   2-D); z joins a level's pool when its spacing after the previous pools is less than 2x the
   finest (nnU-Net's rule), and only while its size at the pooled level stays >= 8. A coarse z
   (spacing 4 x in-plane) thus starts pooling once y and x have pooled twice: at the deepest
   levels, which is where ``model.z_pools`` places z's pools. (Where z stops for its size
   rather than its spacing, nnU-Net would pool it at the first levels: the same count, only
   the levels differ.) The tile is divisible by 2**depth in-plane and 2**z_pools along z.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from unetdist.data.fingerprint_volumes import VolumeFingerprint
from unetdist.planning.costs import MAX_DEPTH, MAX_FEATURES, MIN_BOTTOM_EDGE_PX, MIN_TILE_PX, Net, PlanError

ANISOTROPY_RATIO = 3.0  # nnU-Net's anisotropy threshold (spacing and voxels alike)
SPACING_POOL_RATIO = 2.0  # nnU-Net: an axis pools while its spacing is below 2x the finest

Choice = tuple[str, Any, str]


def plane_spacing(spacing: tuple[float, ...]) -> float:
    """The in-plane voxel size: the coarser of y and x (the square tile is planned on it)."""
    return max(spacing[1:])


def slice_wise(fp: VolumeFingerprint) -> tuple[bool, str]:
    """Whether the slices are thick and too few for a 3-D network (rule 1), and why."""
    ratio = fp.spacing[0] / plane_spacing(fp.spacing)
    depth = fp.median_volume_zyx[0]
    edge = min(*fp.median_volume_zyx[1:], *fp.max_tile_zyx[1:])
    z_pools = pooling((depth, edge, edge), fp.spacing)[1]
    figures = (f"z spacing {ratio:.3g}x the in-plane (threshold {ANISOTROPY_RATIO:g}, nnU-Net's); a tile of "
               f"the median {depth} slices would pool z {_times(z_pools)}")  # fmt: skip
    if ratio > ANISOTROPY_RATIO and not z_pools:
        return True, f"{figures}: thick slices, too few for 3-D context: slice-wise (nnU-Net's 2-D configuration)"
    return False, f"{figures}: 3-D"


def _times(count: int) -> str:
    return {0: "never", 1: "once", 2: "twice"}.get(count, f"{count} times")


def pooling(shape: tuple[int, int, int], spacing: tuple[float, ...]) -> tuple[int, int]:
    """(depth, z_pools) of a tile (Z, S, S) at ``spacing`` (z, y, x) by rule 3."""
    size_z, edge = shape[0], shape[1]
    z_spacing, plane = spacing[0], plane_spacing(spacing)
    depth = z_pools = 0
    while depth < MAX_DEPTH and edge // 2 ** (depth + 1) >= MIN_BOTTOM_EDGE_PX:
        z_now, plane_now = z_spacing * 2**z_pools, plane * 2**depth  # after the previous pools
        if z_now < SPACING_POOL_RATIO * min(z_now, plane_now) and size_z // 2 ** (z_pools + 1) >= MIN_BOTTOM_EDGE_PX:
            z_pools += 1
        depth += 1
    return depth, z_pools


def tile_net(z: int, edge: int, fp: VolumeFingerprint, num_classes: int, width: int) -> Net:
    """The network of a tile near (z, edge, edge): pooled by rule 3, each axis rounded down to
    what its pools need (that keeps the pools: a size >= 8 * 2**n rounds to one that still is)."""
    depth, z_pools = pooling((z, edge, edge), fp.spacing)
    return Net(edge - edge % 2**depth, depth, fp.channels, num_classes, width,
               tile_depth=z - z % 2**z_pools, z_pools=z_pools)  # fmt: skip


def volume_tile(
    fp: VolumeFingerprint,
    num_classes: int,
    width: int,
    fits: Callable[[Net], bool],
    cost: Callable[[Net], str],
) -> tuple[Net, list[Choice]]:
    """The 3-D tile and network (rules 1-3) that ``fits`` the budget (the rules' smallest batch of
    it), and the choices that say so: data.tile_size, data.tile_depth, model.spatial_dims, depth,
    z_pools."""
    slices, slices_why = slice_wise(fp)
    median, cap = fp.median_volume_zyx, fp.max_tile_zyx
    start_z = 1 if slices else min(median[0], cap[0])
    start_edge = min(*median[1:], *cap[1:])
    if start_edge < MIN_TILE_PX:
        raise PlanError(f"the volumes give in-plane tiles of at most {start_edge} px; a U-Net needs {MIN_TILE_PX}")
    z_spacing, plane = fp.spacing[0], plane_spacing(fp.spacing)
    net = tile_net(start_z, start_edge, fp, num_classes, width)
    while not fits(net):
        step_z, step_edge = 2**net.z_pools, 2**net.depth  # what each axis must stay divisible by
        can_z = not slices and net.tile_depth - step_z >= 1
        can_edge = net.tile_px - step_edge >= MIN_TILE_PX
        if not (can_z or can_edge):
            break
        # the physically longest axis first; a tie shrinks in-plane (z is the scarcer context)
        if can_z and (not can_edge or net.tile_depth * z_spacing > net.tile_px * plane):
            net = tile_net(net.tile_depth - step_z, net.tile_px, fp, num_classes, width)
        else:
            net = tile_net(net.tile_depth, net.tile_px - step_edge, fp, num_classes, width)
    shrunk = (net.tile_depth, net.tile_px) != tile_net(start_z, start_edge, fp, num_classes, width).shape[:2]
    if not fits(net):
        budget_why = f"the smallest plannable tile, over the budget: {cost(net)}"
    elif shrunk:
        budget_why = f"shrunk along the physically longest axis (nnU-Net) until the smallest batch fits: {cost(net)}"
    else:
        budget_why = f"which fits the budget: {cost(net)}"
    start = (f"from the median volume {'x'.join(map(str, median))} voxels, capped by the smallest "
             f"{'x'.join(map(str, cap))}")  # fmt: skip
    objects = ""
    if fp.median_object_zyx:
        object_z, object_y, object_x = fp.median_object_zyx
        objects = (f"; it spans {net.tile_px / max(object_y, object_x, 1):.3g} median objects in-plane"
                   + ("" if slices else f", {net.tile_depth / max(object_z, 1):.3g} along z"))  # fmt: skip
    edge_why = f"in-plane {net.tile_px} x {net.tile_px} (y = x), divisible by 2**{net.depth}: {start}, {budget_why}{objects}"
    if slices:
        depth_why = f"one slice: {slices_why}"
    else:
        depth_why = (f"{net.tile_depth} slices, divisible by 2**{net.z_pools}: {net.tile_depth * z_spacing:.4g} "
                     f"deep against {net.tile_px * plane:.4g} wide (spacing units); {slices_why}")  # fmt: skip
    return net, [
        ("data.tile_size", net.tile_px, edge_why),
        ("data.tile_depth", net.tile_depth, depth_why),
        *model_choices(fp, net, slices),
    ]


def model_choices(fp: VolumeFingerprint, net: Net, slices: bool) -> list[Choice]:
    """model.spatial_dims, model.depth and model.z_pools of a planned 3-D net, with their reasons."""
    bottom = net.tile_px // 2**net.depth
    depth_why = f"in-plane: pool while the bottom edge stays >= {MIN_BOTTOM_EDGE_PX} px ({bottom} px here)"
    if net.depth == MAX_DEPTH:
        depth_why += f", at most {MAX_DEPTH} ({MAX_FEATURES} features)"
    ratio = fp.spacing[0] / plane_spacing(fp.spacing)
    if slices:
        pools_why = "slice-wise: a tile of one slice never pools z"
    else:
        rule = (f"z spacing {ratio:.3g}x the in-plane; z pools once its spacing is below "
                f"{SPACING_POOL_RATIO:g}x the finest and its size stays >= {MIN_BOTTOM_EDGE_PX} (nnU-Net)")  # fmt: skip
        where = {0: "no level", net.depth: "every level"}.get(net.z_pools, f"the deepest {net.z_pools} of {net.depth} levels")
        bottom_z = net.tile_depth // 2**net.z_pools
        pools_why = f"{rule}: {where}, {bottom_z} slices at the bottom"
    return [
        ("model.spatial_dims", 3, "the data are volumes [C, Z, Y, X] (the store's spatial_dims 3)"),
        ("model.depth", net.depth, depth_why),
        ("model.z_pools", net.z_pools, pools_why),
    ]
