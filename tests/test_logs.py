"""Tests for unetdist.logs: every entry point's logging set-up redacts credentials in URLs."""

from __future__ import annotations

import io
import logging
import sys

from unetdist.logs import setup_logging


def test_setup_logging_redacts_urls_for_every_entry_point():
    # train, predict and prepare all set up logging here; start from a plain record factory so
    # that redaction installed by an earlier test in this process cannot make this pass
    previous, previous_hook = logging.getLogRecordFactory(), sys.excepthook
    logging.setLogRecordFactory(logging.LogRecord)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    try:
        setup_logging(is_main=True)
        root.handlers[0].setStream(stream)
        logging.getLogger("unetdist.predict").info("reading models:/m at %s", "http://alice:s3cr3t@127.0.0.1:9")
    finally:
        logging.setLogRecordFactory(previous)
        sys.excepthook = previous_hook
        root.handlers[:] = handlers
        root.setLevel(level)
    text = stream.getvalue()
    assert "reading models:/m at http://***@127.0.0.1:9" in text
    assert "s3cr3t" not in text
