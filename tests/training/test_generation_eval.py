"""``eval_generation``: during training the live model answers held-out questions and captions
held-out clips greedily; the scores logged at a step are the ones ``casa-eval`` gives the
checkpoint of that step, the loss curve is the one of a run without these evaluations, and a
TP=2 run logs the one-process scores. On the generated dataset (chat-template layout)."""

from __future__ import annotations

import json

import pytest
from support.dist import run_distributed
from support.generation_runs import ANSWERS
from support.generation_runs import rows as _rows
from support.generation_runs import train_run as _train

from casa_megatron.config import load_config
from casa_megatron.config.errors import ConfigError
from casa_megatron.config.schema import TrainConfig


def _casa_eval(rank, world, argv):
    from casa_megatron.evaluation.cli import main

    return main(argv)


def test_scores_at_a_step_are_casa_evals_of_that_steps_checkpoint(generation_runs, tmp_path):
    from casa_megatron.evaluation.tracking import metrics_of

    rows = [r for r in _rows(generation_runs["evaluated"]) if "generation" in r]
    assert [r["step"] for r in rows] == [12, 24]
    for row in rows:
        out = tmp_path / f"step{row['step']}"
        checkpoint = generation_runs["evaluated"] / f"checkpoints/iter_{row['step']:07d}"
        argv = ["--data", str(generation_runs["valid"]), "--checkpoint", str(checkpoint),
                "--out", str(out), "--max-samples", "6", "--max-new-tokens", "5"]
        assert run_distributed(_casa_eval, world_size=1, argv=argv) == [0]
        offline = json.loads((out / "eval.json").read_text())
        assert {f"eval/megatron/{k}": v for k, v in row["generation"].items()} == metrics_of(offline)
        assert {"all", "coarse"} <= set(row["generation"])
        # item by item: the same tokens for every question and caption frame
        kept = json.loads((generation_runs["evaluated"] / f"generation/iter_{row['step']:07d}.json").read_text())
        ours, theirs = kept["sides"]["megatron"], offline["sides"]["megatron"]
        assert [q["tokens"] for q in ours["questions"]] == [q["tokens"] for q in theirs["questions"]]
        assert [c["frames"] for c in ours["captions"]] == [c["frames"] for c in theirs["captions"]]
        assert len(ours["questions"]) >= 4 and len({tuple(q["tokens"]) for q in ours["questions"]}) > 1, ours


def test_the_loss_curve_does_not_change_and_tp2_answers_alike(generation_runs):
    """The plain run goes two steps past the first evaluation (step 12)."""
    plain, evaluated = _rows(generation_runs["plain"]), [r for r in _rows(generation_runs["evaluated"]) if "loss" in r]
    assert [(r["step"], r["loss"]) for r in evaluated[:14]] == [(r["step"], r["loss"]) for r in plain]
    one = [r for r in _rows(generation_runs["evaluated"]) if "generation" in r][:1]
    tp2 = [r for r in _rows(generation_runs["evaluated_tp2"]) if "generation" in r]
    assert [r["step"] for r in tp2] == [12] and [r["generation"] for r in tp2] == [r["generation"] for r in one]
    tokens = [json.loads((generation_runs[name] / "generation/iter_0000012.json").read_text())["sides"]["megatron"]
              for name in ("evaluated", "evaluated_tp2")]
    assert [q["tokens"] for q in tokens[0]["questions"]] == [q["tokens"] for q in tokens[1]["questions"]]


def test_the_config_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="needs eval_generation.data"):
        load_config(TrainConfig, None, ["eval_generation.interval=5"])


def test_a_wrong_folder_stops_the_run_before_step_1(generation_runs, tmp_path):
    """A config error naming the field, at start-up (not after N steps), with nothing written."""
    data = generation_runs["valid"].parent
    for folder, message in ((tmp_path / "absent", "does not exist"), (data / "tokenizer", "")):
        run_dir = tmp_path / f"run_{folder.name}"
        with pytest.raises(AssertionError, match=f"ConfigError: eval_generation.data='{folder}'.*{message}"):
            run_distributed(_train, world_size=1, data=str(data), run_dir=str(run_dir),
                            overrides=[f"eval_generation.data={folder}", "eval_generation.interval=2", "train_steps=4"])
        assert not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text()


def test_the_interleaved_schedule_answers_as_one_process(generation_runs, tmp_path):
    """PP=2 with two model chunks per rank (4 layers), in bf16: every chunk reads the batch,
    repeated PP times as the interleaved schedule needs; the tokens are the one-process run's."""
    data = generation_runs["valid"].parent
    evaluated = [f"eval_generation.data={generation_runs['valid']}", "eval_generation.interval=12", *ANSWERS,
                 "train_steps=12", "model.lm.num_layers=4", "precision.bf16=true"]
    answers = {}
    for name, extra, world in (("one", [], 1), ("vpp", ["parallel.pipeline_model_parallel_size=2",
                                                         "parallel.virtual_pipeline_model_parallel_size=2"], 2)):
        run_distributed(_train, world_size=world, data=str(data), run_dir=str(tmp_path / name),
                        overrides=[*evaluated, *extra])
        kept = json.loads((tmp_path / name / "generation/iter_0000012.json").read_text())["sides"]["megatron"]
        answers[name] = ([q["tokens"] for q in kept["questions"]], kept["scores"])
    assert answers["vpp"] == answers["one"] and all(answers["one"][0])
