"""``casa-eval``: a tiny model trained for a few steps on the generated dataset (chat-template
layout), exported to a Hugging Face folder, answers the held-out split through megatron
(recomputation) and through the exported model (its cache): the two give the same tokens on
every question and caption frame, and the answers are not all the same."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.dist import run_distributed

from casa_megatron.evaluation.cli import main
from casa_megatron.evaluation.metrics import caption_scores, exact, question_scores, token_f1
from casa_megatron.training.ckpt_manifest import read_manifest

ROOT = Path(__file__).resolve().parents[2]


def _export(rank, world, checkpoint, out):
    from support.hf_checkpoint_export import export_checkpoint

    return str(export_checkpoint(checkpoint, out))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(held-out split, checkpoint folder, exported HF folder)."""
    from casa_megatron.data.synthetic_dataset import make_dataset

    root = tmp_path_factory.mktemp("eval")
    make_dataset(root / "data", num_images=12, num_videos=2, num_multi=4, seed=3, video_seconds=2.0,
                 valid_fraction=0.5, samples_per_shard=8, progress=False)
    run = root / "run"
    cmd = [sys.executable, "-m", "casa_megatron.train", str(ROOT / "configs/tiny_cpu.yaml"), f"run_dir={run}",
           f"data.sources=[{{path: {root}/data/shards, weight: 3}}, {{path: {root}/data/multi, weight: 1}}]",
           "train_steps=30", "checkpoint.save_interval=30", "log_interval=10", "optimizer.warmup_steps=3",
           "optimizer.wsd_decay_steps=5", "tracking.system_metrics=false"]  # tracked: casa-eval --track logs there
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf = run_distributed(_export, world_size=1, checkpoint=str(run / "checkpoints"), out=str(root / "hf"))[0]
    return root / "data" / "valid", run / "checkpoints", Path(hf)


def test_megatron_and_hf_answer_alike_and_the_scores_reach_the_model_card(trained, tmp_path):
    valid, checkpoint, hf = trained
    assert json.loads((hf / "processor_config.json").read_text())["text_layout"] == "chat_template"
    assert json.loads((hf / "config.json").read_text())["placeholders_in_stream"] is False
    from transformers import AutoTokenizer

    stops = json.loads((hf / "generation_config.json").read_text())["eos_token_id"]
    assert AutoTokenizer.from_pretrained(str(hf)).convert_ids_to_tokens(stops[0]) == "<|im_end|>"  # end of turn
    out = tmp_path / "both"
    proc = subprocess.run([sys.executable, "-m", "casa_megatron.evaluation", "--data", str(valid), "--checkpoint",
                           str(checkpoint), "--hf", str(hf), "--out", str(out), "--max-new-tokens", "10"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "eval.json").read_text())
    agree = result["agreement"]
    assert agree["all_equal"] and agree["questions"] >= 8 and agree["frames"] >= 4, agree
    megatron = result["sides"]["megatron"]
    answers = [q["answer"] for q in megatron["questions"]]
    assert len(set(answers)) > 2, answers  # a model that says one thing would agree trivially
    assert {"all", "coarse", "fine", "caption", "task:colour", "task:more"} <= set(megatron["scores"])
    assert any(f["tokens"] for c in megatron["captions"] for f in c["frames"])
    assert "megatron vs HF" in (out / "eval.md").read_text()
    # the HF side alone (no megatron at all), 3 questions per left-padded generate(), gives the same answers
    assert main(["--data", str(valid), "--hf", str(hf), "--out", str(tmp_path / "hf"), "--max-new-tokens", "10",
                 "--batch-size", "3"]) == 0
    alone = json.loads((tmp_path / "hf" / "eval.json").read_text())["sides"]["hf"]
    assert [q["tokens"] for q in alone["questions"]] == [q["tokens"] for q in megatron["questions"]]

    # eval.json names the checkpoint it scored by its manifest; export-hf --eval-results puts the
    # scores into the model card, where the Hub's parser reads them
    from huggingface_hub import ModelCard

    from casa_megatron.training.ckpt_manifest import manifest_digest

    assert result["checkpoint_digest"] == manifest_digest(Path(result["checkpoint_folder"])) is not None
    exported = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "casa_megatron.conversion", "export-hf", str(checkpoint),
                           str(exported), "--no-progress", "--eval-results", str(out / "eval.json")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = ModelCard.load(exported / "README.md")
    by_metric = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert by_metric["accuracy"] == round(megatron["scores"]["all"]["accuracy"], 4)
    assert by_metric["f1"] == round(megatron["scores"]["caption"]["caption_f1"], 4)
    assert f"| coarse | {megatron['scores']['coarse']['n']} | " in (exported / "README.md").read_text()
    # the run's loss curves travel with the export, and the card shows them
    assert (exported / "loss.png").read_bytes() == (checkpoint.parent / "loss.png").read_bytes()
    assert "](loss.png)" in (exported / "README.md").read_text()


