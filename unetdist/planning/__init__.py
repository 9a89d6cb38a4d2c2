"""Planning a training run from the data: fixed rules over a fingerprint and a budget (nnU-Net style).

* :mod:`~unetdist.planning.costs`: what a padded U-Net costs, by arithmetic (FLOPs, parameters,
  activation memory, seconds per step) and the machine figures behind the estimates
* :mod:`~unetdist.planning.rules`: :func:`plan_config`, the fingerprint and budget -> config
  values, each with its reason

The fingerprint is :mod:`unetdist.data.fingerprint`'s; the command line that writes the plan
is :mod:`unetdist.plan`. Everything here is pure arithmetic: no torch, no device, no data.
"""

from unetdist.planning.costs import Budget, Net, PlanError
from unetdist.planning.rules import plan_config

__all__ = ["Budget", "Net", "PlanError", "plan_config"]
