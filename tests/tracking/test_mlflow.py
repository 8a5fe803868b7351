"""MLflow tracking against a real ``mlflow server`` on 127.0.0.1 started by the test."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from support.dist import run_distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    # Its own session: `mlflow server` leaves worker processes behind after SIGTERM, so the
    # whole process group is ended at teardown.
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail(f"mlflow server did not start: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.5)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _train(rank, world, run_dir, uri):
    os.environ["MLFLOW_TRACKING_URI"] = uri
    from casa_megatron.config import load_config
    from casa_megatron.config.schema import TrainConfig
    from casa_megatron.training.loop import train

    cfg = load_config(TrainConfig, "configs/tiny_cpu_synthetic.yaml", [
        f"run_dir={run_dir}", "train_steps=12", "log_interval=4", "optimizer.warmup_steps=4",
        "optimizer.wsd_decay_steps=4", "tracking.system_metrics_interval_s=1"])
    return train(cfg)


def test_params_metrics_artifacts_and_system_metrics_reach_the_server(tmp_path, mlflow_server):
    run_distributed(_train, world_size=1, run_dir=str(tmp_path / "run"), uri=mlflow_server)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    run, = client.search_runs([client.get_experiment_by_name("casa_megatron").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.fusion.placement"] == "parallel"
    assert run.data.params["parallel.tensor_model_parallel_size"] == "1"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [4, 8, 12]
    for name in ("lr_new", "grad_norm", "text_tokens_per_s", "step_time_s", "peak_memory_gib"):
        assert name in run.data.metrics, name
    assert any(k.startswith("system/") for k in run.data.metrics), sorted(run.data.metrics)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "loss.png"}
    assert run.data.tags["checkpoint_dir"].endswith("checkpoints")
