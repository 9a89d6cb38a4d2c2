"""``python -m unetdist.tracking replay FILE...`` (see ``unetdist.tracking.replay``)."""

import sys

from unetdist.tracking.replay import main

sys.exit(main())
