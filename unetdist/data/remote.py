"""Objects at URLs (``s3://``, ``gs://``, ``az://``, ``http(s)://``): whole reads, ranged reads, writes.

The one remote reader of the data package, on obstore (the Rust ``object_store`` crate): one
client for S3, GCS, Azure and HTTP, with the standard credential chains and environment
variables (``AWS_*``, ``GOOGLE_*``, ``AZURE_*``); nothing of a credential passes through
configs. Measured on loopback against moto: a 64 KiB ranged GET costs ~4 ms with obstore
against 4-8 ms with boto3, and fsspec's ``tar::s3://`` would scan a shard's headers with
~2 GETs per member, which the shard index (:mod:`unetdist.data.sources.tar_index`) avoids.

Why our own retry loop instead of obstore's: an error after the retries must name the URL, the
byte range, the attempts and the last status, and a short body must count as a failure to
retry; obstore's own retries are off (``max_retries=0``) so each attempt is ours to count.
Every request has a timeout (``client_options["timeout"]``), so nothing waits forever.

Processes: obstore keeps one async runtime per process, which a forked child cannot use once
the parent has (it panics). Stores are made lazily, per process (keyed by pid); with remote
data the DataLoader workers start by ``forkserver`` (:func:`worker_start_method`).

Plain paths and ``file://`` URLs are local files; the same functions read them, so callers
do not branch.
"""

from __future__ import annotations

import logging
import os
import random
import re
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from unetdist.data.samples import DataError

log = logging.getLogger(__name__)

REMOTE_SCHEMES = ("s3", "s3a", "gs", "az", "azure", "abfs", "abfss", "http", "https")
_STATUS = re.compile(r"status code: (\d{3})")
_NO_RETRY_ERRORS = ("NotFoundError", "PermissionDeniedError", "UnauthenticatedError", "InvalidPathError")


class RemoteError(DataError):
    """A remote read or write that failed after its retries (or at once: 403, 404)."""


@dataclass(frozen=True)
class RemoteOptions:
    """Retry and timeout policy of every request (``data.remote_*`` config keys)."""

    attempts: int = 6
    timeout_s: float = 60.0
    backoff_s: float = 0.2  # the first wait; doubled per attempt, up to max_backoff_s, with jitter
    max_backoff_s: float = 10.0


# ---------------------------------------------------------------- URLs


def is_remote(path: str | os.PathLike[str]) -> bool:
    """True for an object-store or HTTP URL; False for a path or a ``file://`` URL."""
    return urlsplit(str(path)).scheme.lower() in REMOTE_SCHEMES


def local_path(path: str | os.PathLike[str]) -> str:
    """A local path for a path or a ``file://`` URL."""
    text = str(path)
    return urlsplit(text).path if text.startswith("file:") else text


def join(root: str, *names: str) -> str:
    """``root/name...`` for a URL (query kept at the end) or a local path."""
    if not is_remote(root):
        return os.path.join(local_path(root), *names)
    parts = urlsplit(root)
    path = "/".join([parts.path.rstrip("/"), *(name.strip("/") for name in names)])
    return urlunsplit(parts._replace(path=path))


def display(url: str) -> str:
    """The URL for messages: without query string or user info (they may hold credentials); the port kept."""
    if not is_remote(url):
        return url
    parts = urlsplit(url)
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _store_and_key(url: str):
    """(this process's store for the URL's bucket or host, the object key)."""
    parts = urlsplit(url)
    base = f"{parts.scheme}://{parts.netloc}"
    key = parts.path.lstrip("/")
    return _Stores.get(base), key


class _Stores:
    """obstore stores by bucket/host, made on first use in each process (see the module docstring)."""

    options = RemoteOptions()
    _pid = -1
    _stores: dict[str, object] = {}

    @classmethod
    def get(cls, base: str):
        if cls._pid != os.getpid():
            cls._stores, cls._pid = {}, os.getpid()
        _check_credentials(base)  # each time: a few environment lookups, and the environment may change
        if base not in cls._stores:
            try:
                from obstore.store import from_url
            except ImportError:
                raise RemoteError(f"{display(base)}: remote data needs obstore: pip install 'unetdist[remote]'") from None
            try:
                cls._stores[base] = from_url(base, client_options=_client_options(base), retry_config={"max_retries": 0})
            except Exception as err:  # noqa: BLE001 - obstore's configuration errors: a bad URL, no account
                raise RemoteError(f"{display(base)}: cannot open the store: {str(err).splitlines()[0]}") from None
        return cls._stores[base]


_S3_CREDENTIAL_SOURCES = (
    "AWS_ACCESS_KEY_ID", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)  # fmt: skip


