"""unetdist: distributed U-Net training for image segmentation.

Entry points: ``python -m unetdist.prepare`` (images -> shards),
``torchrun --nproc_per_node=N -m unetdist.train --config configs/X.yaml``.
"""

__version__ = "0.1.0"
