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
from pathlib import Path
from typing import Dict, Tuple

from casa_megatron.evaluation.checkpoint_model import NotACheckpoint, checkpoint_config, resolve_checkpoint


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


def find_run(checkpoint: str | Path) -> Tuple[object, str, int]:
    """(MlflowClient, run id, iteration) of the run that wrote ``checkpoint``."""
    from mlflow.tracking import MlflowClient

    from casa_megatron.tracking.mlflow_tracker import resolve_tracking_uri

    folder, kind = resolve_checkpoint(checkpoint)
    step = _iteration(folder)
    cfg, _ = checkpoint_config(checkpoint)
    ckpt_dir = folder.parent.resolve()
    run_dir = ckpt_dir.parent if cfg.checkpoint.dir is None else Path(cfg.run_dir)
    uri = resolve_tracking_uri(run_dir, cfg.tracking.tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():  # opening would create it
        raise NoTrackedRun(f"no MLflow store at {uri} for {ckpt_dir} (was it trained with tracking.enabled=false, "
                           "or elsewhere with MLFLOW_TRACKING_URI?)")
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = [] if experiment is None else client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.checkpoint_dir = '{ckpt_dir}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise NoTrackedRun(f"no MLflow run of {ckpt_dir} in experiment {cfg.tracking.experiment!r} at {uri} "
                           "(was it trained with tracking.enabled=false?)")
    return client, runs[0].info.run_id, step


def log_result(checkpoint: str | Path, result: Dict, out_dir: Path) -> str:
    """Log ``result``'s scores and report files to the checkpoint's run; returns the run id."""
    import time

    from mlflow.entities import Metric

    client, run_id, step = find_run(checkpoint)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in sorted(metrics_of(result).items())])
    for name in ("eval.json", "eval.md"):
        client.log_artifact(run_id, str(out_dir / name), artifact_path=f"eval/iter_{step}")
    return run_id
