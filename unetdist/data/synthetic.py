"""A toy fluorescence-microscopy data set: touching blob-shaped cells with instance labels.

Used for smoke tests, demos and benchmarks when no real data is at hand. The images are
made to look like the hard part of the U-Net paper's task: cells that touch or nearly
touch, so a network must learn the dim seams between them, and a background whose
illumination varies enough that a single global threshold does not separate the cells.
:func:`write_synthetic` writes a set of them as image and mask folders for prepare
(``python -m unetdist.prepare --synthetic N``). :func:`synthetic_volume` is the same in 3-D
(touching ellipsoids; ``--synthetic N --spatial-dims 3``), :func:`write_synthetic_volumes` its
TIFF stacks.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy import ndimage

from unetdist.data.imageio import PrepareError

__all__ = ["synthetic_cells", "synthetic_volume", "write_synthetic", "write_synthetic_volumes"]

# Cell semi-axes in pixels; fixed in pixels (not relative to the image) like a microscope's
# magnification, so larger images hold more cells rather than larger ones.
MIN_SEMI_AXIS = 6.0
MAX_SEMI_AXIS = 15.0
# Fraction of the image area the cells aim to cover; dense enough that most cells touch.
TARGET_COVERAGE = 0.55
# Centres closer than this fraction of the sum of two cells' radii are rejected; below 1 the
# ellipses overlap and are then cut along a seam, which makes them touch.
MIN_CENTRE_SEPARATION = 0.72
# Number of boundary harmonics (k = 2..) that make the outlines irregular.
BOUNDARY_HARMONICS = 5
# Smallest cell area kept after the seams are cut, in pixels.
MIN_CELL_AREA = 12


def synthetic_cells(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One ``size`` x ``size`` toy image and its instance labels.

    Returns ``(image, instances)``: ``image`` uint8 HxW, ``instances`` uint16 HxW with 0 for
    background and 1..K for the cells (consecutive). Pure: the output depends only on
    ``size`` and the state of ``rng``.
    """
    if size < 16:
        raise ValueError(f"synthetic_cells: size={size} is too small; use at least 16 pixels")
    cells = _place_cells(size, rng)
    instances, edge_depth = _rasterize(cells, size)
    instances = _drop_small_and_relabel(instances)
    edge_depth[instances == 0] = 1.0
    image = _render(instances, edge_depth, rng)
    return image, instances


def write_synthetic(out_dir: str | Path, count: int, image_size: int, seed: int) -> tuple[Path, Path]:
    """``count`` toy images + instance masks as TIFFs under ``out_dir/raw``; returns (images, masks) dirs."""
    import tifffile

    if count <= 0:
        raise PrepareError(f"--synthetic needs a positive number of images, got {count}")
    if image_size < 16:
        raise PrepareError(f"--image-size must be at least 16 pixels, got {image_size}")
    images_dir, masks_dir = Path(out_dir) / "raw" / "images", Path(out_dir) / "raw" / "masks"
    images_dir.mkdir(parents=True, exist_ok=True)
    masks_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        image, instances = synthetic_cells(image_size, rng)
        tifffile.imwrite(images_dir / f"cells_{index:04d}.tif", image)
        tifffile.imwrite(masks_dir / f"cells_{index:04d}.tif", instances)
    return images_dir, masks_dir


def _place_cells(size: int, rng: np.random.Generator) -> list[dict]:
    """Random ellipse-like cells by rejection sampling until the target coverage is reached."""
    cells: list[dict] = []
    centres = np.empty((0, 2))
    radii = np.empty(0)
    covered = 0.0
    target = TARGET_COVERAGE * size * size
    max_attempts = 40 * int(target / (math.pi * MIN_SEMI_AXIS * MAX_SEMI_AXIS) + 1)
    for _ in range(max_attempts):
        if covered >= target:
            break
        semi_a = rng.uniform(MIN_SEMI_AXIS, MAX_SEMI_AXIS)
        semi_b = semi_a * rng.uniform(0.55, 1.0)
        centre = rng.uniform(-0.3 * semi_a, size + 0.3 * semi_a, size=2)
        radius = 0.5 * (semi_a + semi_b)
        distances = np.hypot(*(centres - centre).T)
        if np.any(distances < MIN_CENTRE_SEPARATION * (radii + radius)):
            continue
        harmonic_damping = np.arange(1, BOUNDARY_HARMONICS + 1)[:, None]
        cells.append(
            {
                "centre": centre,
                "semi_a": semi_a,
                "semi_b": semi_b,
                "angle": rng.uniform(0.0, math.pi),
                "amplitudes": rng.normal(0.0, 0.06, size=(BOUNDARY_HARMONICS, 2)) / harmonic_damping,
            }
        )
        centres = np.vstack([centres, centre])
        radii = np.append(radii, radius)
        covered += math.pi * semi_a * semi_b
    return cells


