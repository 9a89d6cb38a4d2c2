"""Credentials stay in the process: URLs as they may be written to disk or logged.

A config value, an error message or a log line may hold a URL with a credential in it: a
password (``http://alice:PW@host``), an access token in the query (``?token=...``), a
presigned object-store URL (``X-Amz-Signature=...``, an Azure SAS ``sig=...``). The live
process uses such a URL as given; what is written (``config.yaml``, checkpoints, MLflow
params and tags, files of unsent MLflow calls) and every log line gets ``redact(text)``::

    redact("http://alice:pw@host:5000/x?sig=abc&sv=2024")   # 'http://***@host:5000/x?sig=***&sv=2024'

Text without a URL is returned unchanged. Credentials belong in the environment
(``CREDENTIALS_HINT``). Named ``redaction``, not ``secrets``: the standard library owns
that name.
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
from collections.abc import Iterable, Mapping
from typing import Any

REDACTED = "***"

_SCHEME = r"[A-Za-z][A-Za-z0-9+.\-]*://"
# a URL runs to whitespace or a quote, or to a list separator that starts the next URL
# ("a.tar::s3://b.tar", "x,y"), so each URL of a list is redacted as a URL of its own
_URL = re.compile(_SCHEME + r"""(?:(?!(?:::|[,;|])\s*""" + _SCHEME + r""")[^\s'"<>])*""")
# user[:password]@ of an authority; greedy up to its last "@", as urllib and requests split it
_USERINFO = re.compile(r"(?P<scheme>" + _SCHEME + r")(?P<userinfo>[^/?#\s'\"<>]*)@")
_PARAM = re.compile(r"(?P<lead>[?&;#])(?P<name>[^=&;#?\s]+)=(?P<value>[^&;#\s]*)")
# query parameters that carry a credential: passwords, tokens, API keys, signatures
# (X-Amz-Signature, X-Goog-Signature, Azure SAS sig), X-Amz-Credential, X-Amz-Security-Token
SECRET_PARAM = re.compile(r"sig|token|passw|pwd|secret|key|credential|auth", re.IGNORECASE)
# the key names of params that are secrets themselves ({"db": {"password": ...}})
SECRET_KEY = re.compile(r"password|passwd|secret|token|api[_-]?key|credential", re.IGNORECASE)
# Azure's user part is the container name, not a secret; kept unless a password follows it
_CONTAINER_SCHEMES = ("abfs://", "abfss://", "wasb://", "wasbs://")

CREDENTIALS_HINT = (
    "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN, for the MLflow "
    "server; the object store's own variables (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
    "GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_SAS_TOKEN ...) for data"
)


def _without_userinfo(match: re.Match[str]) -> str:
    scheme, userinfo = match["scheme"], match["userinfo"]
    if scheme.lower() in _CONTAINER_SCHEMES and ":" not in userinfo:
        return match[0]
    return f"{scheme}{REDACTED}@"


def _redact_params(match: re.Match[str]) -> str:
    if not SECRET_PARAM.search(match["name"]) or not match["value"]:
        return match[0]
    return f"{match['lead']}{match['name']}={REDACTED}"


def _redact_url(match: re.Match[str]) -> str:
    url = match[0]
    split = min((index for index in (url.find("?"), url.find("#")) if index >= 0), default=len(url))
    return url[:split] + _PARAM.sub(_redact_params, url[split:])


def redact(text: str) -> str:
    """``text`` with each URL's ``user:password@`` as ``***@`` and each secret-looking query value ``***``.

    Any text: a URL, a list of them, an error message, a log line. Text without ``://`` is
    returned as it is.
    """
    if "://" not in text:
        return text
    return _USERINFO.sub(_without_userinfo, _URL.sub(_redact_url, text))


def redact_values(value: Any) -> Any:
    """A copy of nested dicts/lists/tuples with every string ``redact``-ed; other values as they are."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {key: redact_values(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_values(item) for item in value)
    return value


def redact_params(params: Mapping[str, str]) -> dict[str, str]:
    """Flat params as they may be logged: a secret-named key's value is ``***``, URLs in values redacted."""
    redacted = {}
    for key, value in params.items():
        leaf = key.rsplit(".", 1)[-1]
        redacted[key] = REDACTED if SECRET_KEY.search(leaf) else redact(value)
    return redacted


def keys_with_credentials(flat: Mapping[str, Any]) -> list[str]:
    """The keys of ``flat`` whose string value holds a credential that ``redact`` hides."""
    return [key for key, value in flat.items() if isinstance(value, str) and redact(value) != value]


def credentials_warning(keys: Iterable[str]) -> str:
    """One line for the user: these keys hold credentials, used but never written; where to put them."""
    names = ", ".join(keys)
    return (
        f"{names}: credentials in a URL (user:password@ or a secret query parameter) are used by this "
        f"process but written nowhere (config.yaml, checkpoints, MLflow and logs show {REDACTED}); "
        f"pass them by environment variables instead: {CREDENTIALS_HINT}"
    )


def redact_log_records() -> None:
    """Make every log record of this process ``redact``-ed (message, arguments, traceback), and the
    traceback of an exception nothing caught.

    A record factory rather than a handler filter, so it holds for every logger and handler
    (MLflow's and urllib3's included) whenever they are set up. Calling it again does nothing.
    """
    previous = logging.getLogRecordFactory()
    if getattr(previous, "redacts", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return record  # a malformed call: logging reports it when the record is emitted
        if "://" in message:
            record.msg, record.args = redact(message), ()
        if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
            # formatted now (as Formatter.formatException would), so the handler prints this text
            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return record

    def excepthook(kind: type[BaseException], error: BaseException, trace: Any) -> None:
        sys.stderr.write(redact("".join(traceback.format_exception(kind, error, trace))))

    factory.redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
    if sys.excepthook is sys.__excepthook__:  # a hook someone installed on purpose stays
        sys.excepthook = excepthook