def _eval_ranks(rank, world, valid, checkpoint, out, tp, pp, track=False, batch=1, hf=None):
    """(exit code, how many times this rank checksummed each checkpoint file, its held-out reads)."""
    from support.spies import counting_checksums, held_out_reads

    from casa_megatron.evaluation.cli import main

    (code, checked), reads = held_out_reads(counting_checksums, main, [
        "--data", valid, "--checkpoint", checkpoint, "--out", out, "--max-new-tokens", "6", "--tensor-parallel",
        str(tp), "--pipeline-parallel", str(pp), "--batch-size", str(batch), *(["--track"] if track else []),
        *(["--hf", hf] if hf else [])])
    return code, checked, reads


def _batched_and_alone(rank, world, valid, checkpoint):
    """(worker) Every question and clip answered alone, then in batches of several rows."""
    import dataclasses

    from casa_megatron.evaluation.checkpoint_model import load_checkpoint_model
    from casa_megatron.evaluation.cli import parse_args, settings_for
    from casa_megatron.evaluation.items import read_items
    from casa_megatron.evaluation.megatron_side import greedy_for

    settings = settings_for(parse_args(["--data", valid, "--checkpoint", checkpoint]))
    items = read_items(valid, settings)
    model, cfg = load_checkpoint_model(checkpoint)
    runner = greedy_for(model, cfg, settings, 6)
    rows = []
    forward = runner.next_tokens
    runner.next_tokens = lambda samples: rows.append(len(samples)) or forward(samples)
    clip = items.captions[0]
    # clips of different lengths: the shorter one drops out of the batch after its last frame
    short = dataclasses.replace(clip, frames=clip.frames[:2], times=clip.times[:2], references=clip.references[:2])
    clips = [short, clip, short]
    alone = ([runner.answer(q) for q in items.questions], [runner.caption(c) for c in clips])
    rows_alone, rows[:] = list(rows), []
    encoded = []  # projector runs: the encoder's
    model.projector.register_forward_hook(lambda *_: encoded.append(1))
    together = (runner.answer_batch(items.questions), runner.caption_batch(clips))
    rows_together, encoded_reused, encoded[:] = list(rows), len(encoded), []
    runner.reuse_image_tokens = False  # the encoder at every forward again
    recomputed = (runner.answer_batch(items.questions), runner.caption_batch(clips))
    return alone, together, rows_alone, rows_together, recomputed, encoded_reused, len(encoded)


def test_batched_generation_gives_every_item_its_own_tokens(trained):
    """``MegatronGreedy.answer_batch`` / ``caption_batch`` (``--batch-size``, ``eval_generation.batch_size``):
    one row per question or clip, each row padded after its last token, the rows that stopped
    dropped from the next forward. Every item gets the tokens it gets alone, with fewer forwards."""
    valid, checkpoint, _ = trained
    (alone, together, rows_alone, rows_together, recomputed, encoded_reused, encoded), = run_distributed(
        _batched_and_alone, world_size=1, valid=str(valid), checkpoint=str(checkpoint), timeout=300)
    assert together == alone
    (questions, captions) = alone
    assert len(questions) >= 4 and len({tuple(q) for q in questions}) > 1 and any(map(any, captions[1]))
    assert set(rows_alone) == {1} and max(rows_together) == len(questions)
    assert len(rows_together) < len(rows_alone) / 2
    # the vision encoder runs once per set of images (a row leaving or a frame arriving changes it),
    # not at every forward; the tokens are those of running it every time
    assert recomputed == together
    assert encoded == len(rows_together) and encoded_reused < encoded / 2, (encoded_reused, encoded)