def _rasterize(cells: list[dict], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Label each pixel with the cell whose (irregular) outline it lies deepest inside.

    A pixel's normalised depth ``d`` is 0 at a cell's centre and 1 on its outline. Where
    ellipses overlap the pixel goes to the cell with the smaller ``d``, which cuts a seam
    between them. Returns the labels and ``d`` per pixel (used to dim the cell edges).
    """
    instances = np.zeros((size, size), dtype=np.uint16)
    depth = np.full((size, size), np.inf)
    harmonics = np.arange(2, BOUNDARY_HARMONICS + 2)
    for label, cell in enumerate(cells, start=1):
        reach = 1.4 * cell["semi_a"]
        cy, cx = cell["centre"]
        top, bottom = max(0, int(cy - reach)), min(size, int(cy + reach) + 2)
        left, right = max(0, int(cx - reach)), min(size, int(cx + reach) + 2)
        if top >= bottom or left >= right:
            continue
        yy, xx = np.mgrid[top:bottom, left:right].astype(np.float64)
        dy, dx = yy - cy, xx - cx
        cos_t, sin_t = math.cos(cell["angle"]), math.sin(cell["angle"])
        along = dx * cos_t + dy * sin_t
        across = -dx * sin_t + dy * cos_t
        polar = np.arctan2(across, along)
        # Irregular outline: the ellipse radius scaled by a low-order Fourier series.
        angles = harmonics[:, None, None] * polar
        wobble = (
            1.0
            + np.tensordot(cell["amplitudes"][:, 0], np.cos(angles), axes=1)
            + np.tensordot(cell["amplitudes"][:, 1], np.sin(angles), axes=1)
        )
        cell_depth = np.sqrt((along / cell["semi_a"]) ** 2 + (across / cell["semi_b"]) ** 2) / wobble
        window = (slice(top, bottom), slice(left, right))
        wins = (cell_depth < 1.0) & (cell_depth < depth[window])
        instances[window][wins] = label
        depth[window][wins] = cell_depth[wins]
    depth[~np.isfinite(depth)] = 1.0
    return instances, depth


def _drop_small_and_relabel(instances: np.ndarray, min_size: int = MIN_CELL_AREA) -> np.ndarray:
    """Remove slivers left by seams and image borders; number the cells 1..K."""
    areas = np.bincount(instances.ravel())
    keep = areas >= min_size
    keep[0] = False
    new_ids = np.zeros(areas.shape[0], dtype=np.uint16)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint16)
    return new_ids[instances]


def _smooth_field(size: int, rng: np.random.Generator, grid: int) -> np.ndarray:
    """A smooth random field in roughly [-1, 1]: a coarse random grid upsampled cubically."""
    coarse = rng.normal(0.0, 1.0, size=(grid, grid))
    field = ndimage.zoom(coarse, size / grid, order=3, mode="nearest")[:size, :size]
    return field / (np.abs(field).max() + 1e-9)


def _render(instances: np.ndarray, edge_depth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Intensities: uneven background, per-cell brightness, dim edges, blur, shot + read noise."""
    size = instances.shape[0]
    yy, xx = np.mgrid[0:size, 0:size] / size
    gradient_angle = rng.uniform(0.0, 2 * math.pi)
    ramp = math.cos(gradient_angle) * (xx - 0.5) + math.sin(gradient_angle) * (yy - 0.5)
    # The background's bright side reaches the dimmest cells' level, so no global threshold works.
    background = 45.0 + 50.0 * ramp + 15.0 * _smooth_field(size, rng, 4)

    num_cells = int(instances.max())
    brightness = np.concatenate([[0.0], rng.uniform(55.0, 150.0, size=num_cells)])
    cell_signal = brightness[instances]
    # Dimmer towards the outline, so touching cells are separated by a faint darker seam.
    cell_signal *= 1.0 - 0.45 * np.clip(edge_depth, 0.0, 1.0) ** 4
    texture = 1.0 + 0.12 * _smooth_field(size, rng, max(4, size // 12))
    signal = np.clip(background + cell_signal * texture, 1.0, None)
    signal = ndimage.gaussian_filter(signal, sigma=1.0)

    photons_per_level = 0.5
    noisy = rng.poisson(signal * photons_per_level) / photons_per_level
    noisy = noisy + rng.normal(0.0, 5.0, size=signal.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- volumes

# Cell semi-axes of volumes in in-plane voxels: smaller than in 2-D, so that a 64-voxel cube,
# what a quick test prepares, holds a few dozen cells and tiles of 16-32 voxels hold several.
MIN_SEMI_AXIS_3D, MAX_SEMI_AXIS_3D = 4.0, 9.0
# Of the volume: below the 2-D coverage, since ellipsoids pack less densely than ellipses, and
# rejection sampling would mostly reject past this.
TARGET_COVERAGE_3D = 0.45
MIN_CELL_VOXELS = 20


def synthetic_volume(
    shape: tuple[int, int, int], rng: np.random.Generator, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
) -> tuple[np.ndarray, np.ndarray]:
    """One toy volume of ``shape`` (z, y, x) voxels and its instance labels: touching ellipsoids.

    ``spacing``: the voxel size (z, y, x) relative to each other; the cells are shaped in space,
    so a coarse z (``(4, 1, 1)``) samples each cell in few planes, as a microscope's z steps do
    (it looks squashed along z in voxels). Returns ``(image, instances)``: uint8 and uint16
    [Z, Y, X], ids 1..K consecutive. Pure: depends only on the arguments and ``rng``'s state.
    """
    if min(shape[1:]) < 16 or shape[0] < 4:
        raise ValueError(f"synthetic_volume: shape {shape} is too small; use at least 4x16x16 voxels")
    scale = np.asarray(spacing, dtype=np.float64) / spacing[1]  # in-plane voxels: the unit of the cells
    extent = np.asarray(shape) * scale
    instances, depth = np.zeros(shape, np.uint16), np.full(shape, np.inf)
    centres, radii = np.empty((0, 3)), np.empty(0)
    covered, target = 0.0, TARGET_COVERAGE_3D * float(np.prod(extent))
    mean_volume = 4 / 3 * math.pi * MIN_SEMI_AXIS_3D * MAX_SEMI_AXIS_3D**2
    for _ in range(40 * int(target / mean_volume + 1)):
        if covered >= target:
            break
        semi = rng.uniform(MIN_SEMI_AXIS_3D, MAX_SEMI_AXIS_3D) * np.array([1.0, *rng.uniform(0.6, 1.0, size=2)])
        centre = rng.uniform(-0.3 * semi[0], extent + 0.3 * semi[0])
        rotation, upper = np.linalg.qr(rng.normal(size=(3, 3)))
        rotation *= np.sign(np.diag(upper))  # a uniformly random orientation
        radius = float(semi.mean())
        if np.any(np.linalg.norm(centres - centre, axis=1) < MIN_CENTRE_SEPARATION * (radii + radius)):
            continue
        _rasterize_ellipsoid(instances, depth, len(radii) + 1, centre, semi, rotation, scale)
        centres, radii = np.vstack([centres, centre]), np.append(radii, radius)
        covered += 4 / 3 * math.pi * float(np.prod(semi))
    instances = _drop_small_and_relabel(instances, MIN_CELL_VOXELS)
    depth[instances == 0] = 1.0
    return _render_volume(instances, depth, rng, scale), instances


def _rasterize_ellipsoid(instances, depth, label, centre, semi, rotation, scale) -> None:
    """Give ``label`` the voxels inside the ellipsoid that lie deeper in it than in any cell so far
    (overlaps are cut along a seam, as :func:`_rasterize` does in 2-D)."""
    reach = 1.05 * semi.max()
    low = np.maximum(0, np.floor((centre - reach) / scale)).astype(int)
    high = np.minimum(instances.shape, np.ceil((centre + reach) / scale) + 1).astype(int)
    if np.any(low >= high):
        return
    axes = [(np.arange(a, b) * s - c) for a, b, s, c in zip(low, high, scale, centre, strict=True)]
    offsets = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    cell_depth = np.sqrt((((offsets @ rotation) / semi) ** 2).sum(axis=-1))
    window = tuple(slice(a, b) for a, b in zip(low, high, strict=True))
    wins = (cell_depth < 1.0) & (cell_depth < depth[window])
    instances[window][wins] = label
    depth[window][wins] = cell_depth[wins]


def _smooth_volume(shape: tuple[int, ...], rng: np.random.Generator, grid: int) -> np.ndarray:
    """:func:`_smooth_field` of a volume: a coarse random grid upsampled cubically, in [-1, 1]."""
    coarse = rng.normal(0.0, 1.0, size=(grid,) * len(shape))
    field = ndimage.zoom(coarse, [length / grid for length in shape], order=3, mode="nearest")
    field = field[tuple(slice(0, length) for length in shape)]
    return field / (np.abs(field).max() + 1e-9)


def _render_volume(instances: np.ndarray, edge_depth: np.ndarray, rng: np.random.Generator, scale) -> np.ndarray:
    """:func:`_render` of a volume: uneven background, per-cell brightness, dim edges, blur, noise."""
    shape = instances.shape
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    coordinates = np.meshgrid(*[np.arange(length) / length - 0.5 for length in shape], indexing="ij", sparse=True)
    ramp = sum(weight * axis for weight, axis in zip(direction, coordinates, strict=True))
    background = 45.0 + 50.0 * ramp + 15.0 * _smooth_volume(shape, rng, 4)
    brightness = np.concatenate([[0.0], rng.uniform(55.0, 150.0, size=int(instances.max()))])
    cell_signal = brightness[instances] * (1.0 - 0.45 * np.clip(edge_depth, 0.0, 1.0) ** 4)
    texture = 1.0 + 0.12 * _smooth_volume(shape, rng, max(4, min(shape) // 12))
    signal = np.clip(background + cell_signal * texture, 1.0, None)
    # the same blur in space: a voxel's width in-plane, fewer planes along a coarse z
    signal = ndimage.gaussian_filter(signal, sigma=[1.0 / size for size in scale])
    photons_per_level = 0.5
    noisy = rng.poisson(signal * photons_per_level) / photons_per_level + rng.normal(0.0, 5.0, size=shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def write_synthetic_volumes(
    out_dir: str | Path,
    count: int,
    image_size: int,
    depth_size: int,
    seed: int,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> tuple[Path, Path]:
    """``count`` toy volumes of ``depth_size`` x ``image_size`` x ``image_size`` voxels and their
    instance masks as ImageJ TIFF stacks (axes ZYX, the ``spacing`` in their metadata, so prepare
    reads it as it would a microscope's) under ``out_dir/raw/volumes``; returns (images, masks) dirs.
    Earlier ``volume_*.tif`` there are removed: the folder is the generator's, and a smaller
    count must not leave volumes of a larger one to be prepared with it."""
    import tifffile

    if count <= 0:
        raise PrepareError(f"--synthetic needs a positive number of volumes, got {count}")
    if image_size < 16 or depth_size < 4:
        raise PrepareError(f"--image-size must be at least 16 and --depth-size at least 4, got {image_size} and "
                           f"{depth_size}")  # fmt: skip
    folder = Path(out_dir) / "raw" / "volumes"
    images_dir, masks_dir = folder / "images", folder / "masks"
    for directory in (images_dir, masks_dir):
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("volume_*.tif"):
            stale.unlink()
    rng = np.random.default_rng(seed)
    z, y, x = (float(size) for size in spacing)
    metadata = {"axes": "ZYX", "spacing": z, "unit": "um"}
    for index in range(count):
        image, instances = synthetic_volume((depth_size, image_size, image_size), rng, (z, y, x))
        for directory, array in ((images_dir, image), (masks_dir, instances)):
            tifffile.imwrite(directory / f"volume_{index:04d}.tif", array, imagej=True, resolution=(1 / x, 1 / y),
                             metadata=metadata)  # fmt: skip
    return images_dir, masks_dir
