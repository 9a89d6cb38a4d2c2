"""Run configuration: frozen dataclasses per section, loaded as defaults < YAML file(s) < CLI overrides.

A config is read once at start-up and never changed afterwards::

    config = load_config(["configs/quickstart.yaml"], ["train.max_steps=200", "model.base_width=16"])

Every mistake is a ``ConfigError`` that names the key, where the value came from (file or
command line) and what was expected, so a typo never starts a run that silently ignores it.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from unetdist.redaction import redact, redact_values


class ConfigError(ValueError):
    """A config key, type or value that cannot run; its message shows a URL's credentials as ``***``."""

    def __str__(self) -> str:
        return redact(super().__str__())


def _choice(*allowed: str, default: str) -> Any:
    return field(default=default, metadata={"choices": allowed})


@dataclass(frozen=True)
class DataConfig:
    format: str = _choice("webdataset", "zarr", "ome-zarr", default="webdataset")
    root: str = ""  # folder written by `python -m unetdist.prepare` (holds dataset.json)
    train_shards: str = ""  # brace pattern / path list; overrides root's train shards
    val_shards: str = ""
    image_key: str = "image"  # tar members: KEY.<image_key>.npy|png|tif|tiff, the same for mask and weight
    mask_key: str = "mask"
    weight_key: str = "weight"
    # auto: a prepared data set's dataset.json says (older ones, and all other data: classes);
    # instances: ids, trained as 0/1 (or loss.target=boundary), validated by instance; binary: non-zero -> 1
    mask_kind: str = _choice("auto", "classes", "instances", "binary", default="auto")
    zarr_store: str = ""  # format=zarr: the store; empty: ROOT/data.zarr
    image_array: str = ""  # format=zarr, a store of your own: arrays [N, C, H, W] / [N, H, W] (and weight)
    mask_array: str = ""
    weight_array: str = ""
    images: list[str] = field(default_factory=list)  # format=ome-zarr: NGFF image paths/URLs or globs
    labels: str = ""  # format=ome-zarr: the label image labels/<name> beside each image
    level: int = 0  # format=ome-zarr: the multiscale level read (0: full resolution)
    channels: list[int] = field(default_factory=list)  # format=ome-zarr: channel indices; empty: all
    val_images: list[str] = field(default_factory=list)  # ome-zarr: validation images; empty: val_fraction
    val_fraction: float = 0.1  # ome-zarr, plain zarr arrays: held out by image (or by region for one image)
    tile_size: int = 96  # model input tile; stored tiles are cropped to it
    tile_depth: int = 0  # model.spatial_dims=3: tiles are tile_depth x tile_size x tile_size; 0: a cube
    ignore_index: int = -1  # a mask value that counts in no loss and no metric (sparse annotation); -1: none
    num_workers: int = 1
    prefetch_factor: int = 2  # micro-batches in flight per worker
    worker_start_method: str = _choice("default", "fork", "spawn", "forkserver", default="default")
    tiles_per_image: int = 16  # zarr whole-image stores: training tiles sampled per image and epoch
    block_size: int = 0  # samples kept together in the shuffle; 0: 1 for tar shards, the chunk length for zarr
    epoch_end: str = _choice("pad", "drop", default="pad")  # make each epoch a whole number of global batches
    on_error: str = _choice("raise", "skip", default="raise")  # a bad sample: stop, or skip + count + log
    augment: bool = True  # flips and 90-degree rotations
    augment_intensity: bool = False  # gamma, scale, shift
    augment_noise_std: float = 0.0  # Gaussian noise in unit-range intensity; 0: off
    augment_elastic: bool = False  # the paper's elastic deformation
    augment_rotate_3d: bool = False  # volumes with isotropic spacing and cubic tiles: any of the cube's 48 symmetries instead of in-plane turns and a z flip
    elastic_sigma_px: float = 10.0
    augment_on: str = _choice("worker", "device", default="worker")  # device: the trainer calls to_model_input
    foreground_fraction: float = 0.0  # share of training crops centred on a foreground pixel
    normalize: str = _choice("zscore", "range", "percentile", default="zscore")  # percentile: clip 1-99.8, then z
    pin_memory: bool = True  # pinned host memory for non-blocking copies (CUDA only; ignored on CPU)
    # Remote data (root/shards/store at s3://, gs://, az://, https://): credentials only from the environment
    cache_dir: str = ""  # node-local cache of remote bytes, shared by the node's ranks; empty: none
    cache_limit_gb: float = 20.0  # the cache never holds more
    readahead_mb: float = 256.0  # per worker: bytes of future micro-batches fetched ahead
    requests_in_flight: int = 16  # per worker: concurrent GETs
    fetch_span_mb: float = 8.0  # a node cache that holds the split: a GET brings this much of a shard (fewer GETs)
    remote_attempts: int = 6  # per request, with exponential backoff and jitter; 403/404 are not retried
    remote_timeout_s: float = 60.0  # per request

    def __post_init__(self) -> None:
        checks = {
            "data.cache_limit_gb": (self.cache_limit_gb > 0, "a positive number"),
            "data.readahead_mb": (self.readahead_mb >= 0, "zero or a positive number"),
            "data.requests_in_flight": (self.requests_in_flight >= 1, "a positive number"),
            "data.fetch_span_mb": (self.fetch_span_mb >= 0, "zero or a positive number"),
            "data.remote_attempts": (self.remote_attempts >= 1, "a positive number"),
            "data.remote_timeout_s": (self.remote_timeout_s > 0, "a positive number"),
            "data.block_size": (self.block_size >= 0, "zero or a positive number"),
            "data.level": (self.level >= 0, "zero or a positive number"),
            "data.val_fraction": (0.0 <= self.val_fraction < 1.0, "a fraction in [0, 1)"),
            "data.tiles_per_image": (self.tiles_per_image >= 1, "a positive number"),
            "data.prefetch_factor": (self.prefetch_factor >= 1, "a positive number"),
            "data.foreground_fraction": (0.0 <= self.foreground_fraction <= 1.0, "a fraction in [0, 1]"),
            "data.augment_noise_std": (self.augment_noise_std >= 0.0, "zero or a positive number"),
            "data.elastic_sigma_px": (self.elastic_sigma_px >= 0.0, "zero or a positive number"),
            "data.tile_depth": (self.tile_depth >= 0, "zero or a positive number"),
            "data.ignore_index": (-1 <= self.ignore_index <= 255, "-1 (none) or a mask value 0..255"),
        }
        for key, (ok, expected) in checks.items():
            if not ok:
                raise ConfigError(f"{key}={getattr(self, key.split('.')[1])!r}: expected {expected}")


