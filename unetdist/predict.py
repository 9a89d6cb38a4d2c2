"""``python -m unetdist.predict``: segment images of any size (see unetdist.inference.cli).

``predict_array`` and ``load_model`` are re-exported for Python callers.
"""

from __future__ import annotations

import sys

from unetdist.inference.cli import main
from unetdist.inference.engine import predict_array
from unetdist.inference.loading import load_model

__all__ = ["load_model", "main", "predict_array"]

if __name__ == "__main__":
    sys.exit(main())
