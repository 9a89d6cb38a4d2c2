"""``predict`` on OME-Zarr (NGFF 0.4 and 0.5) images written by ome-zarr-py: label images in the
image's ``labels/`` (or of their own under ``--output``) that ome-zarr-py reads back and the spec
(and ome-zarr-models, where it works) accepts; the labels list kept; an existing label image
replaced only with ``--overwrite``; bad inputs in one line; the same in an S3 bucket."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from unetdist.data import remote
from unetdist.inference import predict_array
from unetdist.inference.cli import main
from unetdist.inference.ngff_labels import PYRAMID_MIN_SIDE, _halved_levels
from unetdist.inference.zarr_io import downsample
from unetdist.instances import DecodeParams, decode_instances
from unetdist.model import build_unet

BUCKET = "unetdist-ngff"
OPTIONS = ["--device", "cpu", "--tile", "64"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Tiny padded U-Nets taking 1 and 2 channels (3 classes), saved as trainer checkpoints."""
    folder = tmp_path_factory.mktemp("ngff-models")
    paths = {}
    for channels in (1, 2):
        torch.manual_seed(channels)
        model = build_unet("padded", channels, 3, base_width=4, depth=2)
        config = {"preset": "padded", "in_channels": channels, "num_classes": 3, "base_width": 4, "depth": 2}
        paths[channels] = folder / f"model{channels}.pt"
        config = {"model": {**config, "norm": "batch"}, "data": {"tile_size": 64}}
        torch.save({"model": model.state_dict(), "config": config, "step": 1}, paths[channels])
    return paths


def _write_ngff(path: Path, version: str, image: np.ndarray, axes: str, other_label: bool = True) -> Path:
    """An NGFF image written by ome-zarr-py (5 levels), with a label image "cells" if asked."""
    import zarr
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image, write_labels

    fmt = FormatV04() if version == "0.4" else FormatV05()
    root = zarr.open_group(str(path), mode="w", zarr_format=2 if version == "0.4" else 3)
    write_image(image, root, axes=axes, fmt=fmt)
    if other_label:
        cells = np.zeros([n for n, a in zip(image.shape, axes, strict=True) if a != "c"], np.uint16)
        write_labels(cells, root, name="cells", axes=axes.replace("c", ""), fmt=fmt)
    return path


def _predict(checkpoint: Path, *args: str) -> int:
    return main(["--model", str(checkpoint), *OPTIONS, *args])


def _ome(group, version: str) -> dict:  # noqa: ANN001
    """A group's NGFF attributes: 0.4's .zattrs, 0.5's "ome" object."""
    attributes = group.attrs.asdict()
    return attributes if version == "0.4" else attributes["ome"]