@dataclass(frozen=True)
class ModelConfig:
    preset: str = _choice("paper", "article", "padded", "cicek", default="padded")
    spatial_dims: int = 2  # 3: volumes [C, Z, Y, X] (cicek: the valid-conv 3-D U-Net of Cicek et al. 2016)
    z_pools: int = -1  # spatial_dims=3: levels that pool z, the deepest ones (coarse z spacing); -1: all
    in_channels: int = 1
    num_classes: int = 2
    base_width: int = 0  # 0: the preset's own (paper/article 64, padded 32)
    depth: int = 0  # 0: the preset's own (paper 4, article 3, padded 4)
    norm: str = _choice("batch", "instance", "group", "none", default="batch")
    sync_batchnorm: bool = False


@dataclass(frozen=True)
class LossConfig:
    kind: str = _choice("ce", "dice_ce", default="ce")
    # the paper's border weight map: auto uses a stored one, computes it from instance masks
    # (data.mask_kind=instances), or trains without it for class masks; true requires one
    use_weight_map: str = _choice("auto", "true", "false", default="auto")
    dice_weight: float = 1.0
    # semantic: the classes of the mask (instances, binary: background / foreground); boundary:
    # background / interior / boundary of each object, from instance masks (model.num_classes=3)
    target: str = _choice("semantic", "boundary", default="semantic")
    boundary_width_px: int = 2  # boundary target: the rim width (the plan sets it from the object sizes)

    def __post_init__(self) -> None:
        if self.boundary_width_px < 1:
            raise ConfigError(f"loss.boundary_width_px={self.boundary_width_px}: expected at least 1")


