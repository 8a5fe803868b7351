"""``casa-eval --track``: the scores go to the MLflow run that trained the checkpoint, at its step.

Why: a fusion comparison reads the held-out scores beside the training curves of each run; an
``eval.json`` left in a folder is easy to lose and to mismatch with its checkpoint. The run is
found as the training loop left it: in the tracking store the run used (``tracking.tracking_uri``,
else ``MLFLOW_TRACKING_URI``, else ``mlflow.db`` in the run directory), experiment
``tracking.experiment``, the newest run tagged with this checkpoint folder (``checkpoint_dir``; a
resumed run is a new MLflow run of the same folder). Metrics: ``eval/<side>/<group>`` (``:`` in a
group name, which MLflow refuses, becomes ``_``) at the checkpoint's iteration; ``eval.json`` and
``eval.md`` as artifacts under ``eval/iter_<N>``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

from casa_megatron.evaluation.checkpoint_model import NotACheckpoint, checkpoint_config


class NoTrackedRun(ValueError):
    """No MLflow run of this checkpoint was found (the message says where it looked)."""


def metrics_of(result: Dict) -> Dict[str, float]:
    """``eval/<side>/<group>`` -> score, finite values only (an empty group's NaN is left out)."""
    out = {}
    for side, data in result["sides"].items():
        for group, scores in data["scores"].items():
            values = {"": scores["accuracy"]} if "accuracy" in scores else {
                f"/{k}": v for k, v in scores.items() if isinstance(v, float)}
            for suffix, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    out[re.sub(r"[^\w\-./ ]", "_", f"eval/{side}/{group}{suffix}")] = float(value)
    agree = result.get("agreement")
    if agree:
        out["eval/agreement/questions"] = float(agree["question_agreement"])
        if agree["frames"]:
            out["eval/agreement/frames"] = float(agree["frame_agreement"])
    return out


def _iteration(folder: Path) -> int:
    match = re.fullmatch(r"iter_(\d+)", folder.name)
    if match is None:
        raise NotACheckpoint(f"{folder}: --track needs a training checkpoint (iter_N), not an import folder")
    return int(match.group(1))


@dataclass(frozen=True)
class RunLocation:
    """Where the run that wrote a checkpoint logs: its tracking store and experiment, the tag it
    carries (``checkpoint_dir``) and the checkpoint's step."""

    uri: str
    experiment: str
    checkpoint_dir: Path
    step: int


def locate_run(checkpoint: str | Path, verified: bool = False) -> RunLocation:
    """Collective where torch.distributed is up (the checkpoint's files are checked against its
    manifest by all ranks together): every rank calls it, then one rank logs (``log_metrics``).
    ``verified``: the caller checked the files already (no second full read)."""
    from casa_megatron.tracking.mlflow_tracker import resolve_tracking_uri

    cfg, folder = checkpoint_config(checkpoint, verify=not verified)
    step = _iteration(folder)
    ckpt_dir = folder.parent.resolve()
    run_dir = ckpt_dir.parent if cfg.checkpoint.dir is None else Path(cfg.run_dir)
    uri = resolve_tracking_uri(run_dir, cfg.tracking.tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():  # opening would create it
        raise NoTrackedRun(f"no MLflow store at {uri} for {ckpt_dir} (was it trained with tracking.enabled=false, "
                           "or elsewhere with MLFLOW_TRACKING_URI?)")
    return RunLocation(uri, cfg.tracking.experiment, ckpt_dir, step)


def find_run(location: RunLocation) -> Tuple[object, str]:
    """(MlflowClient, run id) of the run at ``location``; NoTrackedRun when there is none. One
    rank, no collective."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=location.uri)
    experiment = client.get_experiment_by_name(location.experiment)
    runs = [] if experiment is None else client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.checkpoint_dir = '{location.checkpoint_dir}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise NoTrackedRun(f"no MLflow run of {location.checkpoint_dir} in experiment {location.experiment!r} at "
                           f"{location.uri} (was it trained with tracking.enabled=false?)")
    return client, runs[0].info.run_id


def log_metrics(location: RunLocation, metrics: Dict[str, float]) -> Tuple[object, str]:
    """Log ``metrics`` at the checkpoint's step to its run; (client, run id)."""
    import time

    from mlflow.entities import Metric

    client, run_id = find_run(location)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, location.step) for k, v in sorted(metrics.items())])
    return client, run_id


def log_result(location: RunLocation, result: Dict, out_dir: Path) -> str:
    """Log ``result``'s scores and report files to the checkpoint's run; returns the run id."""
    client, run_id = log_metrics(location, metrics_of(result))
    for name in ("eval.json", "eval.md"):
        client.log_artifact(run_id, str(out_dir / name), artifact_path=f"eval/iter_{location.step}")
    return run_id
