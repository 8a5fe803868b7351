"""MLflow tracking: one rank logs; local sqlite store in the run directory by default.

``MLFLOW_TRACKING_URI`` (or ``tracking.tracking_uri``) points at a server instead. Metrics go
through ``log_batch`` once per logged step (async logging to sqlite lost points, see
shared/DEPENDENCIES.md). The run ends FAILED on an exception and KILLED on interruption.

A process killed outright (SIGKILL, node failure) cannot end its run, which would stay RUNNING
forever. Every run is tagged with its absolute run directory (``casa.run_dir``); since the
run-directory lock guarantees one live run per directory, the next run there marks any run
still RUNNING under that tag KILLED (``close_stale_runs``), with a tag saying so.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional


def _flatten(d: dict, prefix: str = "") -> Dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = str(v)
    return out


class NullTracker:
    def log_params(self, params: dict) -> None: ...
    def set_tags(self, tags: Dict[str, str]) -> None: ...
    def log_metrics(self, metrics: Dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


RUN_DIR_TAG = "casa.run_dir"


def resolve_tracking_uri(run_dir: Path, configured: Optional[str] = None) -> str:
    """Where a run in ``run_dir`` logs: the config's URI, else MLFLOW_TRACKING_URI, else sqlite
    in the run directory."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


class MLflowTracker(NullTracker):
    def __init__(self, run_dir: Path, experiment: str, tracking_uri: Optional[str] = None,
                 system_metrics: bool = True, system_metrics_interval: float = 10.0):
        import mlflow
        from mlflow.tracking import MlflowClient

        uri = resolve_tracking_uri(run_dir, tracking_uri)
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(
            experiment, artifact_location=(run_dir / "mlartifacts").resolve().as_uri()
            if uri.startswith("sqlite") else None)
        run_dir_tag = str(run_dir.resolve())
        self.closed_stale = close_stale_runs(self.client, exp_id, run_dir_tag)
        self.run_id = self.client.create_run(exp_id, run_name=run_dir.name,
                                             tags={RUN_DIR_TAG: run_dir_tag}).info.run_id
        self._mlflow = mlflow
        self._system = None
        if system_metrics:
            # CPU / memory / disk (and GPU with nvidia-ml-py) sampled by MLflow in a thread.
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._system = SystemMetricsMonitor(self.run_id, sampling_interval=system_metrics_interval,
                                                tracking_uri=uri)
            self._system.start()

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        flat = [Param(k, v[:500]) for k, v in _flatten(params).items()]
        for i in range(0, len(flat), 100):
            self.client.log_batch(self.run_id, params=flat[i:i + 100])

    def set_tags(self, tags: Dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_artifact(self, path: str) -> None:
        self.client.log_artifact(self.run_id, path)

    def finish(self, status: str = "FINISHED") -> None:
        if self._system is not None:
            self._system.finish()
            self._system = None
        self.client.set_terminated(self.run_id, status=status)


def close_stale_runs(client, experiment_id: str, run_dir_tag: str) -> list:
    """Mark runs of this run directory still RUNNING as KILLED (their process is gone: we hold
    the directory's lock). Returns their ids."""
    quoted = run_dir_tag.replace("\\", "\\\\").replace("'", "\\'")
    stale = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_DIR_TAG}` = '{quoted}' "
                                                              "and attributes.status = 'RUNNING'")
    for run in stale:
        client.set_tag(run.info.run_id, "casa.ended_by", "a later run in the same run dir found it still RUNNING")
        client.set_terminated(run.info.run_id, status="KILLED")
    return [run.info.run_id for run in stale]


def make_tracker(enabled: bool, is_logging_rank: bool, run_dir: Path, experiment: str,
                 tracking_uri: Optional[str] = None, system_metrics: bool = True,
                 system_metrics_interval: float = 10.0):
    if not (enabled and is_logging_rank):
        return NullTracker()
    return MLflowTracker(run_dir, experiment, tracking_uri, system_metrics, system_metrics_interval)