@dataclass(frozen=True)
class OptimConfig:
    name: str = _choice("sgd", "adamw", default="adamw")
    lr: float = 1e-3
    momentum: float = -1.0  # SGD only; -1: 0.99 for paper/article (the paper's), else 0.9
    weight_decay: float = 0.0
    schedule: str = _choice("constant", "cosine", default="cosine")
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine ends at lr * min_lr_ratio
    grad_clip_norm: float = 0.0  # 0: no clipping
    fused: bool = True  # fused optimizer kernels on CUDA (also no host sync for fp16's scaler); ignored on CPU


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = "runs/default"
    max_steps: int = 200  # optimizer steps
    global_batch_size: int = 8  # the truth; per-rank batch and accumulation are derived
    micro_batch_size: int = 0  # per-rank forward batch; 0: the whole per-rank batch
    precision: str = _choice("fp32", "bf16", "fp16", default="fp32")
    device: str = _choice("auto", "cpu", "cuda", default="auto")
    backend: str = _choice("auto", "gloo", "nccl", default="auto")
    seed: int = 0
    log_every: int = 10
    val_every: int = 50  # 0: validate only at the end
    val_at_start: bool = False  # a step-0 baseline for the validation curves
    val_max_batches: int = 0  # 0: the whole validation split
    channels_last: bool = False  # GPU fast path
    compile: bool = False  # torch.compile the model (GPU fast path)
    progress: bool = True  # progress bar on rank 0
    timeout_s: int = 600  # process-group collective timeout
    compile_mode: str = _choice("default", "reduce-overhead", "max-autotune", default="default")
    cudnn_benchmark: bool = True  # autotune conv kernels for the fixed tile size (CUDA)
    static_graph: bool = False  # DDP static graph: the same parameters are used every step
    activation_checkpointing: bool = False  # recompute activations in backward: larger tiles, more compute
    record_samples: bool = False  # append each step's sample keys to output_dir/samples/rank-R.jsonl
    watchdog_s: int = 0  # dump all stacks and exit when no step finishes for this long; 0: off
    tune_decoding: bool = True  # instance masks: grid-search the decoding thresholds for AP on validation at the end
    stop_check_every: int = 5  # steps between the ranks' agreement on a stop signal (a host-side all-reduce)


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True
    tracking_uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the cwd
    experiment: str = "unetdist"
    run_name: str = ""
    log_model: bool = True  # the final and the best model as MLflow pyfunc models
    register_as: str = ""  # also register them under this model-registry name ("" = don't)
    # checkpoint artifacts: every save, only the last (at the end), best + last, or none (a tag names the path)
    log_checkpoints: str = _choice("all", "last", "best", "none", default="last")
    image_every: int = 50  # overlay panels of fixed val tiles at validations whose step this divides; 0: off
    num_images: int = 4  # how many val tiles of rank 0 get a panel
    system_metrics: bool = False  # MLflow system metrics (CPU/GPU/memory); needs psutil
    queue_size: int = 10000  # logging calls held in memory while the server is away; more spill to disk
    request_timeout_s: int = 10  # per HTTP request of the background sender
    flush_timeout_s: float = 30.0  # at the end, wait at most this long for a dead server, then write the rest to a file

    def __post_init__(self) -> None:
        for key, smallest in (("image_every", 0), ("num_images", 0), ("queue_size", 1), ("request_timeout_s", 1)):
            if getattr(self, key) < smallest:
                raise ConfigError(f"tracking.{key}={getattr(self, key)}: expected at least {smallest}")
        if self.flush_timeout_s < 0:
            raise ConfigError(f"tracking.flush_timeout_s={self.flush_timeout_s}: expected zero or more seconds")


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100  # 0: only at the end
    keep: int = 3
    resume: str = "never"  # never | auto | a checkpoint path
    keep_every: int = 0  # also keep every K-th step's checkpoint for good; 0: none
    async_save: bool = False  # write on a background thread after copying the state to CPU


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The config as it is written and compared (config.yaml, checkpoints, MLflow params, ``digest``).

        Credentials in URL values are ``***`` (``unetdist.redaction``): they never reach a
        file, and a new password or a re-signed URL is the same config on resume. The
        live values, credentials included, are the attributes.
        """
        return redact_values(dataclasses.asdict(self))

    def digest(self) -> str:
        """Short hash of the resolved config (credentials redacted), for tags and checkpoint checks."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


SECTIONS: dict[str, type] = typing.get_type_hints(Config)
# Keys a resumed job may change without changing the math: resume does not refuse them
# (train.py) and MLflow records their new value per attempt (a tag, not a conflicting param).
RESUME_SAFE_KEYS: frozenset[str] = frozenset({
    "train.max_steps", "train.record_samples", "train.watchdog_s", "checkpoint.keep_every",
    "checkpoint.async_save", "train.compile", "train.compile_mode", "train.cudnn_benchmark", "train.log_every",
    "train.val_every", "train.val_max_batches", "train.progress", "train.output_dir", "train.timeout_s",
    "checkpoint.every", "checkpoint.keep", "checkpoint.resume", "data.num_workers", "data.pin_memory",
    "tracking.log_model", "tracking.log_checkpoints", "train.micro_batch_size", "train.device", "train.backend",
    "data.prefetch_factor", "data.worker_start_method", "data.augment_on", "data.cache_dir", "data.cache_limit_gb",
    "data.readahead_mb", "data.requests_in_flight", "data.remote_attempts", "data.remote_timeout_s", "data.fetch_span_mb",
    *(f"tracking.{f.name}" for f in dataclasses.fields(TrackingConfig)),
})  # fmt: skip

