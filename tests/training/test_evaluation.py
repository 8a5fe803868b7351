"""Validation loss: equal to a direct forward pass, logged at the right steps, equal across layouts."""

from __future__ import annotations

import json

import pytest
from support.dist import run_distributed


def _direct(model, data_cfg, cfg, num_micro):
    """sum(loss * mask) / sum(mask) over the evaluation's batches, from the model's own per-token loss."""
    import torch

    from casa_megatron.data import make_eval_iterator

    it = make_eval_iterator(data_cfg, cfg.micro_batch_size, 0, 1, cfg.data.seed)
    total = tokens = 0.0
    model.eval()
    with torch.no_grad():
        for _ in range(cfg.eval_iters * num_micro):
            batch = next(it)
            per_token = model(batch)
            total += float((per_token * batch.loss_mask).sum())
            tokens += float(batch.loss_mask.sum())
    it.close()
    model.train()
    return total, tokens


def _direct_vs_evaluate(rank, world, dataset, valid):
    """evaluate() against the direct forward, for one validation source or several."""
    import dataclasses

    from casa_megatron.config import load_config
    from casa_megatron.config.schema import TrainConfig
    from casa_megatron.model.build import build_vlm
    from casa_megatron.model.chunks import ModelChunks
    from casa_megatron.parallel import initialize_parallel
    from casa_megatron.training.evaluation import evaluate
    from casa_megatron.training.optimizer import wrap_ddp

    entries = ", ".join(f"{{path: {dataset}/{name}}}" for name in valid)
    cfg = load_config(TrainConfig, "configs/tiny_cpu.yaml", [
        f"data.sources=[{{path: {dataset}/shards}}]", f"data.valid=[{entries}]", "eval_iters=2",
        "data.num_workers=0", "tracking.enabled=false"])
    initialize_parallel(1, 1, cfg.seed)
    model = build_vlm(cfg.model, cfg.parallel, cfg.data.image_seq_length)
    ddp = wrap_ddp(ModelChunks([model]), cfg)
    num_micro = cfg.global_batch_size // cfg.micro_batch_size
    got = evaluate(ddp, cfg, num_micro)
    again = evaluate(ddp, cfg, num_micro)  # same samples every time
    training = model.training
    if len(valid) == 1:
        direct = {"valid_loss": _direct(model, cfg.data, cfg, num_micro)}
    else:
        direct = {f"valid_loss/{name}": _direct(model, dataclasses.replace(cfg.data, valid=[entry]), cfg, num_micro)
                  for name, entry in zip(valid, cfg.data.valid)}
        direct["valid_loss"] = tuple(map(sum, zip(*direct.values())))
    grads = [p.main_grad.abs().sum().item() for p in model.parameters() if getattr(p, "main_grad", None) is not None]
    return got, again, {k: total / tokens for k, (total, tokens) in direct.items()}, sum(grads), training


@pytest.mark.parametrize("valid", [["valid"], ["valid", "multi"]], ids=["one_source", "per_source"])
def test_evaluate_equals_a_direct_forward_and_leaves_no_gradient(generated_run_data, valid):
    """With several validation sources each is scored on its own batches (``valid_loss/<name>``)
    and ``valid_loss`` is the token-weighted mean over all of them."""
    got, again, direct, grad_sum, training = run_distributed(_direct_vs_evaluate, world_size=1,
                                                            dataset=str(generated_run_data), valid=valid)[0]
    assert got.keys() == direct.keys() and again == got
    for key, value in direct.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key
    assert grad_sum == 0.0 and training  # no gradient accumulated, train mode restored
    if len(valid) > 1:
        assert abs(got["valid_loss/valid"] - got["valid_loss/multi"]) > 1e-3  # two different scores


def test_source_names_are_short_and_unique():
    from casa_megatron.training.evaluation import source_names

    assert source_names([{"path": "/d/docvqa_val.jsonl"}, "/e/valid/", {"path": "/f/valid", "weight": 2},
                         "/g/shards.tar"]) == ["docvqa_val", "valid", "valid_2", "shards"]


def _train(rank, world, run_dir, overrides):
    from casa_megatron.config import load_config
    from casa_megatron.config.schema import TrainConfig
    from casa_megatron.training.loop import train

    cfg = load_config(TrainConfig, overrides[0], [f"run_dir={run_dir}", *overrides[1:]])
    return train(cfg)


