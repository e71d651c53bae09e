"""The built-in ``mlflow`` tracker: a run logged to an MLflow tracking server or store with mlflow's
own client (``mlflow.MlflowClient``; the ``mlflow-skinny`` package).

``tracking_uri`` is any URI MLflow takes: ``http(s)://host:5000`` for a tracking server,
``sqlite:///path/mlflow.db`` (or another database URI) for a store on this machine, ``databricks``;
unset, the environment's ``MLFLOW_TRACKING_URI``. The experiment is created when missing, keeping
its artifacts at ``artifact_location`` when given (else where the server or store puts them: a
database store's default is ``./mlruns``, under the working directory). MLflow's own environment
variables apply as usual (``MLFLOW_TRACKING_TOKEN``, ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
``MLFLOW_HTTP_REQUEST_TIMEOUT``...).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, field_validator

from adapterdeck.core import hookimpl
from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.core.plugins import TrackerRegister
from adapterdeck.core.trackers import FAILED, FINISHED, KILLED, RunStart, TrackedRun, Tracker, TrackerParams

if TYPE_CHECKING:
    from mlflow import MlflowClient

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
# adapterdeck's run statuses as MLflow's (mlflow.entities.RunStatus).
STATUSES = {FINISHED: "FINISHED", FAILED: "FAILED", KILLED: "KILLED"}
# What MLflow allows in a metric's name; anything else becomes "_".
_METRIC_NAME = re.compile(r"[^0-9A-Za-z_\-. :/]")


class MlflowParams(TrackerParams):
    tracking_uri: str | None = Field(
        None,
        validate_default=True,
        description=f"a tracking server's URL or a store (sqlite:///mlflow.db); default: ${TRACKING_URI_ENV}",
    )
    experiment: str = Field("adapterdeck", min_length=1, description="the experiment; created when missing")
    run_name: str | None = Field(None, description="default: the run directory's name, or a job's id")
    artifact_location: str | None = Field(None, description="where a new experiment keeps its artifacts")
    tags: dict[str, str] = Field(default_factory=dict, description="tags set on the run")

    @field_validator("tracking_uri")
    @classmethod
    def _from_environment(cls, value: str | None) -> str:
        value = value or os.environ.get(TRACKING_URI_ENV) or None
        if value is None:
            raise ValueError(
                f"not set, and {TRACKING_URI_ENV} is not set either: give the tracking server's URL "
                "(http://host:5000) or a local store (sqlite:///mlflow.db)"
            )
        return value


def shown(uri: str) -> str:
    """``uri`` without the password it may carry (``https://user:secret@host``)."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class MlflowRun(TrackedRun):
    """One run in MLflow: metrics by step, artifacts, and the status it ends with."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        batch = [Metric(_METRIC_NAME.sub("_", k), v, now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        for path in paths:
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
            else:
                self.client.log_artifact(self.run_id, str(path))

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=STATUSES[status])


class MlflowTracker(Tracker):
    name = "mlflow"
    description = "MLflow: parameters, metrics by step, report, loss curve and adapter as artifacts"
    params = MlflowParams

    def start(self, params: TrackerParams, run: RunStart) -> TrackedRun:
        assert isinstance(params, MlflowParams) and params.tracking_uri is not None
        uri = params.tracking_uri
        try:
            from mlflow import MlflowClient
            from mlflow.entities import Param

            client = MlflowClient(tracking_uri=uri)
            experiment_id = _experiment(client, params)
            created = client.create_run(experiment_id, run_name=params.run_name or run.name, tags=params.tags)
            run_id = created.info.run_id
            client.log_batch(run_id, params=[Param(k, v) for k, v in run.params.items()])
        except AdapterdeckError as exc:
            raise AdapterdeckError(f"{shown(uri)}: {exc}") from None
        except Exception as exc:
            raise AdapterdeckError(f"cannot log to {shown(uri)}: {type(exc).__name__}: {exc}") from None
        return MlflowRun(client, run_id)


def _experiment(client: MlflowClient, params: MlflowParams) -> str:
    """The id of the experiment named in ``params``, created when missing."""
    from mlflow.exceptions import MlflowException

    found: Any = client.get_experiment_by_name(params.experiment)
    if found is None:
        try:
            return client.create_experiment(params.experiment, artifact_location=params.artifact_location)
        except MlflowException as exc:  # created meanwhile by another run
            found = client.get_experiment_by_name(params.experiment)
            if found is None:
                raise exc from None
    if found.lifecycle_stage == "deleted":
        raise AdapterdeckError(f"experiment {params.experiment!r} is deleted; restore it or name another")
    return found.experiment_id


@hookimpl
def register_trackers(register: TrackerRegister) -> None:
    register.add_tracker(MlflowTracker())