# ---------------------------------------------------------------- loading


def load_config(files: list[str | Path] = (), overrides: list[str] = ()) -> Config:
    """Defaults < each YAML file in order < dotted ``key=value`` overrides; then validate."""
    raw: dict[str, dict[str, Any]] = {}
    origin: dict[str, str] = {}  # "section.key" -> where the value came from
    for path in files:
        _merge(raw, origin, _read_yaml(Path(path)), str(path))
    for item in overrides:
        section, key, value = _parse_override(item)
        _merge(raw, origin, {section: {key: value}}, "the command line")
    config = _build(raw, origin)
    validate(config)
    return config


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data, model, ...), got {type(data).__name__}")
    return data


def _parse_override(item: str) -> tuple[str, str, Any]:
    dotted, sep, text = item.partition("=")
    parts = dotted.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"command-line override {item!r}: expected section.key=value, e.g. train.max_steps=200")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return parts[0], parts[1], value


def _merge(raw: dict, origin: dict, incoming: dict, source: str) -> None:
    for section, values in incoming.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section {section!r}; expected one of {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(SECTIONS[section])}
        for key, value in values.items():
            if key not in known:
                hint = _closest(key, known)
                raise ConfigError(
                    f"{source}: unknown key {section}.{key}" + (f" (did you mean {section}.{hint}?)" if hint else "")
                )
            raw.setdefault(section, {})[key] = value
            origin[f"{section}.{key}"] = source


def _closest(name: str, candidates: set[str]) -> str | None:
    return next(iter(difflib.get_close_matches(name, sorted(candidates), n=1)), None)


def _build(raw: dict, origin: dict) -> Config:
    sections = {}
    for name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        values = {}
        for f in dataclasses.fields(cls):
            if f.name not in raw.get(name, {}):
                continue
            dotted = f"{name}.{f.name}"
            value = _coerce(raw[name][f.name], hints[f.name], dotted, origin[dotted])
            allowed = f.metadata.get("choices")
            if allowed and value not in allowed:
                raise ConfigError(f"{origin[dotted]}: {dotted}={value!r} is not one of {', '.join(allowed)}")
            values[f.name] = value
        sections[name] = cls(**values)
    return Config(**sections)


def _coerce(value: Any, expected: Any, dotted: str, source: str) -> Any:
    if isinstance(expected, types.UnionType):
        expected = next(t for t in typing.get_args(expected) if t is not type(None))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is float and isinstance(value, str):
        # YAML 1.1 reads "1e-3" (no dot) as a string; users mean a number
        try:
            return float(value)
        except ValueError:
            pass
    if expected is str and isinstance(value, (int, float)):
        return str(value).lower()  # a bool for a choice like loss.use_weight_map: "true"/"false"
    if typing.get_origin(expected) is list:
        (item,) = typing.get_args(expected)
        items = [value] if isinstance(value, (str, int)) and not isinstance(value, bool) else value
        if isinstance(items, list) and all(isinstance(v, item) and not isinstance(v, bool) for v in items):
            return list(items)
        raise ConfigError(f"{source}: {dotted} expects a list of {item.__name__}, got {value!r}")
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        raise ConfigError(
            f"{source}: {dotted} expects {expected.__name__}, got {value!r} ({type(value).__name__})"
        )
    return value


# ---------------------------------------------------------------- validation


