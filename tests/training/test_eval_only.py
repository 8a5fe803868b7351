"""``skip_train=true`` (Megatron-LM's ``--skip-train``): a checkpoint is scored without a step.
Its validation loss and answers are the ones its run logged at that step (one process: exactly;
TP=2 from ``checkpoint.pretrained``: the loss within rounding, the same answers), the scores
reach the run's MLflow run at that step, a run holding its folder (still training) is scored
there, and nothing of the run is written or overwritten."""

from __future__ import annotations

import hashlib
import json

import pytest
from support.dist import run_distributed
from support.generation_runs import ANSWERS, rows, run_cfg, train_run

from casa_megatron.config.errors import ConfigError
from casa_megatron.training.ckpt_manifest import read_manifest


def _fingerprint(run_dir):
    """Every file of the run except what skip_train adds, with its content hash."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and "evaluations" not in p.parts
            and p.name != "mlflow.db" and p.suffix != ".lock"}


def _counted_run(rank, world, **kwargs):
    """(``train_run``'s result, how many times each checkpoint file was checksummed)."""
    from support.spies import counting_checksums

    return counting_checksums(train_run, rank, world, **kwargs)


def _scored(run):
    """The run's own scores per step: validation loss and answers."""
    out = {}
    for row in rows(run):
        if "valid_loss" in row:
            out.setdefault(row["step"], {})["valid_loss"] = row["valid_loss"]
        if "generation" in row:
            out.setdefault(row["step"], {}).update({f"eval/megatron/{k}": v for k, v in row["generation"].items()})
    return out


def test_a_checkpoint_scores_as_its_run_scored_it(generation_runs, tmp_path):
    run, valid = generation_runs["evaluated"], generation_runs["valid"]
    logged = _scored(run)
    assert sorted(logged) == [12, 24] and all("valid_loss" in s and "eval/megatron/all" in s for s in logged.values())
    scoring = ["skip_train=true", f"data.valid=[{{path: {valid}}}]", "eval_iters=2",
               f"eval_generation.data={valid}", *ANSWERS]

    # in the run's own folder, as its recipe, while the run holds it (a run still training): the
    # newest checkpoint (step 24), tracked to its MLflow run
    from casa_megatron.runtime.lock import RunDirLock

    before = _fingerprint(run)
    lock = RunDirLock(run).acquire()
    try:
        got, checked = run_distributed(_counted_run, world_size=1, data=str(valid.parent), run_dir=str(run),
                                       overrides=[*scoring, "train_steps=24", "tracking.enabled=true"])[0]
    finally:
        lock.release()
    assert got["status"] == "EVALUATED" and got["steps"] == 24
    # the checkpoint's files read for their checksums once: loading it and locating its MLflow run
    # used to read them twice
    files = read_manifest(run / "checkpoints/iter_0000024")["files"]
    assert len(checked) == len(files) and set(checked.values()) == {1}, checked
    assert got["scores"] == logged[24]  # exactly: the same weights, batches and tokens
    assert _fingerprint(run) == before  # checkpoints, config.yaml, metrics.jsonl, answers: untouched
    written = json.loads((run / "evaluations/iter_0000024.json").read_text())
    assert written["scores"] == logged[24] and written["checkpoint"].endswith("iter_0000024")
    assert written["config"]["skip_train"] is True and written["generation"]["sides"]["megatron"]["questions"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    tracked, = client.search_runs([client.get_experiment_by_name("casa_megatron").experiment_id])
    history = sorted((m.step, m.value) for m in client.get_metric_history(tracked.info.run_id, "valid_loss"))
    assert history == [(12, logged[12]["valid_loss"]), (24, logged[24]["valid_loss"]),
                       (24, logged[24]["valid_loss"])]  # the run's two evaluations, then this one

    # another layout and run folder: TP=2 + SP from an earlier checkpoint, weights only
    elsewhere = tmp_path / "scored_at_tp2"
    got = run_distributed(train_run, world_size=2, data=str(valid.parent), run_dir=str(elsewhere), overrides=[
        *scoring, f"checkpoint.pretrained={run / 'checkpoints/iter_0000012'}", "parallel.tensor_model_parallel_size=2",
        "parallel.sequence_parallel=true"])
    assert [g["steps"] for g in got] == [12, 12]
    scores = got[0]["scores"]  # TP rank 0 of the last stage holds them
    assert scores.pop("valid_loss") == pytest.approx(logged[12]["valid_loss"], rel=1e-5)
    assert scores == {k: v for k, v in logged[12].items() if k != "valid_loss"}
    assert sorted(p.name for p in elsewhere.iterdir()) == ["evaluations"]  # no checkpoints, config.yaml or lock
    # item by item: the tokens the run answered at step 12 (sequence parallelism pads the prompts)
    ours = json.loads((elsewhere / "evaluations/iter_0000012.json").read_text())["generation"]["sides"]["megatron"]
    kept = json.loads((run / "generation/iter_0000012.json").read_text())["sides"]["megatron"]
    assert [q["tokens"] for q in ours["questions"]] == [q["tokens"] for q in kept["questions"]]
    assert [c["frames"] for c in ours["captions"]] == [c["frames"] for c in kept["captions"]]


def test_a_second_evaluation_of_a_step_is_kept_beside_the_first(tmp_path):
    from casa_megatron.training.eval_only import _results_path

    first = _results_path(tmp_path, 7)
    first.parent.mkdir()
    first.write_text("{}")
    assert first.name == "iter_0000007.json" and _results_path(tmp_path, 7).name == "iter_0000007-2.json"


def test_nothing_to_score_is_refused(generation_runs, tmp_path):
    valid = generation_runs["valid"]
    with pytest.raises(ConfigError, match="skip_train=true scores a checkpoint and needs something to score it on"):
        run_cfg(valid.parent, tmp_path / "nothing", ["skip_train=true"])
    with pytest.raises(ConfigError, match="skip_train_checkpoints=all scores the checkpoints of checkpoint.dir: "
                                          "it needs skip_train=true"):
        run_cfg(valid.parent, tmp_path / "nothing", ["skip_train_checkpoints=all"])
    with pytest.raises(ConfigError, match="skip_train_checkpoints='every': must be one of"):
        run_cfg(valid.parent, tmp_path / "nothing", ["skip_train=true", f"data.valid=[{{path: {valid}}}]",
                                                     "skip_train_checkpoints=every"])
    with pytest.raises(AssertionError, match="ConfigError: skip_train=true: no checkpoint to score: .* holds none "
                                             "and checkpoint.pretrained is not set"):
        run_distributed(train_run, world_size=1, data=str(valid.parent), run_dir=str(tmp_path / "empty"),
                        overrides=["skip_train=true", f"data.valid=[{{path: {valid}}}]"])
    assert not (tmp_path / "empty" / "checkpoints").exists()


def test_every_checkpoint_of_a_run_is_scored_oldest_first(generation_runs, tmp_path):
    """``skip_train_checkpoints=all``: the run's held-out curve, each checkpoint scored as the run
    scored it at that step, one results file per step; a damaged checkpoint is skipped and named."""
    import shutil

    run, valid = generation_runs["evaluated"], generation_runs["valid"]
    logged = _scored(run)
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(run / "checkpoints", checkpoints)
    scoring = ["skip_train=true", "skip_train_checkpoints=all", f"checkpoint.dir={checkpoints}",
               f"data.valid=[{{path: {valid}}}]", "eval_iters=2", f"eval_generation.data={valid}", *ANSWERS]
    got = run_distributed(train_run, world_size=1, data=str(valid.parent), run_dir=str(tmp_path / "all"),
                          overrides=scoring)[0]
    assert got["scored"] == {12: logged[12], 24: logged[24]} and got["skipped"] == []
    assert got["steps"] == 24 and got["scores"] == logged[24]
    assert sorted(p.name for p in (tmp_path / "all" / "evaluations").iterdir()) == [
        "iter_0000012.json", "iter_0000024.json"]

    shard = max((p for p in (checkpoints / "iter_0000012").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:-64])  # a save cut short
    got = run_distributed(train_run, world_size=1, data=str(valid.parent), run_dir=str(tmp_path / "damaged"),
                          overrides=scoring)[0]
    assert got["skipped"] == ["iter_0000012"] and got["scored"] == {24: logged[24]}
    assert shard.exists()  # scoring sets nothing aside: the folder is only read


def _share_run(rank, world, **kwargs):
    """(``train_run``'s result, the held-out reads of this rank: (share, sample indices))."""
    from support.spies import held_out_reads

    return held_out_reads(train_run, rank, world, **kwargs)


def test_data_parallel_replicas_read_only_their_share(generation_runs, tmp_path):
    """Two data-parallel replicas: each reads and decodes every other held-out sample, answers its
    own, and the answers come back in the samples' order, those of one process item by item. A
    bad sample in one replica's share stops both, naming it (no replica waits for the other)."""
    run, valid = generation_runs["evaluated"], generation_runs["valid"]
    logged = _scored(run)
    got = run_distributed(_share_run, world_size=2, data=str(valid.parent), run_dir=str(tmp_path / "dp2"), overrides=[
        "skip_train=true", f"checkpoint.pretrained={run / 'checkpoints/iter_0000012'}",
        f"eval_generation.data={valid}", *ANSWERS])
    (result, (first,)), (_, (second,)) = got
    assert [first[0], second[0]] == [(0, 2), (1, 2)]
    assert first[1] and second[1] and not set(first[1]) & set(second[1])
    assert sorted(first[1] + second[1]) == list(range(len(first[1]) + len(second[1])))
    assert result["scores"] == {k: v for k, v in logged[12].items() if k != "valid_loss"}
    ours = json.loads((tmp_path / "dp2/evaluations/iter_0000012.json").read_text())["generation"]
    kept = json.loads((run / "generation/iter_0000012.json").read_text())
    assert ours["skipped"] == kept["skipped"]
    ours, kept = ours["sides"]["megatron"], kept["sides"]["megatron"]
    assert [(q["id"], q["tokens"]) for q in ours["questions"]] == [(q["id"], q["tokens"]) for q in kept["questions"]]
    assert [c["frames"] for c in ours["captions"]] == [c["frames"] for c in kept["captions"]]

    images = sorted((valid.parent / "raw").glob("*.png"))[:3]
    rows = [{"id": f"q{i}", "image": str(image), "metric": "ansl" if i == 1 else "exact",
             "conversations": [{"from": "human", "value": "<image>\nwhat colour is the shape ?"},
                               {"from": "gpt", "value": "red"}]} for i, image in enumerate(images)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    errors = run_distributed(_config_error, world_size=2, timeout=300, data=str(valid.parent),
                             run_dir=str(tmp_path / "bad"), overrides=[
                                 "skip_train=true", f"checkpoint.pretrained={run / 'checkpoints/iter_0000012'}",
                                 f"eval_generation.data={bad}", *ANSWERS])
    for error in errors:  # rank 0's share holds samples 0 and 2 only
        assert "eval_generation.data=" in error and "sample 'q1', answer 1: metric 'ansl' is not one of" in error


def _config_error(rank, world, **kwargs):
    """The ConfigError ``train_run`` stops with on this rank, or None."""
    try:
        train_run(rank, world, **kwargs)
    except ConfigError as exc:
        return str(exc)
    return None