def _check_credentials(base: str) -> None:
    """Refuse an S3 URL that no credential can reach, before a request: without keys, a web identity,
    container credentials or the instance metadata service (unless AWS_SKIP_SIGNATURE=true: a public bucket)."""
    if urlsplit(base).scheme.lower() not in ("s3", "s3a"):
        return
    if any(os.environ.get(name) for name in _S3_CREDENTIAL_SOURCES):
        return
    if os.environ.get("AWS_SKIP_SIGNATURE", "").lower() == "true":
        return
    if os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true":
        raise RemoteError(
            f"{display(base)}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and "
            "AWS_SESSION_TOKEN, AWS_ENDPOINT_URL, AWS_REGION as needed) in the environment, or "
            "AWS_SKIP_SIGNATURE=true for a public bucket; configs never hold credentials"
        )


def _client_options(base: str) -> dict:
    timeout_s = _Stores.options.timeout_s
    client = {"timeout": timedelta(seconds=timeout_s), "connect_timeout": timedelta(seconds=min(10.0, timeout_s))}
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
    if (endpoint.startswith("http://") or os.environ.get("AWS_ALLOW_HTTP", "").lower() == "true"
            or urlsplit(base).scheme.lower() == "http"):  # a local S3-compatible server; a URL written http://
        client["allow_http"] = True
    return client


def configure(options: RemoteOptions) -> None:
    """Use ``options`` for every request of this process (and of workers it spawns: set it again there)."""
    if options != _Stores.options:
        _Stores.options, _Stores._pid = options, -1


# ---------------------------------------------------------------- requests with retries


def _status(err: BaseException) -> str:
    """The HTTP status in an obstore error, or the kind of failure (from its first line: the rest
    is a debug dump)."""
    first = str(err).splitlines()[0] if str(err) else ""
    found = _STATUS.search(first)
    if found:
        return found.group(1)
    name = type(err).__name__
    if name in ("FileNotFoundError", "NotFoundError"):
        return "404"
    if name == "PermissionDeniedError":
        return "403"
    lowered = first.lower()
    if "timed out" in lowered or "timeout" in lowered:
        return "timeout"
    if "body error" in lowered:
        return "body cut short"
    return "connection error"


def _retryable(err: BaseException) -> bool:
    if isinstance(err, FileNotFoundError) or type(err).__name__ in _NO_RETRY_ERRORS:
        return False
    status = _status(err)
    return not (status.isdigit() and 400 <= int(status) < 500 and status not in ("408", "429"))


def _with_retries(what: str, url: str, request):
    """``request()``, retried with exponential backoff and jitter on what may pass; a
    :class:`RemoteError` naming ``url`` and ``what`` after the last attempt."""
    options = _Stores.options
    last = ""
    for attempt in range(1, options.attempts + 1):
        try:
            return request()
        except RemoteError:
            raise
        except _ShortBody as err:
            last, retry = str(err), True
        except Exception as err:  # noqa: BLE001 - obstore raises its own error types and OSErrors
            last, retry = f"{_status(err)}: {str(err).splitlines()[0][:200]}", _retryable(err)
            if not retry:
                raise RemoteError(f"{display(url)} {what}: {last} (not retried)") from None
        if attempt < options.attempts:
            wait = min(options.max_backoff_s, options.backoff_s * 2 ** (attempt - 1))
            time.sleep(wait * random.uniform(0.5, 1.0))
            log.debug("retrying %s %s (attempt %d): %s", display(url), what, attempt + 1, last)
    raise RemoteError(f"{display(url)} {what}: failed after {options.attempts} attempts, last: {last}")


class _ShortBody(Exception):
    pass


def read_ranges(url: str, ranges: list[tuple[int, int]], expect_size: int = -1) -> list[bytes]:
    """The bytes ``[start, end)`` of each range, one request per range (merge adjacent ones first).

    ``expect_size`` (>= 0): the object's size as indexed; another size is an error (the object was
    rewritten after it was indexed), checked on every response at no cost."""
    if not is_remote(url):
        with open(local_path(url), "rb") as file:
            return [os.pread(file.fileno(), end - start, start) for start, end in ranges]
    store, key = _store_and_key(url)  # first: a missing obstore is a RemoteError there
    import obstore


    def fetch(start: int, end: int) -> bytes:
        result = obstore.get(store, key, options={"range": (start, end)})
        if expect_size >= 0 and result.meta["size"] != expect_size:
            raise RemoteError(
                f"{display(url)}: {result.meta['size']} bytes, its index says {expect_size}: rewritten "
                "after it was indexed? Re-run `python -m unetdist.prepare index` on it"
            )
        data = bytes(result.bytes())
        if len(data) != end - start:
            raise _ShortBody(f"short body: {len(data)} of {end - start} bytes")
        return data

    return [_with_retries(f"bytes {start}-{end - 1}", url, lambda s=start, e=end: fetch(s, e)) for start, end in ranges]


