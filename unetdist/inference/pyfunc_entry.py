"""The code of the logged U-Net model (MLflow "models from code"): MLflow runs this file at load time.

It only names the model class; the weights and the network's description are the model's
artifacts (see ``unetdist.inference.pyfunc``). Keep it tiny: it is copied into every logged
model and run by every process that loads one, from the model's ``code/`` copy of
``unetdist`` where no ``unetdist`` is installed.
"""

from mlflow.models import set_model

from unetdist.inference.pyfunc import UNetSegmenter

set_model(UNetSegmenter())