def test_the_megatron_side_runs_tensor_and_pipeline_parallel(trained, tmp_path, capsys):
    """``--tensor-parallel 2`` and ``--pipeline-parallel 2`` (two gloo ranks, as under torchrun):
    the checkpoint loads at that layout and generates the one-process tokens on every question
    and caption frame, several questions per forward (``--batch-size``); two processes at TP = PP = 1 are two data-parallel replicas that each read
    and answer half of the samples and give them back in order; rank 0 alone writes the report (and, with ``--track``, logs
    the scores: it used to wait there for the other ranks to check the checkpoint's files with it,
    and crashed when they exited). A launch of the wrong size is refused."""
    valid, checkpoint, hf = trained
    runs = {}
    # one question per generation in one process; several (rows of one batch) in the parallel layouts
    for name, tp, pp, world, batch in (("one", 1, 1, 1, 1), ("tp2", 2, 1, 2, 3), ("pp2", 1, 2, 2, 4),
                                       ("dp2", 1, 1, 2, 2), ("dp2_hf", 1, 1, 2, 2)):
        out = tmp_path / name
        got = run_distributed(_eval_ranks, world_size=world, valid=str(valid), checkpoint=str(checkpoint),
                              out=str(out), tp=tp, pp=pp, track=name == "pp2", batch=batch, timeout=300,
                              hf=str(hf) if name == "dp2_hf" else None)
        assert [code for code, _, _ in got] == [0] * world, (name, got)
        # each file of the checkpoint read for its checksum once per rank (checked at the start,
        # before torch.distributed is up; the configuration, the model and the tracked run then come
        # from the folder checked): it used to be three times, four with --track
        files = read_manifest(checkpoint / "iter_0000030")["files"]
        for _, checked, _ in got:
            assert len(checked) == len(files) and set(checked.values()) == {1}, (name, checked)
        # the held-out samples: all by every rank of a replica; two replicas read disjoint halves,
        # except that rank 0 reads them all for the HF side (--hf)
        (share, read), = got[0][2]
        if name.startswith("dp2"):
            (other, read_other), = got[1][2]
            assert other == (1, 2) and read_other and set(read_other) == set(range(1, len(read_other) * 2 + 1, 2))
            if name == "dp2":
                assert share == (0, 2) and sorted(read + read_other) == list(range(len(read) + len(read_other)))
            else:
                assert share == (0, 1) and set(read_other) < set(read) and len(read) >= 2 * len(read_other)
                assert json.loads((out / "eval.json").read_text())["agreement"]["all_equal"]
        else:
            assert share == (0, 1) and all(g[2] == got[0][2] for g in got), (name, got)
        result = json.loads((out / "eval.json").read_text())
        assert result["megatron_layout"] == {"tensor_parallel": tp, "pipeline_parallel": pp,
                                             "data_parallel": world // (tp * pp)}
        if name == "pp2":  # --track: the scores in the training run's MLflow, at the checkpoint's step
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=f"sqlite:///{checkpoint.parent / 'mlflow.db'}")
            run, = client.search_runs([client.get_experiment_by_name("casa_megatron").experiment_id])
            logged = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/megatron/all")]
            assert (30, result["sides"]["megatron"]["scores"]["all"]["accuracy"]) in logged
        side = result["sides"]["megatron"]
        runs[name] = ([q["tokens"] for q in side["questions"]], [f["tokens"] for c in side["captions"] for f in c["frames"]])
    questions, frames = runs["one"]
    assert len(questions) >= 4 and frames and len({tuple(q) for q in questions}) > 1
    assert runs["tp2"] == runs["one"] and runs["pp2"] == runs["one"] and runs["dp2"] == runs["one"] == runs["dp2_hf"]
    with pytest.raises(SystemExit):
        main(["--data", str(valid), "--checkpoint", str(checkpoint), "--tensor-parallel", "2"])
    assert "needs a multiple of 2 processes" in capsys.readouterr().err


