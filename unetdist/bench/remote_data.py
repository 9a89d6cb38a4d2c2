"""``python -m unetdist.bench data --source s3``: the tar loader reading from an S3 server, against itself locally.

    source /tmp/s3st/env.sh    # AWS_ENDPOINT_URL and keys; S3_FAULTS_FILE and S3_REQUESTS_LOG of a test server
    python -m unetdist.bench data --source s3 --tiles 1024 --tile 256 --batch 32 --latency-ms 20,50

Writes the synthetic npy shards of ``bench data`` and their indexes, and uploads shards, indexes
and ``dataset.json`` to ``--url`` (the bucket is made with boto3 when missing: obstore cannot).
Then, per latency injected into GETs through the server's faults file (``S3_FAULTS_FILE``, as
``tests/services/s3_faults.py`` reads it; without one: the server's own, ``latency_ms=server``),
``--repeats`` rounds of two fresh loaders with the same config and ``--workers`` workers, each
read for two epochs as a training run reads them: the local folder, and the URL with an empty
``data.cache_dir`` larger than the data. ``remote_vs_local_cold_<L>ms``: the first epochs' rates
(from the loader's construction: worker start, ``dataset.json``, shard indexes and the first
requests count, on both sides); ``remote_vs_local_warm_<L>ms``: the second epochs' (the cache
then holds every sample). Each is the median of the rounds' ratios.

GETs and bytes come from the server's request log (``S3_REQUESTS_LOG``): each shard GET of the
remote loaders, its byte range mapped through the shard's index to the samples it brought.
``gets_per_sample`` is GETs over the distinct samples brought; ``bytes_fetched_over_used`` the bytes
sent over those samples' member bytes (a sample fetched twice counts once: the second fetch is
waste). Without a request log both come from the fetcher's own counters
(:class:`~unetdist.data.fetch.FetchCounters`) over one more cold epoch read in this process,
without readahead or cache: a DataLoader worker's counters cannot be read from here.
``server_cpu_ms_per_get``: the server's CPU time per GET when it runs on this machine (its health
endpoint names its pid), where it shares the cores with the loader.

The readahead window (``data.readahead_mb``) is at most a quarter epoch over all workers, as for
a data set much larger than the window; a window of more than an epoch fetches a sample again
before its first fetch is cached, which a small bench data set would make the main cost.
Targets (issue 16), printed, not asserted: cold >= 0.8 at 20 ms, warm >= 0.95, bytes fetched
over used <= 1.1.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from bisect import bisect_left
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np

from unetdist.config import DataConfig
from unetdist.data.sources.tar_index import TarIndex

TARGETS = "cold_20ms>=0.8,warm>=0.95,bytes_fetched_over_used<=1.1"
REMOTE_DEFAULTS = {"batch": 32, "repeats": 3}
WriteTiles = Callable[[Path, int, int], None]  # bench data's writer: (folder, tiles, tile px)


def run(args, write_tiles: WriteTiles) -> dict[str, float | int | str]:
    """The figures of ``bench data --source s3``; ``write_tiles`` is passed in (no import circle)."""
    batch = args.batch or REMOTE_DEFAULTS["batch"]
    repeats = args.repeats or REMOTE_DEFAULTS["repeats"]
    faults_file = os.environ.get("S3_FAULTS_FILE", "")
    latencies: list[int | str] = [*_latencies(args.latency_ms)] if faults_file else ["server"]
    requests_log = os.environ.get("S3_REQUESTS_LOG", "")
    with tempfile.TemporaryDirectory() as scratch:
        bench = Bench.prepare(Path(args.dir or scratch), args.url, args.tiles, args.tile, args.workers, batch,
                              write_tiles)
        if args.fetch_span_mb is not None:
            bench.remote = dataclasses.replace(bench.remote, fetch_span_mb=args.fetch_span_mb)
        log = _RequestLog(requests_log, bench) if requests_log else None
        server_pid = _server_pid()
        _first_micro_batch(bench.remote, bench.options)
        figures: dict[str, float | int | str] = {}
        fetched, server_cpu_s = Fetched(), 0.0
        for latency in latencies:
            rounds = []
            with _latency_injected(faults_file, latency):
                for round_index in range(repeats):
                    _progress(f"latency {latency} ms: round {round_index + 1} of {repeats}")
                    local = _two_epochs(bench.local, bench.options)
                    shutil.rmtree(bench.cache_dir, ignore_errors=True)
                    mark, cpu_before = (log.mark() if log else 0), _process_cpu_s(server_pid)
                    remote = _two_epochs(bench.remote, bench.options)
                    server_cpu_s += _process_cpu_s(server_pid) - cpu_before
                    if log is not None:
                        fetched.add(log.fetched(mark, warm_window=remote.wall[1:]))
                    rounds.append((local, remote))
            figures.update(_latency_figures("server" if latency == "server" else f"{latency}ms", rounds))
        if log is None:
            _progress("counting GETs: one more cold epoch in this process (no request log)")
            fetched = _counted_epoch(bench)
    summary: dict[str, float | int | str] = {
        "source": "s3", "url": bench.url, "latency_ms": "/".join(str(latency) for latency in latencies),
        "workers": args.workers, "batch": batch, "tile": args.tile, "epoch_samples": rounds[0][0].epoch_samples,
        "data_mb": round(bench.data_bytes / 1e6, 1), "readahead_mb": round(bench.remote.readahead_mb, 1),
        "fetch_span_mb": bench.remote.fetch_span_mb,
        "rounds": repeats,
        **figures,
        "gets_per_sample": round(fetched.gets / max(1, fetched.distinct_samples), 3),
        "bytes_fetched_over_used": round(fetched.bytes_sent / max(1, fetched.used_bytes), 4),
        "counted_by": "request_log" if log is not None else "fetch_counters",
    }  # fmt: skip
    if log is not None:
        summary.update(refetched_samples=fetched.samples - fetched.distinct_samples, warm_gets=fetched.warm_gets)
        if server_pid is not None and fetched.gets:
            summary["server_cpu_ms_per_get"] = round(1000 * server_cpu_s / fetched.gets, 2)
    summary.update(targets=TARGETS, targets_missed=_missed(summary) or "none")
    return summary


@dataclasses.dataclass
class Bench:
    """The data, written locally and uploaded, and the loader settings of both sides."""

    url: str
    names: list[str]  # shard file names, as dataset.json lists them
    tables: dict[str, TarIndex]  # shard name -> member table
    data_bytes: int
    local: DataConfig
    remote: DataConfig
    cache_dir: Path
    options: dict

    @classmethod
    def prepare(cls, folder: Path, url: str, tiles: int, tile: int, workers: int, batch: int,
                write_tiles: WriteTiles) -> Bench:  # fmt: skip
        from unetdist.data.sources.tar_index import index_tar, write_local_index

        url = url.rstrip("/")
        if urlsplit(url).scheme != "s3" or not urlsplit(url).netloc:
            raise ValueError(f"--url {url!r}: expected s3://BUCKET[/PREFIX]")
        folder.mkdir(parents=True, exist_ok=True)
        _progress(f"writing {tiles} tiles of {tile} px to {folder}")
        write_tiles(folder, tiles, tile)
        names = json.loads((folder / "dataset.json").read_text())["train_shards"]
        tables = {name: index_tar(str(folder / name)) for name in names}
        for name in names:
            write_local_index(str(folder / name))
        _progress(f"uploading {len(names)} shards and their indexes to {url}")
        _upload(folder, names, url)
        data_bytes = sum((folder / name).stat().st_size for name in names)
        local = DataConfig(root=str(folder), tile_size=tile, num_workers=workers, augment_on="device",
                           augment_elastic=True, augment_intensity=True, augment_noise_std=0.01, block_size=1)
        readahead_mb = min(local.readahead_mb, data_bytes / 2**20 / 4 / max(1, workers))
        window_bytes = readahead_mb * 2**20 * max(1, workers)  # the cache must hold the readahead too
        remote = dataclasses.replace(local, root=url, cache_dir=str(folder / "node-cache"), readahead_mb=readahead_mb,
                                     cache_limit_gb=2 * max(data_bytes, window_bytes) / 2**30)
        options = dict(rank=0, world_size=1, seed=0, micro_batch_size=batch, in_channels=1, num_classes=2,
                       use_weight_map=False)
        return cls(url, names, tables, data_bytes, local, remote, folder / "node-cache", options)


def _latencies(text: str) -> list[int]:
    try:
        latencies = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        latencies = []
    if not latencies or min(latencies) < 0:
        raise ValueError(f"--latency-ms {text!r}: expected a comma list of milliseconds, e.g. 20,50")
    return latencies


def _progress(message: str) -> None:
    print(f"bench data --source s3: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the bucket and the server


def _upload(folder: Path, names: list[str], url: str) -> None:
    """Shards and indexes first, dataset.json last: a reader never finds a listing without its shards."""
    from unetdist.data import remote
    from unetdist.data.sources.tar_index import shard_index_url

    _ensure_bucket(urlsplit(url).netloc)
    for name in names:
        remote.upload_file(folder / name, f"{url}/{name}")
        remote.upload_file(folder / shard_index_url(name), f"{url}/{shard_index_url(name)}")
    remote.upload_file(folder / "dataset.json", f"{url}/dataset.json")


def _ensure_bucket(bucket: str) -> None:
    """Create ``bucket`` unless it exists; boto3 reads endpoint and credentials from the environment."""
    try:
        import boto3
        from botocore.exceptions import ClientError
    except ImportError:
        _progress(f"boto3 is not installed: cannot create bucket {bucket} (obstore cannot); assuming it exists")
        return
    client = boto3.client("s3")
    try:
        client.head_bucket(Bucket=bucket)
        return
    except ClientError:
        pass
    region = client.meta.region_name
    location = {} if region in (None, "us-east-1") else {"CreateBucketConfiguration": {"LocationConstraint": region}}
    client.create_bucket(Bucket=bucket, **location)


@contextmanager
def _latency_injected(faults_file: str, latency: int | str) -> Iterator[None]:
    """GETs delayed by ``latency`` ms inside; after, the keys set are as they were (others may share the server)."""
    if latency == "server":
        yield
        return
    previous = _merge_faults(faults_file, {"latency_ms": latency, "only_get": True})
    try:
        yield
    finally:
        _merge_faults(faults_file, previous)


def _merge_faults(path: str, changes: dict) -> dict:
    """Merge ``changes`` into the faults file (None removes a key) under the server's lock, by a
    temporary file and a rename (the server reads it on every request); the previous values."""
    with open(os.path.join(os.path.dirname(path) or ".", ".faults.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            current = json.loads(Path(path).read_text())
        except (FileNotFoundError, ValueError):
            current = {}
        previous = {key: current.get(key) for key in changes}
        current.update(changes)
        current = {key: value for key, value in current.items() if value is not None}
        partial = f"{path}.bench-{os.getpid()}.tmp"
        Path(partial).write_text(json.dumps(current))
        os.replace(partial, path)
    return previous


def _server_pid() -> int | None:
    """The pid of a test server on this machine (its health endpoint names it), else None."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "").rstrip("/")
    if urlsplit(endpoint).hostname not in ("127.0.0.1", "localhost", "::1"):
        return None
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
    try:
        with opener.open(f"{endpoint}/_s3_faults/health", timeout=2) as response:
            pid = int(json.load(response)["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid if Path(f"/proc/{pid}/stat").exists() else None


def _process_cpu_s(pid: int | None) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split() if pid else []
    except OSError:
        fields = []
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") if fields else 0.0  # utime + stime


def _machine_cpu() -> tuple[int, int]:
    """(busy, all) jiffies of all cores so far (/proc/stat)."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0, 0
    return sum(values) - values[3] - values[4], sum(values)  # less idle and iowait


# ---------------------------------------------------------------- timing


@dataclasses.dataclass
class Run:
    """A fresh loader read for two epochs: the first from its construction, the second straight on."""

    epoch_samples: int
    first_batch_s: float
    epoch_s: tuple[float, float]
    cpu_busy: tuple[float, float]  # share of all cores busy (any process: the server too) per epoch
    wall: tuple[float, float, float]  # time.time() at the start and at each epoch's end (request-log windows)

    def rate(self, epoch: int) -> float:
        return self.epoch_samples / self.epoch_s[epoch]


def _two_epochs(data: DataConfig, options: dict) -> Run:
    """Two epochs of a fresh loader; its workers have stopped when this returns."""
    from unetdist.data import build_train_loader

    wall, cpu, stamps = [time.time()], [_machine_cpu()], [time.perf_counter()]
    loader = build_train_loader(data, **options)
    micro_batches = loader.samples_per_epoch // options["micro_batch_size"]
    batches = iter(loader)
    first_batch_s = 0.0
    for index in range(2 * micro_batches):
        next(batches)
        first_batch_s = first_batch_s or time.perf_counter() - stamps[0]
        if (index + 1) % micro_batches == 0:
            stamps.append(time.perf_counter())
            wall.append(time.time())
            cpu.append(_machine_cpu())
    batches.close()
    del batches, loader  # persistent workers stop with their loader
    busy = tuple((cpu[i + 1][0] - cpu[i][0]) / max(1, cpu[i + 1][1] - cpu[i][1]) for i in range(2))
    epoch_s = (stamps[1] - stamps[0], stamps[2] - stamps[1])
    return Run(micro_batches * options["micro_batch_size"], first_batch_s, epoch_s, busy, tuple(wall))


def _first_micro_batch(data: DataConfig, options: dict) -> None:
    """Untimed: remote workers start from a forkserver, started once per process (seconds: it imports
    torch); a training run pays that once, the rounds should not."""
    from unetdist.data import build_train_loader

    batches = iter(build_train_loader(dataclasses.replace(data, cache_dir=""), **options))
    next(batches)
    batches.close()


def _latency_figures(suffix: str, rounds: list[tuple[Run, Run]]) -> dict[str, float | str]:
    """Medians over the rounds; a ratio is the median of the rounds' ratios (load hits both sides alike)."""

    def median(values: Iterator[float], digits: int) -> float:
        return round(float(np.median(list(values))), digits)

    return {
        f"local_samples_per_s_{suffix}": median((local.rate(0) for local, _ in rounds), 1),
        f"cold_samples_per_s_{suffix}": median((remote.rate(0) for _, remote in rounds), 1),
        f"local_epoch2_samples_per_s_{suffix}": median((local.rate(1) for local, _ in rounds), 1),
        f"warm_samples_per_s_{suffix}": median((remote.rate(1) for _, remote in rounds), 1),
        f"remote_vs_local_cold_{suffix}": median((remote.rate(0) / local.rate(0) for local, remote in rounds), 3),
        f"remote_vs_local_warm_{suffix}": median((remote.rate(1) / local.rate(1) for local, remote in rounds), 3),
        f"rounds_cold_{suffix}": "/".join(f"{remote.rate(0) / local.rate(0):.2f}" for local, remote in rounds),
        f"rounds_warm_{suffix}": "/".join(f"{remote.rate(1) / local.rate(1):.2f}" for local, remote in rounds),
        f"first_batch_s_local_{suffix}": median((local.first_batch_s for local, _ in rounds), 2),
        f"first_batch_s_cold_{suffix}": median((remote.first_batch_s for _, remote in rounds), 2),
        f"cpu_busy_local_{suffix}": median((local.cpu_busy[0] for local, _ in rounds), 2),
        f"cpu_busy_cold_{suffix}": median((remote.cpu_busy[0] for _, remote in rounds), 2),
    }


def _missed(summary: dict) -> str:
    def missed(key: str, value: float) -> bool:
        if key == "remote_vs_local_cold_20ms":
            return value < 0.8
        if key.startswith("remote_vs_local_warm_"):
            return value < 0.95
        return key == "bytes_fetched_over_used" and value > 1.1

    return ",".join(f"{key}({value})" for key, value in summary.items() if missed(key, value))


# ---------------------------------------------------------------- what the GETs brought


@dataclasses.dataclass
class Fetched:
    """What shard GETs brought: requests, bytes sent, sample reads, distinct samples and their member bytes."""

    gets: int = 0
    bytes_sent: int = 0
    samples: int = 0
    distinct_samples: int = 0
    used_bytes: int = 0  # member bytes of the distinct samples
    warm_gets: int = 0  # GETs during the second epoch

    def add(self, other: Fetched) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


class _RequestLog:
    """The server's request log (tests/services/s3_faults.py): a tab-separated line per request,
    ``time method path range status bytes ms fault``, read from a mark on (others may share it)."""

    def __init__(self, path: str, bench: Bench) -> None:
        self.path, self.tables = path, bench.tables
        parts = urlsplit(bench.url)
        keys = {name: "/".join(filter(None, [parts.path.strip("/"), name])) for name in bench.names}
        # as logged: path style (/bucket/key) or virtual-hosted (/key)
        self.shards = {**{f"/{parts.netloc}/{key}": name for name, key in keys.items()},
                       **{f"/{key}": name for name, key in keys.items()}}  # fmt: skip
        self.spans = {}  # shard name -> (starts, ends, member bytes) of its samples, in file order
        for name, table in bench.tables.items():
            spans = [sample.span for sample in table.samples]
            used = [sum(size for _, _, size in sample.members) for sample in table.samples]
            self.spans[name] = ([start for start, _ in spans], [end for _, end in spans], used)

    def mark(self) -> int:
        return os.path.getsize(self.path) if os.path.exists(self.path) else 0

    def fetched(self, mark: int, warm_window: tuple[float, float]) -> Fetched:
        """What the shard GETs logged since ``mark`` brought; ``warm_window``: (start, end) of epoch 2."""
        try:
            with open(self.path, "rb") as file:
                file.seek(mark)
                lines = file.read().decode(errors="replace").splitlines()
        except FileNotFoundError:
            lines = []
        out, seen = Fetched(), set()
        for row in (line.split("\t") for line in lines):
            name = self.shards.get(unquote(row[2].split("?")[0])) if len(row) >= 6 and row[1] == "GET" else None
            if name is None:
                continue
            out.gets += 1
            out.warm_gets += warm_window[0] < float(row[0]) <= warm_window[1]
            out.bytes_sent += int(row[5]) if row[5].isdigit() else 0
            if row[4] not in ("200", "206"):
                continue
            starts, ends, used = self.spans[name]
            first, _, last = row[3].removeprefix("bytes=").partition("-")  # B inclusive; "-": the whole object
            first, end = (int(first), int(last) + 1 if last else self.tables[name].size) if first.isdigit() \
                else (0, self.tables[name].size)  # fmt: skip
            for index in range(bisect_left(starts, first), len(starts)):
                if ends[index] > end:
                    break
                out.samples += 1
                if (name, index) not in seen:
                    seen.add((name, index))
                    out.distinct_samples += 1
                    out.used_bytes += used[index]
        return out


def _counted_epoch(bench: Bench) -> Fetched:
    """GETs and bytes of one cold epoch from the fetcher's own counters: read in this process
    (no workers, no readahead, no cache), where its counters are at hand."""
    from unetdist.data import build_train_loader

    data = dataclasses.replace(bench.remote, num_workers=0, readahead_mb=0.0, cache_dir="")
    loader = build_train_loader(data, **bench.options)
    batches = iter(loader)
    for _ in range(loader.samples_per_epoch // bench.options["micro_batch_size"]):
        next(batches)
    counters = loader.stream.source.fetcher.counters
    _, units, indices = loader.sequence.locate(np.arange(loader.samples_per_epoch))
    distinct = set(zip(units.tolist(), indices.tolist(), strict=True))
    members = [bench.tables[bench.names[unit]].samples[index].members for unit, index in distinct]
    used = sum(size for sample in members for _, _, size in sample)
    return Fetched(counters.requests, counters.bytes_fetched, loader.samples_per_epoch, len(distinct), used)
