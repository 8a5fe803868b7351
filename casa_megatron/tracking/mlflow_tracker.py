"""MLflow tracking: one rank logs; local sqlite store in the run directory by default.

``MLFLOW_TRACKING_URI`` (or ``tracking.tracking_uri``) points at a server instead. Metrics go
through ``log_batch`` once per logged step (async logging to sqlite lost points, see
shared/DEPENDENCIES.md). The run ends FAILED on an exception and KILLED on interruption.
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


class MLflowTracker(NullTracker):
    def __init__(self, run_dir: Path, experiment: str, tracking_uri: Optional[str] = None,
                 system_metrics: bool = True, system_metrics_interval: float = 10.0):
        import mlflow
        from mlflow.tracking import MlflowClient

        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or \
            f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(
            experiment, artifact_location=(run_dir / "mlartifacts").resolve().as_uri()
            if uri.startswith("sqlite") else None)
        self.run_id = self.client.create_run(exp_id, run_name=run_dir.name).info.run_id
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


def make_tracker(enabled: bool, is_logging_rank: bool, run_dir: Path, experiment: str,
                 tracking_uri: Optional[str] = None, system_metrics: bool = True,
                 system_metrics_interval: float = 10.0):
    if not (enabled and is_logging_rank):
        return NullTracker()
    return MLflowTracker(run_dir, experiment, tracking_uri, system_metrics, system_metrics_interval)
