"""metrics.jsonl across a resume: one curve, a line cut short by a killed run, the loss plot."""

from __future__ import annotations

import json
import logging

import pytest

from casa_megatron.training.metrics import MetricsLog

METRICS = dict(loss=1.0, lr_new=1e-3, lr_pretrained=1e-4, grad_norm=0.5, text_tokens_per_s=10.0,
               answer_tokens_per_s=5.0, tflops_per_device=0.1, step_time_s=0.2, peak_memory_gib=0.1)


def _run(path, steps, truncate_after=0, eval_every=2):
    log = MetricsLog(path, enabled=True, truncate_after=truncate_after)
    for step in steps:
        log.write(step, dict(METRICS, loss=1.0 / step))
        if step % eval_every == 0:
            log.write_eval(step, {"valid_loss": 2.0 / step})
    return log


def _steps(path):
    return [(r["step"], "valid_loss" in r) for r in map(json.loads, path.read_text().splitlines())]


def test_resume_keeps_exactly_the_curve_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _run(path, range(1, 7))  # ran to step 6, last checkpoint at step 4
    log = _run(path, range(5, 9), truncate_after=4)
    assert [r["step"] for r in log.rows] == list(range(1, 9))
    assert _steps(path) == [(1, False), (2, False), (2, True), (3, False), (4, False), (4, True),
                            (5, False), (6, False), (6, True), (7, False), (8, False), (8, True)]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary left behind


def test_a_last_line_cut_short_by_a_killed_run_is_dropped(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    _run(path, range(1, 4))
    with path.open("a") as f:
        f.write('{"step": 4, "loss": 0.2')  # SIGKILL mid-append
    with caplog.at_level(logging.WARNING, logger="casa_megatron.train"):
        log = MetricsLog(path, enabled=True, truncate_after=3)
    assert "cut short" in caplog.text
    assert [r["step"] for r in log.rows] == [1, 2, 3] and [r["step"] for r in log.eval_rows] == [2]
    assert _steps(path) == [(1, False), (2, False), (2, True), (3, False)]


def test_damaged_lines_are_skipped_counted_and_the_file_kept_aside(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    _run(path, range(1, 4))
    lines = path.read_text().splitlines()
    lines[1] = "garbage"
    path.write_text("\n".join(lines) + "\n")
    before = path.read_text()
    with caplog.at_level(logging.WARNING, logger="casa_megatron.train"):
        log = MetricsLog(path, enabled=True, truncate_after=3)
    assert "skipped 1 line(s) that are not JSON (lines 2)" in caplog.text
    assert [r["step"] for r in log.rows] == [1, 3] and [r["step"] for r in log.eval_rows] == [2]
    assert (tmp_path / "metrics.jsonl.damaged").read_text() == before  # nothing lost
    MetricsLog(path, enabled=True, truncate_after=3)  # clean now: nothing more set aside
    path.write_text(before)
    MetricsLog(path, enabled=True, truncate_after=3)
    assert (tmp_path / "metrics.jsonl.damaged-2").read_text() == before  # an earlier copy is never overwritten


def test_loss_plot_is_a_png(tmp_path):
    log = _run(tmp_path / "metrics.jsonl", range(1, 5))
    log.plot(tmp_path / "loss.png", floor=0.3)
    log.plot(tmp_path / "loss.png")  # rewritten in place, as at every evaluation
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.jsonl"]


def test_generation_rows_are_kept_on_resume_and_drawn(tmp_path):
    """eval_generation's rows (training/generation_eval.py): their own lines, kept up to the
    checkpoint's step on resume, the held-out accuracy drawn on loss.png's second axis."""
    path = tmp_path / "metrics.jsonl"
    log = _run(path, range(1, 5))
    log.write_generation(2, {"eval/megatron/all": 0.25, "eval/megatron/task_colour": 0.5})
    log.write_generation(4, {"eval/megatron/all": 0.5})
    assert log.generation_rows[0] == {"step": 2, "generation": {"all": 0.25, "task_colour": 0.5}}
    log.plot(tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    resumed = MetricsLog(path, enabled=True, truncate_after=3)
    assert [r["step"] for r in resumed.generation_rows] == [2] and [r["step"] for r in resumed.rows] == [1, 2, 3]