def read_bytes(url: str) -> bytes:
    """A whole object or file."""
    if not is_remote(url):
        return Path(local_path(url)).read_bytes()
    store, key = _store_and_key(url)  # first: a missing obstore is a RemoteError there
    import obstore


    def fetch() -> bytes:
        result = obstore.get(store, key)
        data = bytes(result.bytes())
        if len(data) != result.meta["size"]:
            raise _ShortBody(f"short body: {len(data)} of {result.meta['size']} bytes")
        return data

    return _with_retries("(whole object)", url, fetch)


def exists(url: str) -> bool:
    """Whether the object or file exists (a 403 is an error, not a no)."""
    if not is_remote(url):
        return Path(local_path(url)).exists()
    store, key = _store_and_key(url)  # first: a missing obstore is a RemoteError there
    import obstore

    try:
        _with_retries("(HEAD)", url, lambda: obstore.head(store, key))
    except RemoteError as err:
        if ": 404" in str(err):
            return False
        raise
    return True


def write_bytes(url: str, data: bytes) -> None:
    """Write a whole object or file (obstore uploads large ones in parts)."""
    if not is_remote(url):
        path = Path(local_path(url))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return
    store, key = _store_and_key(url)  # first: a missing obstore is a RemoteError there
    import obstore

    _with_retries("(PUT)", url, lambda: obstore.put(store, key, data))


def upload_file(path: str | os.PathLike[str], url: str) -> None:
    """Copy a local file to ``url``: a multipart upload for large files, in 10 MiB parts."""
    store, key = _store_and_key(url)  # first: a missing obstore is a RemoteError there
    import obstore

    _with_retries("(PUT)", url, lambda: obstore.put(store, key, Path(path), chunk_size=10 * 1024 * 1024))


def check_readable(url: str, what: str) -> None:
    """Start-up check of access to ``url`` (an object that must exist): one line naming URL and cause.

    Missing or wrong credentials fail here, before any rank trains, not in a worker later."""
    try:
        if not exists(url):
            raise RemoteError(f"{display(url)} ({what}) not found")
    except RemoteError as err:
        hint = ""
        if ": 403" in str(err) or "credential" in str(err).lower() or "unauthenticated" in str(err).lower():
            hint = (
                "; check the credentials in the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*)"
            )
        raise RemoteError(f"{err}{hint}") from None


def download_file(url: str, path: str | os.PathLike[str]) -> int:
    """Copy the object at ``url`` to the local ``path`` in a stream of chunks; its size."""
    store, key = _store_and_key(url)  # first: a missing obstore is a RemoteError there
    import obstore


    def fetch() -> int:
        result = obstore.get(store, key)
        expected, received = result.meta["size"], 0
        with open(path, "wb") as file:
            for chunk in result:
                file.write(chunk)
                received += len(chunk)
        if received != expected:
            raise _ShortBody(f"short body: {received} of {expected} bytes")
        return received

    return _with_retries("(whole object)", url, fetch)


def list_objects(prefix_url: str) -> list[str]:
    """URLs of the objects under ``prefix_url`` (a folder URL), sorted."""
    store, key = _store_and_key(prefix_url)  # first: a missing obstore is a RemoteError there
    import obstore

    base = prefix_url.split("?")[0].rstrip("/")
    prefix = key.rstrip("/") + "/" if key else None
    batches = _with_retries("(LIST)", prefix_url, lambda: list(obstore.list(store, prefix=prefix)))
    keys = sorted(item["path"] for batch in batches for item in batch)
    root = base[: len(base) - len(key.rstrip("/"))].rstrip("/")
    return [f"{root}/{k}" for k in keys]


def zarr_store(location: str, writable: bool = False):
    """What ``zarr.open_group`` takes for a store at ``location``: the path itself, or for a URL
    zarr's ``ObjectStore`` over an obstore client (read-only unless ``writable``); make it in the
    process that uses it (never before a fork)."""
    if not is_remote(location):
        return local_path(location)
    from obstore.store import from_url
    from zarr.storage import ObjectStore

    _check_credentials(location)
    # obstore's own retries here (the default policy): zarr's reads do not pass through _with_retries
    return ObjectStore(from_url(location.rstrip("/"), client_options=_client_options(location)), read_only=not writable)


def read_metadata(location: str):
    """A :data:`unetdist.data.layout.MetadataReader` for the store at ``location`` (None for a path)."""
    if not is_remote(location):
        return None

    def read(relative: str) -> bytes | None:
        try:
            return read_bytes(join(location, relative))
        except RemoteError as err:
            if ": 404" in str(err):
                return None
            raise

    return read