def test_track_logs_the_scores_to_the_training_run_at_its_step(trained, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    valid, checkpoint, hf = trained
    out = tmp_path / "tracked"
    # in a child process: the megatron side initialises torch.distributed, which must never happen
    # in the test process (every later forked worker would crash)
    proc = subprocess.run([sys.executable, "-m", "casa_megatron.evaluation", "--data", str(valid), "--hf", str(hf),
                           "--checkpoint", str(checkpoint), "--out", str(out), "--max-new-tokens", "4",
                           "--max-samples", "4", "--track"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = proc.stdout.strip().splitlines()[-1].split()[-1]
    client = MlflowClient(tracking_uri=f"sqlite:///{checkpoint.parent / 'mlflow.db'}")
    assert client.get_run(run_id).data.tags["checkpoint_dir"] == str(checkpoint.resolve())
    result = json.loads((out / "eval.json").read_text())
    for side in ("megatron", "hf"):  # the megatron side may also hold the PP=2 test's scores (other items)
        history = client.get_metric_history(run_id, f"eval/{side}/all")
        assert (30, result["sides"][side]["scores"]["all"]["accuracy"]) in [(m.step, m.value) for m in history]
        assert client.get_metric_history(run_id, f"eval/{side}/task_colour") or \
            "task:colour" not in result["sides"][side]["scores"]
    assert client.get_metric_history(run_id, "eval/agreement/questions")[0].value == 1.0
    assert sorted(a.path for a in client.list_artifacts(run_id, "eval/iter_30")) == [
        "eval/iter_30/eval.json", "eval/iter_30/eval.md"]
    # --track needs a checkpoint, and a run to log to: refused before anything is evaluated
    untracked = tmp_path / "untracked" / "iter_0000030"
    shutil.copytree(checkpoint / "iter_0000030", untracked)
    assert main(["--data", str(valid), "--checkpoint", str(untracked.parent), "--out", str(tmp_path / "no"),
                 "--track"]) == 2
    assert "no MLflow store at" in capsys.readouterr().err and not (tmp_path / "no").exists()
    assert not (untracked.parent / "mlflow.db").exists()  # looking did not create a store


def _never(*args, **kwargs):
    raise AssertionError("called before the data was checked")


def test_bad_inputs_are_named(trained, tmp_path, capsys, monkeypatch):
    valid, checkpoint, hf = trained
    assert main(["--data", str(valid), "--checkpoint", str(tmp_path / "nothing")]) == 2
    assert "no such directory; expected a training checkpoint" in capsys.readouterr().err
    assert main(["--data", str(valid), "--checkpoint", str(valid)]) == 2  # a folder, but not a checkpoint
    assert "is not a checkpoint" in capsys.readouterr().err
    broken = tmp_path / "broken" / "iter_0000001"
    broken.mkdir(parents=True)
    for name in ("config.yaml", "metadata.json", "manifest.json"):
        (broken / name).write_text((checkpoint / "iter_0000030" / name).read_text())
    assert main(["--data", str(valid), "--checkpoint", str(broken.parent)]) == 2
    err = capsys.readouterr().err
    assert "incomplete or damaged" in err and "is missing" in err, err
    assert main(["--data", str(valid), "--hf", str(checkpoint)]) == 2
    assert "not a Hugging Face model folder" in capsys.readouterr().err
    assert main(["--data", str(tmp_path / "none"), "--hf", str(hf)]) == 2
    assert "does not exist" in capsys.readouterr().err
    # under torchrun the model loads before the data is read (each replica reads its share): a
    # missing --data still stops before any checkpoint is read or model loaded
    with monkeypatch.context() as m:
        m.setenv("WORLD_SIZE", "2")
        m.setattr("casa_megatron.evaluation.cli.resolve_checkpoint", _never)
        m.setattr("casa_megatron.evaluation.cli.load_megatron", _never)
        assert main(["--data", str(tmp_path / "none"), "--checkpoint", str(checkpoint)]) == 2
    assert f"data source {tmp_path / 'none'} does not exist" in capsys.readouterr().err
    assert main(["--data", str(tmp_path), "--hf", str(hf)]) == 2  # a directory without shards
    assert "no *.tar shards" in capsys.readouterr().err


def test_benchmark_metrics_score_each_question_by_its_own_rule(trained, tmp_path, capsys):
    """A held-out JSONL mixing benchmarks: each question scored by its ``metric`` against its
    ``answers``; eval.json keeps them, the table has a row per metric; a typo in a metric stops
    the evaluation naming the sample."""
    from casa_megatron.evaluation.answer_metrics import anls, exact_any, relaxed_accuracy, vqa_accuracy

    valid, _, hf = trained
    images = sorted((valid.parent / "raw").glob("*.png"))[:3]
    rows = [
        {"id": "v", "image": str(images[0]), "metric": "vqa", "answers": ["red", "red", "red", "blue"],
         "conversations": [{"from": "human", "value": "<image>\nwhat colour is the shape ?"},
                           {"from": "gpt", "value": "red"}]},
        {"id": "d", "image": str(images[1]), "metric": "anls", "answers": ["circle", "a circle"],
         "conversations": [{"from": "human", "value": "<image>\nwhat shape is it ?"}, {"from": "gpt", "value": "circle"}]},
        {"id": "c", "image": str(images[2]), "metric": "relaxed", "answers": ["3"],
         "conversations": [{"from": "human", "value": "<image>\nhow many shapes are there ?"},
                           {"from": "gpt", "value": "3"}]},
        {"id": "e", "image": str(images[0]),
         "conversations": [{"from": "human", "value": "<image>\nwhat colour is the shape ?"},
                           {"from": "gpt", "value": "red"}]},
    ]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["--data", str(data), "--hf", str(hf), "--out", str(tmp_path / "out"), "--max-new-tokens", "6"]) == 0
    side = json.loads((tmp_path / "out" / "eval.json").read_text())["sides"]["hf"]
    rules = {"vqa": vqa_accuracy, "anls": anls, "relaxed": relaxed_accuracy, "exact": exact_any}
    by_metric = {}
    for q, row in zip(side["questions"], rows):
        assert (q["metric"], q["answers"]) == (row.get("metric", "exact"), row.get("answers", [row["conversations"][1]["value"]]))
        by_metric[q["metric"]] = rules[q["metric"]](q["answer"], q["answers"])
    assert {k: side["scores"][f"metric:{k}"]["accuracy"] for k in by_metric} == by_metric
    assert side["scores"]["all"]["accuracy"] == pytest.approx(sum(by_metric.values()) / 4)
    assert "| metric:anls score | 1 |" in (tmp_path / "out" / "eval.md").read_text()
    # a LLaVA-OneVision data recipe mixing the two files: its selection is evaluated, in order
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[2:]))
    (tmp_path / "suite.yaml").write_text("datasets:\n  - json_path: a.jsonl\n"
                                         "  - json_path: b.jsonl\n    sampling_strategy: 'end:1'\n")
    assert main(["--data", str(tmp_path / "suite.yaml"), "--hf", str(hf), "--out", str(tmp_path / "suite"),
                 "--max-new-tokens", "6"]) == 0
    suite = json.loads((tmp_path / "suite" / "eval.json").read_text())["sides"]["hf"]["questions"]
    assert [q["id"] for q in suite] == ["v#0", "d#0", "e#0"]
    assert [q["tokens"] for q in suite] == [side["questions"][i]["tokens"] for i in (0, 1, 3)]
    capsys.readouterr()
    rows[1]["metric"] = "ansl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["--data", str(data), "--hf", str(hf), "--out", str(tmp_path / "typo")]) == 2
    assert "sample 'd', answer 1: metric 'ansl' is not one of" in capsys.readouterr().err


