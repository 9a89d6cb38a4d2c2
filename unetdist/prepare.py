"""``python -m unetdist.prepare``: image + mask folders -> webdataset shards (see unetdist.data.prepare)."""

from __future__ import annotations

import sys

from unetdist.data.prepare import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
