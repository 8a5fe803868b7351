"""``profile`` (Megatron-LM's --profile): the chosen steps of the chosen ranks are traced, the
trace holds exactly those steps, the operator table names the GEMMs, profiling changes no number
of the run, and a run that stops inside the range still writes what it recorded. GPU-only tools
(nsys, CUDA memory history) are refused on a CPU with the reason."""

from __future__ import annotations

import json
import re

import pytest
from support.dist import run_distributed


def _train(rank, world, run_dir, overrides):
    from casa_megatron.config import load_config
    from casa_megatron.config.schema import TrainConfig
    from casa_megatron.training.loop import train

    cfg = load_config(TrainConfig, "configs/tiny_cpu_synthetic.yaml",
                      [f"run_dir={run_dir}", "train_steps=5", "log_interval=1", "tracking.enabled=false",
                       "optimizer.warmup_steps=1", "optimizer.wsd_decay_steps=2", *overrides])
    return train(cfg)


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _steps_in_trace(path):
    events = json.loads(path.read_text())["traceEvents"]
    return sorted({int(m.group(1)) for e in events if (m := re.fullmatch(r"train_step_(\d+)", str(e.get("name"))))})


def test_profiled_steps_are_traced_on_the_chosen_rank_and_change_nothing(tmp_path):
    plain, profiled = tmp_path / "plain", tmp_path / "profiled"
    run_distributed(_train, world_size=2, run_dir=str(plain), overrides=[])
    run_distributed(_train, world_size=2, run_dir=str(profiled),
                    overrides=["profile.enabled=true", "profile.start_step=2", "profile.end_step=3",
                               "profile.ranks=[1]", "profile.record_shapes=true"])
    assert _losses(profiled) == _losses(plain)  # the profiler observes, it does not change the run
    files = sorted(p.name for p in (profiled / "profile").iterdir())
    assert files == ["rank1_steps2-3.json", "rank1_steps2-3_ops.txt"]  # rank 0 was not asked for
    assert _steps_in_trace(profiled / "profile" / "rank1_steps2-3.json") == [2, 3]
    ops = (profiled / "profile" / "rank1_steps2-3_ops.txt").read_text()
    assert "aten::mm" in ops and "Self CPU" in ops


def test_a_run_stopping_inside_the_range_writes_what_it_recorded(tmp_path):
    run_dir = tmp_path / "run"
    run_distributed(_train, world_size=1, run_dir=str(run_dir),
                    overrides=["profile.enabled=true", "profile.start_step=4", "profile.end_step=9"])
    assert sorted(p.name for p in (run_dir / "profile").iterdir()) == ["rank0_steps4-5.json", "rank0_steps4-5_ops.txt"]
    assert _steps_in_trace(run_dir / "profile" / "rank0_steps4-5.json") == [4, 5]


@pytest.mark.parametrize("override, message", [
    ("profile.tool=nsys", "profile.tool='nsys' profiles CUDA work and needs a GPU"),
    ("profile.memory_history=true", "profile.memory_history=true profiles CUDA work and needs a GPU"),
    ("profile.tool=perf", "profile.tool='perf' not in ('torch', 'nsys')"),
    ("profile.start_step=7 profile.end_step=8", "profile.start_step=7 is after the last step (train_steps=5)"),
    ("profile.end_step=1", "must satisfy 1 <= start_step <= end_step"),
    ("profile.ranks=[]", "profile.ranks=[] must list global ranks >= 0"),
])
def test_profile_settings_that_cannot_work_are_refused(override, message):
    from casa_megatron.config import ConfigError, load_config
    from casa_megatron.config.schema import TrainConfig

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(TrainConfig, "configs/tiny_cpu_synthetic.yaml",
                    ["train_steps=5", "optimizer.warmup_steps=1", "optimizer.wsd_decay_steps=2", "profile.enabled=true",
                     "profile.start_step=2", "profile.end_step=3", *override.split()])
