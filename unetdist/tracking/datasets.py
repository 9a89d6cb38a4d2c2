"""The data a run trained on, as MLflow dataset inputs: the Datasets row of the run page.

``RunOutputs.log_data_lineage`` describes each split (:mod:`unetdist.data.lineage`) and hands
the tracker plain records (:func:`dataset_record`); the tracker queues them like every other
call (operation ``dataset_inputs``), and the sender makes them MLflow entities
(:func:`dataset_inputs`) for ``MlflowClient.log_inputs``. Each split is one
``mlflow.entities.Dataset``: name, digest, source (MLflow's ``local``/``s3``/``gs``/...
``{"uri"}`` or ``http`` ``{"url"}`` form) and a profile of counts, format and read keys, with
the input tag ``mlflow.data.context`` = ``training`` or ``validation``.

MLflow keeps one dataset per (name, digest) in an experiment and links it to a run once, so
a resumed run that logs the same splits again lists them once; one whose data changed lists
the new split beside the old one, with a warning here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from mlflow.entities import DatasetInput

    from unetdist.data.lineage import SplitLineage

logger = logging.getLogger(__name__)

CONTEXT_TAG = "mlflow.data.context"  # mlflow.utils.mlflow_tags.MLFLOW_DATASET_CONTEXT


def dataset_record(lineage: SplitLineage) -> dict[str, Any]:
    """A split as a JSON-able record: what a queued ``dataset_inputs`` operation holds."""
    return {
        "name": lineage.name,
        "digest": lineage.digest,
        "source": lineage.source,
        "profile": lineage.profile(),
        "context": lineage.context,
    }


def new_records(
    logged: Collection[tuple[str, str]], records: Iterable[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """The ``records`` whose (name, digest) is not in ``logged``; warns for a split whose data changed."""
    new = []
    for record in records:
        key = (record["name"], record["digest"])
        if key in logged:
            continue
        before = sorted(digest for name, digest in logged if name == record["name"])
        if before:
            logger.warning(
                "dataset %s differs from what this run trained on so far (digest %s, now %s): "
                "the run lists both",
                record["name"],
                ", ".join(before),
                record["digest"],
            )
        new.append(dict(record))
    return new


def dataset_inputs(records: Iterable[Mapping[str, Any]]) -> list[DatasetInput]:
    """MLflow's entities for ``MlflowClient.log_inputs``."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = []
    for record in records:
        source_type, source = source_json(record["source"])
        dataset = Dataset(
            name=record["name"],
            digest=record["digest"],
            source_type=source_type,
            source=source,
            profile=json.dumps(record["profile"]),
        )
        inputs.append(DatasetInput(dataset, tags=[InputTag(CONTEXT_TAG, record["context"])]))
    return inputs


def source_json(where: str) -> tuple[str, str]:
    """(MLflow's source type, its JSON) for a path or URL, as MLflow's own dataset sources write them."""
    scheme = urlsplit(where).scheme.lower() if "://" in where else ""
    if scheme in ("http", "https"):
        from mlflow.data.http_dataset_source import HTTPDatasetSource

        return "http", HTTPDatasetSource(where).to_json()
    # mlflow.data.artifact_dataset_sources: one source type per artifact scheme, "local" for paths
    return scheme if scheme not in ("", "file") else "local", json.dumps({"uri": where})