def _read_back(image_path: Path, name: str = "unetdist") -> list[np.ndarray]:
    """The label image's levels as ome-zarr-py's Reader finds them among the image's nodes."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    nodes = list(Reader(parse_url(str(image_path)))())
    (label,) = [n for n in nodes if any(isinstance(s, Label) for s in n.specs) and n.metadata["name"] == name]
    return [np.asarray(level) for level in label.data]


def _check_spec(group, version: str, in_image: bool) -> dict:  # noqa: ANN001
    """The spec's required fields of a label image, then ome-zarr-models' verdict where it installs."""
    ome = _ome(group, version)
    assert group.metadata.zarr_format == (2 if version == "0.4" else 3)
    assert version == "0.4" or ome["version"] == "0.5"
    (multiscale,) = ome["multiscales"]
    assert version == "0.5" or multiscale["version"] == "0.4"
    names = [axis["name"] for axis in multiscale["axes"]]
    for dataset in multiscale["datasets"]:
        array = group[dataset["path"]]
        assert np.dtype(array.dtype).kind == "u" and array.ndim == len(names)
        scale = dataset["coordinateTransformations"][0]
        assert scale["type"] == "scale" and len(scale["scale"]) == len(names)
        assert version == "0.4" or list(array.metadata.dimension_names) == names
        assert version == "0.5" or array.metadata.dimension_separator == "/"
    assert ome["image-label"]["version"] == version
    assert (ome["image-label"].get("source") == {"image": "../../"}) == in_image
    try:
        from pydantic.errors import PydanticUserError

        if version == "0.5":
            from ome_zarr_models.v05.image_label import ImageLabel, ImageLabelAttrs
        else:
            from ome_zarr_models.v04.image_label import ImageLabel, ImageLabelAttrs
    except ImportError:
        return ome
    try:
        ImageLabel.from_zarr(group)
    except PydanticUserError:  # ome-zarr-models 1.7's v0.4 group models under pydantic >= 2.13
        ImageLabelAttrs.model_validate(ome)
    return ome


@pytest.mark.parametrize(
    ("version", "axes", "shape"), [("0.4", "cyx", (2, 96, 128)), ("0.5", "tczyx", (1, 2, 2, 64, 80))]
)
def test_labels_written_into_the_image(
    checkpoints: dict[int, Path], tmp_path: Path, version: str, axes: str, shape: tuple[int, ...]
) -> None:
    import zarr

    image = np.random.default_rng(0).integers(0, 4000, shape).astype(np.uint16)
    path = _write_ngff(tmp_path / "cells.ome.zarr", version, image, axes)
    assert _predict(checkpoints[2], "--input", str(path), "--block", "48") == 0  # several blocks a plane

    levels = _read_back(path)
    group = zarr.open_group(str(path), mode="r")
    keep = [i for i, axis in enumerate(axes) if axis != "c"]
    image_levels = _ome(group, version)["multiscales"][0]["datasets"]
    assert [level.shape for level in levels] == [
        tuple(group[dataset["path"]].shape[i] for i in keep) for dataset in image_levels
    ]
    assert levels[0].dtype == np.uint8 and len(levels) == 5
    # each t/z plane predicted as a 2-D image: what predict_array gives for that plane
    model = build_unet("padded", 2, 3, base_width=4, depth=2)
    model.load_state_dict(torch.load(checkpoints[2])["model"])
    planes = image.reshape(-1, 2, *shape[-2:]) if axes == "cyx" else np.moveaxis(image[0], 1, 0)
    for index, plane in enumerate(planes):
        expected = predict_array(model.eval(), plane, tile=64, device="cpu")
        np.testing.assert_array_equal(levels[0].reshape(-1, *shape[-2:])[index], expected)
    np.testing.assert_array_equal(levels[1], levels[0][..., 1::2, 1::2])  # nearest, 2x smaller

    ome = _check_spec(group["labels/unetdist"], version, in_image=True)
    for ours, theirs in zip(ome["multiscales"][0]["datasets"], image_levels, strict=True):
        scale = theirs["coordinateTransformations"][0]["scale"]
        assert ours["coordinateTransformations"][0]["scale"] == [scale[i] for i in keep]
    assert [axis["name"] for axis in ome["multiscales"][0]["axes"]] == [axes[i] for i in keep]
    assert ome["image-label"]["colors"][0] == {"label-value": 1, "rgba": [230, 25, 75, 255]}
    assert _ome(group["labels"], version)["labels"] == ["cells", "unetdist"]
    assert not [p.name for p in (path / "labels").iterdir() if p.name.startswith(".unetdist")]
    if version == "0.5":
        try:
            from ome_zarr_models.v05.image import Image
            from ome_zarr_models.v05.labels import Labels
        except ImportError:
            return
        Labels.from_zarr(group["labels"])
        Image.from_zarr(group)


def test_an_existing_label_is_replaced_only_with_overwrite(
    checkpoints: dict[int, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import zarr

    image = np.random.default_rng(1).integers(0, 255, (64, 96)).astype(np.uint8)
    path = _write_ngff(tmp_path / "one.zarr", "0.4", image, "yx", other_label=False)
    seg = ["--input", str(path), "--label-name", "seg"]
    assert _predict(checkpoints[1], *seg) == 0
    first = zarr.open_array(str(path / "labels" / "seg" / "0"))[:]
    capsys.readouterr()
    assert _predict(checkpoints[1], *seg, "--instances") == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("predict:")]
    assert lines == [
        f"predict: error: {path}/labels/seg: a label image named 'seg' exists: pass --overwrite to replace "
        "it, or another --label-name"
    ]
    np.testing.assert_array_equal(zarr.open_array(str(path / "labels" / "seg" / "0"))[:], first)

    (path / "labels" / ".seg.partial" / "junk").mkdir(parents=True)  # left by a run that stopped
    assert _predict(checkpoints[1], *seg, "--instances", "--overwrite") == 0
    replaced = zarr.open_array(str(path / "labels" / "seg" / "0"))
    assert replaced.dtype == np.uint32 and replaced[:].max() >= 1  # instance ids now
    # decoded from the whole plane's probabilities (kept as float16 meanwhile), as the model decodes
    model = build_unet("padded", 1, 3, base_width=4, depth=2)
    model.load_state_dict(torch.load(checkpoints[1])["model"])
    probabilities = predict_array(model.eval(), image, tile=64, device="cpu", return_probabilities=True)
    expected = decode_instances(probabilities.astype(np.float16).astype(np.float32), DecodeParams())
    np.testing.assert_array_equal(replaced[:], expected)
    assert sorted(p.name for p in (path / "labels").iterdir()) == [".zattrs", ".zgroup", "seg"]
    assert zarr.open_group(str(path / "labels")).attrs["labels"] == ["seg"]


def test_output_folder_gets_a_label_image_of_its_own(checkpoints: dict[int, Path], tmp_path: Path) -> None:
    import zarr

    image = np.random.default_rng(2).integers(0, 255, (1, 128, 120)).astype(np.uint8)
    path = _write_ngff(tmp_path / "cells.ome.zarr", "0.5", image, "cyx", other_label=False)
    out = tmp_path / "out"
    assert _predict(checkpoints[1], "--input", str(path), "--level", "1", "--output", str(out)) == 0
    group = zarr.open_group(str(out / "cells_unetdist.zarr"), mode="r")
    datasets = _check_spec(group, "0.5", in_image=False)["multiscales"][0]["datasets"]
    assert [group[dataset["path"]].shape for dataset in datasets] == [(64, 60), (32, 30), (16, 15), (8, 7)]
    assert datasets[0]["coordinateTransformations"][0]["scale"] == [2.0, 2.0]  # the input's level 1
    assert not (path / "labels").exists()  # the image itself untouched


def test_bad_inputs_are_one_line(
    checkpoints: dict[int, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import zarr

    image = np.random.default_rng(3).integers(0, 255, (2, 64, 64)).astype(np.uint8)
    path = _write_ngff(tmp_path / "img.zarr", "0.5", image, "cyx", other_label=False)
    plain = tmp_path / "plain.zarr"
    zarr.create_array(store=str(plain), data=image[0])
    swapped = _write_ngff(tmp_path / "swapped.zarr", "0.4", image, "cyx", other_label=False)
    attributes = zarr.open_group(str(swapped)).attrs
    multiscales = attributes["multiscales"]
    multiscales[0]["axes"][1:] = multiscales[0]["axes"][:0:-1]  # c, x, y: valid NGFF, not for us
    attributes["multiscales"] = multiscales
    cases = [
        ([str(plain)], 2, f"{plain}: not an OME-Zarr (NGFF) image, a Zarr group with multiscales metadata, "
         "so --output is needed"),
        ([str(path), "--level", "5"], 2, f"{path}: level 5 out of range: the image has 5 level(s), 0-4 "
         "(s0, s1, s2, s3, s4)"),
        ([str(swapped)], 2, f"{swapped}: unsupported axes cxy: expected [t][c][z]yx (yx, cyx, czyx, tczyx, "
         "...), each t/z plane predicted as a 2-D image"),
        ([str(path)], 1, f"{path}: 2 channel(s) (axes cyx, shape (2, 64, 64)), the model expects 1"),
    ]  # fmt: skip
    capsys.readouterr()
    for inputs, channels, message in cases:
        assert _predict(checkpoints[channels], "--input", *inputs) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert [line for line in err.splitlines() if line.startswith("predict:")] == [
            f"predict: error: {message}"
        ]
    assert not (path / "labels").exists()


def test_pyramid_helpers() -> None:
    import zarr

    shapes, transforms = _halved_levels((3, 600, 1000), ({"type": "scale", "scale": [2.0, 0.5, 0.5]},))
    assert shapes == [(3, 600, 1000), (3, 300, 500), (3, 150, 250)]
    assert max(shapes[-2][-2:]) > PYRAMID_MIN_SIDE >= max(shapes[-1][-2:])
    assert transforms[2] == (
        {"type": "scale", "scale": [2.0, 2.0, 2.0]}, {"type": "translation", "translation": [0.0, 0.75, 0.75]}
    )
    source = zarr.create_array(store={}, shape=(4, 9, 10), chunks=(1, 4, 4), dtype="uint32")
    source[:] = np.arange(360).reshape(4, 9, 10)
    target = zarr.create_array(store={}, shape=(2, 4, 5), chunks=(1, 3, 3), dtype="uint32")
    for rank in range(3):  # three ranks, each its own chunks
        downsample(source, target, rank, 3)
    np.testing.assert_array_equal(target[:], source[:][np.ix_([1, 3], [1, 3, 5, 7], [1, 3, 5, 7, 9])])


def test_s3_image_gets_its_labels_there(s3, checkpoints: dict[int, Path], tmp_path: Path) -> None:
    import zarr

    image = np.random.default_rng(4).integers(0, 255, (2, 1, 64, 72)).astype(np.uint8)
    local = _write_ngff(tmp_path / "cells.ome.zarr", "0.5", image, "czyx")
    s3.create_bucket(BUCKET)
    url = f"s3://{BUCKET}/{tmp_path.name}/cells.ome.zarr"
    for file in sorted(p for p in local.rglob("*") if p.is_file()):
        remote.upload_file(file, f"{url}/{file.relative_to(local).as_posix()}")
    assert _predict(checkpoints[2], "--input", str(local)) == 0
    expected = zarr.open_group(str(local), mode="r")

    assert _predict(checkpoints[2], "--input", url) == 0
    group = zarr.open_group(store=remote.zarr_store(url), mode="r")
    _check_spec(group["labels/unetdist"], "0.5", in_image=True)
    for level in range(5):
        key = f"labels/unetdist/{level}"
        np.testing.assert_array_equal(group[key][:], expected[key][:])
    assert group["labels"].attrs["ome"]["labels"] == ["cells", "unetdist"]
    assert _predict(checkpoints[2], "--input", url) == 2  # exists: refused

    # replaced by a smaller one (from level 1): the old image's extra objects go too
    assert _predict(checkpoints[2], "--input", url, "--overwrite", "--level", "1") == 0
    keys = [key.removeprefix(f"{url}/") for key in remote.list_objects(f"{url}/labels")]
    assert not [key for key in keys if ".partial" in key], "the temporary copy is deleted"
    assert not [key for key in keys if key.startswith("labels/unetdist/4/")], "the old level 4 is gone"
    assert group["labels/unetdist/0"].shape == (1, 32, 36)
    assert len(list(group["labels/unetdist"].arrays())) == 4
    _check_spec(group["labels/unetdist"], "0.5", in_image=True)
    np.testing.assert_array_equal(group["s0"][:], image)  # the image itself untouched

    # instance ids: the probabilities wait in a scratch array in the bucket, deleted once decoded
    assert _predict(checkpoints[2], "--input", url, "--overwrite", "--instances") == 0
    assert group["labels/unetdist/0"].dtype == np.uint32 and group["labels/unetdist/0"][:].max() >= 1
    keys = [key.removeprefix(f"{url}/") for key in remote.list_objects(f"{url}/labels")]
    assert not [key for key in keys if ".partial" in key], keys
