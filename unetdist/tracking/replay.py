"""Send the logging calls a run could not deliver: ``python -m unetdist.tracking replay FILE...``.

``MLflowTracker.finish`` writes calls the server did not take within ``flush_timeout_s`` to
``mlflow-unsent-<run>-<time>.jsonl``; this sends them later, through the same ``Sender``
the tracker uses, and renames each file it sent to ``*.jsonl.replayed``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from unetdist.redaction import REDACTED, redact
from unetdist.tracking.outbox import merge_metric_ops, read_unsent
from unetdist.tracking.sender import Sender


def replay(path: str | os.PathLike[str], tracking_uri: str | None = None) -> str:
    """Send the calls in a file written by ``MLflowTracker.finish``; returns the run id.

    ``tracking_uri``: default the file's, whose credentials were not written: those of
    the environment (``MLFLOW_TRACKING_USERNAME``/``PASSWORD``/``TOKEN``) are used.
    Stops at the first failure, naming the call; sending the file again is safe
    (metrics and tags are idempotent; an artifact is written again).
    """
    header, ops = read_unsent(path)
    uri = tracking_uri or _uri_of_file(path, header)
    sender = Sender(uri, header.get("run_id"), header.get("experiment_id"))
    index = 0
    while index < len(ops):
        request, count = merge_metric_ops(ops[index:]) if ops[index]["op"] == "metrics" else (ops[index], 1)
        try:
            sender.send(request)
        except Exception as error:
            raise RuntimeError(
                f"{path}: call {index + 1} of {len(ops)} ({request['op']}) failed: {redact(str(error))}"
            ) from error
        index += count
    return sender.run_id or ""


def _uri_of_file(path: str | os.PathLike[str], header: dict) -> str:
    uri = str(header.get("tracking_uri") or "").replace(f"://{REDACTED}@", "://")
    if REDACTED in uri:
        raise ValueError(
            f"{path}: its tracking URI {uri} held a credential, which is never written to disk; "
            "pass the whole URI as --tracking-uri"
        )
    return uri


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unetdist.tracking", description="MLflow tracking tools")
    commands = parser.add_subparsers(dest="command", required=True)
    replay_parser = commands.add_parser("replay", help="send the logging calls a run could not deliver")
    replay_parser.add_argument("files", nargs="+", metavar="FILE", help="mlflow-unsent-*.jsonl")
    replay_parser.add_argument("--tracking-uri", help="default: the URI written in the file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    failed = 0
    for file in args.files:
        try:
            run_id = replay(file, args.tracking_uri)
        except (OSError, ValueError, RuntimeError) as error:
            print(f"replay failed: {error}", file=sys.stderr)
            failed += 1
            continue
        done = Path(file).with_suffix(".jsonl.replayed")
        Path(file).rename(done)
        print(f"{file}: sent to run {run_id}; renamed to {done.name}")
    return 1 if failed else 0