def validate(config: Config) -> None:
    """Reject values that cannot run, naming the key and what is expected."""
    positive = {
        "train.max_steps": config.train.max_steps,
        "train.global_batch_size": config.train.global_batch_size,
        "train.log_every": config.train.log_every,
        "train.timeout_s": config.train.timeout_s,
        "train.stop_check_every": config.train.stop_check_every,
        "data.tile_size": config.data.tile_size,
        "model.in_channels": config.model.in_channels,
        "checkpoint.keep": config.checkpoint.keep,
    }
    non_negative = {
        "train.micro_batch_size": config.train.micro_batch_size, "train.val_every": config.train.val_every,
        "train.val_max_batches": config.train.val_max_batches, "data.num_workers": config.data.num_workers,
        "model.base_width": config.model.base_width, "model.depth": config.model.depth,
        "checkpoint.every": config.checkpoint.every, "optim.weight_decay": config.optim.weight_decay,
        "optim.warmup_steps": config.optim.warmup_steps, "optim.grad_clip_norm": config.optim.grad_clip_norm,
    }  # fmt: skip
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value}: expected a positive number")
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key}={value}: expected zero or a positive number")
    if config.loss.target == "boundary" and config.model.num_classes != 3:
        raise ConfigError(
            f"loss.target=boundary trains background / interior / boundary: set model.num_classes=3 "
            f"(it is {config.model.num_classes})"
        )
    if config.model.num_classes < 2:
        raise ConfigError(f"model.num_classes={config.model.num_classes}: expected at least 2 (background + one class)")
    if config.optim.lr <= 0:
        raise ConfigError(f"optim.lr={config.optim.lr}: expected a positive learning rate")
    if not (config.optim.momentum == -1.0 or 0.0 <= config.optim.momentum < 1.0):
        raise ConfigError(f"optim.momentum={config.optim.momentum}: expected 0 <= momentum < 1 (or -1 for the preset's)")
    if not 0.0 <= config.optim.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio={config.optim.min_lr_ratio}: expected a value in [0, 1]")
    if config.data.format == "zarr" and not (config.data.root or config.data.zarr_store):
        raise ConfigError("data.format=zarr needs data.root (a `prepare --format zarr` folder) or data.zarr_store (the store)")
    if config.data.format == "ome-zarr" and not config.data.images:
        raise ConfigError("data.format=ome-zarr needs data.images: NGFF image paths or URLs (globs allowed)")
    if config.data.format == "webdataset" and not (config.data.root or config.data.train_shards):
        raise ConfigError("data.root or data.train_shards must be set: the folder `python -m unetdist.prepare` wrote")
    if config.checkpoint.resume not in ("never", "auto") and not Path(config.checkpoint.resume).exists():
        raise ConfigError(f"checkpoint.resume={config.checkpoint.resume!r}: expected never, auto or an existing checkpoint")
    _validate_tile_shape(config)
    shape = tile_shape(config)  # rotations of the cube map a tile onto itself only when it is a cube
    if config.data.augment_rotate_3d and not (len(shape) == 3 and len(set(shape)) == 1 and config.data.augment):
        raise ConfigError(f"data.augment_rotate_3d=true needs model.spatial_dims=3, data.augment=true and a cubic tile (data.tile_depth "
                          f"0 or = data.tile_size): got {config.model.spatial_dims}, {config.data.augment}, {'x'.join(map(str, shape))}")


def tile_shape(config: Config) -> tuple[int, ...]:
    """The model's input tile per spatial axis: (tile_size, tile_size), or in 3-D (tile_depth or tile_size, ...)."""
    size = config.data.tile_size
    return (config.data.tile_depth or size, size, size) if config.model.spatial_dims == 3 else (size, size)


def _validate_tile_shape(config: Config) -> None:
    from unetdist.model.sizes import check_input_shape, check_input_size, default_depth  # (torch-free)

    model, shape, depth = config.model, tile_shape(config), config.model.depth or default_depth(config.model.preset)
    if model.spatial_dims not in (2, 3) or not -1 <= model.z_pools <= depth or (
            model.spatial_dims == 3 and config.data.format not in ("zarr", "ome-zarr", "webdataset")):  # fmt: skip
        raise ConfigError(f"model.spatial_dims={model.spatial_dims}, model.z_pools={model.z_pools}, data.format="
                          f"{config.data.format}: expected 2 (images) or 3 (volumes: format zarr or webdataset "
                          f"from `prepare --spatial-dims 3`, or ome-zarr), z_pools -1 (every level) or 0..{depth}")
    try:  # a 2-D tile is square: its message names the one size, as it always has
        check_input_size(model.preset, depth, shape[0]) if len(shape) == 2 else check_input_shape(
            model.preset, depth, shape, z_pools=None if model.z_pools < 0 else model.z_pools)
    except ValueError as err:
        key = f"data.tile_size={shape[0]}" if len(shape) == 2 else f"data.tile_depth x tile_size={shape[0]}x{shape[1]}"
        raise ConfigError(f"{key}: {err}") from None


def save_config(config: Config, path: Path) -> None:
    """Write the resolved config as YAML, credentials redacted (``Config.to_dict``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