def test_validation_loss_is_logged_at_the_right_steps(tmp_path, generated_run_data):
    run_dir = tmp_path / "run"
    d = generated_run_data
    run_distributed(_train, world_size=1, run_dir=str(run_dir), overrides=[
        "configs/tiny_cpu.yaml", f"data.sources=[{{path: {d}/shards, weight: 3}}, {{path: {d}/multi}}]",
        f"data.valid=[{{path: {d}/valid}}, {{path: {d}/multi}}]", "train_steps=4", "eval_interval=3", "log_interval=2",
        "global_batch_size=4", "checkpoint.save_interval=0", "optimizer.warmup_steps=1",
        "optimizer.wsd_decay_steps=1", "tracking.system_metrics=false"])
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    valid = [(r["step"], r["valid_loss"]) for r in rows if "valid_loss" in r]
    assert [s for s, _ in valid] == [3, 4]  # every eval_interval steps and at the end
    assert [r["step"] for r in rows if "loss" in r] == [2, 4]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run, = client.search_runs([client.get_experiment_by_name("casa_megatron").experiment_id])
    history = client.get_metric_history(run.info.run_id, "valid_loss")
    assert [(m.step, pytest.approx(m.value)) for m in history] == valid
    for name in ("valid", "multi"):  # each validation source on its own, in the file and in MLflow
        per_source = [(r["step"], r[f"valid_loss/{name}"]) for r in rows if "valid_loss" in r]
        history = client.get_metric_history(run.info.run_id, f"valid_loss/{name}")
        assert [(m.step, pytest.approx(m.value)) for m in history] == per_source
    assert (run_dir / "loss.png").stat().st_size > 0


def test_validation_loss_is_the_same_under_tensor_parallelism(tmp_path):
    """The synthetic task validates on its own held-out stream; TP=2 + SP gives TP=1's losses."""
    curves = {}
    for name, world, extra in (("tp1", 1, []), ("tp2_sp", 2, ["parallel.tensor_model_parallel_size=2",
                                                              "parallel.sequence_parallel=true"])):
        run_dir = tmp_path / name
        run_distributed(_train, world_size=world, run_dir=str(run_dir), overrides=[
            "configs/tiny_cpu_synthetic.yaml", "train_steps=4", "log_interval=2", "eval_interval=2", "eval_iters=2",
            "data.valid=[{path: synthetic}]", "tracking.enabled=false", "checkpoint.save_interval=0",
            "optimizer.warmup_steps=2", "optimizer.wsd_decay_steps=2", *extra])
        rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
        curves[name] = [(r["step"], r["valid_loss"]) for r in rows if "valid_loss" in r]
    assert [s for s, _ in curves["tp1"]] == [2, 4]
    for (s1, v1), (s2, v2) in zip(curves["tp1"], curves["tp2_sp"], strict=True):
        assert s1 == s2 and v2 == pytest.approx(v1, rel=1e-4)


def test_a_validation_source_this_layout_cannot_read_stops_the_run_before_training(tmp_path, generated_run_data):
    """One validation sample for two data-parallel ranks: refused at start (naming the source and
    the reason), not at the first evaluation after eval_interval steps of training."""
    import tarfile

    src = sorted((generated_run_data / "valid").glob("*.tar"))[0]
    tiny = tmp_path / "tiny_valid"
    tiny.mkdir()
    with tarfile.open(src) as full, tarfile.open(tiny / "shard-000000.tar", "w") as one:
        members = full.getmembers()
        first = members[0].name.split(".")[0]
        for m in members:
            if m.name.split(".")[0] == first:
                one.addfile(m, full.extractfile(m))
    run_dir = tmp_path / "run"
    d = generated_run_data
    with pytest.raises(AssertionError, match=r"validation source data.valid .*tiny_valid.* cannot be read at "
                                             r"dp_size=2: the dataset has 1 samples, fewer than dp_size=2"):
        run_distributed(_train, world_size=2, run_dir=str(run_dir), overrides=[
            "configs/tiny_cpu.yaml", f"data.sources=[{{path: {d}/shards}}]", f"data.valid=[{{path: {tiny}}}]",
            "train_steps=4", "eval_interval=3", "tracking.enabled=false", "optimizer.warmup_steps=1",
            "optimizer.wsd_decay_steps=1"])
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "config.yaml").exists()