def _naive_f1(pred: str, ref: str) -> float:
    p, r = pred.lower().split(), ref.lower().split()
    left, common = list(r), 0
    for w in p:
        if w in left:
            left.remove(w)
            common += 1
    if not p and not r:
        return 1.0
    return 0.0 if not common else 2 * common / (len(p) + len(r))


def test_metrics():
    pairs = [("the red circle moves left", "the red circle moves right and is at the left"), ("", ""),
             ("red red", "red"), ("blue", "red"), ("The first.", "the first")]
    for pred, ref in pairs:
        assert token_f1(pred, ref) == pytest.approx(_naive_f1(pred.rstrip("."), ref))
    assert exact("The first.", "the first") == 1.0 and exact("the first one", "the first") == 0.0
    scores = question_scores([("coarse", "colour", "red", ["red"], "exact"),
                              ("coarse", "shape", "circle", ["square"], "exact"),
                              ("fine", "word", "cat", ["cat"], "exact")])
    assert not any(g.startswith("metric:") for g in scores)  # one metric, exact: the report as before
    assert scores["all"] == {"n": 3, "accuracy": 2 / 3} and scores["coarse"]["accuracy"] == 0.5
    assert scores["task:word"] == {"n": 1, "accuracy": 1.0}
    caps = caption_scores([("the red circle", "the red circle moves"), ("", ""), ("noise", "")])
    assert caps["frames_with_reference"] == 1 and caps["silence_accuracy"] == 0.5
