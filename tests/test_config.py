"""Config loading: defaults < YAML < CLI, and every mistake named with its key and source."""

from pathlib import Path

import pytest

from unetdist.batch_layout import batch_layout
from unetdist.config import ConfigError, TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_load_order_defaults_yaml_cli(tmp_path):
    path = write(tmp_path, "data: {root: shards}\ntrain: {max_steps: 50, global_batch_size: 4}\n")
    config = load_config([path], ["train.max_steps=7", "optim.lr=1e-2"])
    assert config.train.max_steps == 7  # CLI beats YAML
    assert config.train.global_batch_size == 4  # YAML beats defaults
    assert config.optim.lr == pytest.approx(0.01)
    assert config.model.preset == "padded"  # default


def test_every_shipped_config_loads():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config([path])


def test_unknown_key_names_file_and_suggestion(tmp_path):
    path = write(tmp_path, "data: {root: x}\nmodel: {base_widht: 8}\n")
    with pytest.raises(ConfigError, match=rf"{path}: unknown key model.base_widht \(did you mean model.base_width\?\)"):
        load_config([path])


def test_unknown_section_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="unknown section 'modle'"):
        load_config([write(tmp_path, "modle: {}\n")])
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config([write(tmp_path, "train: [unclosed\n")])
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config([tmp_path / "missing.yaml"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_steps=0", "train.max_steps=0: expected a positive number"),
        ("train.augment=true", "unknown key train.augment"),
        ("data.augment=3", "data.augment expects bool, got 3"),
        ("model.num_classes=1", "expected at least 2"),
        ("optim.momentum=1.5", "optim.momentum=1.5"),
        ("train.max_steps", "expected section.key=value"),
        ("model.preset=vnet", "model.preset='vnet' is not one of paper, article, padded"),
    ],
)
def test_bad_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_config([], ["data.root=x", override])


def test_wrong_tile_size_for_paper_suggests_valid_sizes():
    with pytest.raises(ConfigError, match=r"data.tile_size=570: .*paper.*556, 572"):
        load_config([], ["data.root=x", "model.preset=paper", "data.tile_size=570"])
    assert load_config([], ["data.root=x", "model.preset=paper", "data.tile_size=572"]).data.tile_size == 572


def test_batch_layout_derives_per_rank_and_accumulation():
    layout = batch_layout(TrainConfig(global_batch_size=32, micro_batch_size=4), world_size=4)
    assert (layout.per_rank_batch_size, layout.micro_batch_size, layout.accumulation_steps) == (8, 4, 2)
    assert batch_layout(TrainConfig(global_batch_size=8), world_size=2).accumulation_steps == 1


def test_batch_that_does_not_divide_says_what_to_change():
    with pytest.raises(ConfigError, match=r"global_batch_size=10 does not divide over 4 ranks; use a multiple of 4 \(e.g. 8 or 12\)"):
        batch_layout(TrainConfig(global_batch_size=10), world_size=4)
    with pytest.raises(ConfigError, match=r"micro_batch_size=3 must divide the per-rank batch 4"):
        batch_layout(TrainConfig(global_batch_size=8, micro_batch_size=3), world_size=2)


def test_digest_changes_with_the_math():
    base = load_config([], ["data.root=x"])
    assert base.digest() == load_config([], ["data.root=x"]).digest()
    assert base.digest() != load_config([], ["data.root=x", "model.base_width=8"]).digest()


def test_readme_documents_every_config_key():
    import dataclasses

    from unetdist.config import SECTIONS

    readme = (ROOT / "README.md").read_text()
    missing = [
        f"{section}.{f.name}"
        for section, cls in SECTIONS.items()
        for f in dataclasses.fields(cls)
        if f"`{section}.{f.name}`" not in readme
    ]
    assert not missing, f"README's config table lacks {missing}"


def test_zarr_store_replaces_the_data_root():
    """README: data.zarr_store replaces ROOT/data.zarr, so it needs no data.root."""
    config = load_config([], ["data.format=zarr", "data.zarr_store=/somewhere/cells.zarr"])
    assert config.data.zarr_store == "/somewhere/cells.zarr" and config.data.root == ""
    with pytest.raises(ConfigError, match=r"^data\.format=zarr needs data\.root .* or data\.zarr_store"):
        load_config([], ["data.format=zarr"])
    # a Zarr store does not stand in for tar shards
    with pytest.raises(ConfigError, match=r"^data\.root or data\.train_shards must be set"):
        load_config([], ["data.zarr_store=/somewhere/cells.zarr"])
