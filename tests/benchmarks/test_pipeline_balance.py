"""benchmarks/pipeline_balance.py: the split it suggests has the shortest 1F1B step estimate among
every split the rule accepts (checked by brute force over stage FLOPs summed by hand), its stage
costs add up to the step's FLOPs, and the CLI runs end to end with the calibration and the
two-rank PP=2 timing on a micro config."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
MICRO = {
    "model": {"lm": {"vocab_size": 64, "num_layers": 6, "hidden_size": 32, "num_attention_heads": 4,
                     "num_query_groups": 2, "ffn_hidden_size": 64},
              "vision": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "ffn_hidden_size": 64},
              "fusion": {"every_n": 2}, "transformer_impl": "local"},
    "data": {"micro_batch_size": 1, "num_microbatches": 2, "seq_length": 24, "samples_per_row": 3,
             "image_grid": [4, 6]},
    "fusions": ["casa", "insertion"], "vision": "encoder", "threads": 1,
}


def _config(tmp_path, **changes):
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump({**MICRO, **changes}))
    return path


@pytest.mark.parametrize("fusion", ["casa", "insertion"])
@pytest.mark.parametrize("pp", [2, 3, 4])
def test_best_split_is_the_brute_force_optimum(tmp_path, fusion, pp):
    from benchmarks.pipeline_balance import load, one_f_one_b_step, plan, step_counts

    cfg = load(str(_config(tmp_path)), [])
    counts = step_counts(cfg, fusion)
    rows = {row["split"]: row for row in plan(counts, 6, pp)["rows"]}
    # by hand: every (first, last) whose middle stages share the rest evenly, at least one layer each
    costs = {}
    for first, last in itertools.product([None, *range(1, 6)], repeat=2):
        ends = [x for x in (first, last) if x is not None]
        middle, rest = pp - len(ends), 6 - sum(ends)
        if (middle == 0 and rest != 0) or (middle and (rest < middle or rest % middle)):
            continue
        layers = [rest // middle if middle else 0] * pp
        layers[0] = first if first is not None else layers[0]
        layers[-1] = last if last is not None else layers[-1]
        if min(layers) < 1:
            continue
        bounds = [0, *itertools.accumulate(layers)]
        stage = [sum(sum(mb.layers[i][0] + mb.layers[i][1] for i in range(bounds[k], bounds[k + 1])) for mb in counts)
                 for k in range(pp)]
        stage[0] += sum(sum(mb.vision) for mb in counts)
        stage[-1] += sum(sum(mb.output) for mb in counts)
        assert sum(stage) == sum(mb.total for mb in counts)
        forward = [sum(sum(mb.forward_layers[bounds[k]:bounds[k + 1]]) for mb in counts) for k in range(pp)]
        forward[0] += sum(sum(mb.forward_encoder) for mb in counts)
        forward[-1] += sum(mb.forward_output for mb in counts)
        costs[(first, last)] = one_f_one_b_step(stage, len(counts), [f / c for f, c in zip(forward, stage)])
    best = rows.get("best", rows.get("even = best"))
    assert best["step_estimate"] == pytest.approx(min(costs.values()), rel=1e-12)
    assert sum(best["stage_cost"]) == sum(mb.total for mb in counts)
    if "even" in rows:
        assert rows["even"]["step_estimate"] == pytest.approx(costs[(None, None)], rel=1e-12)
        assert best["speedup"] == pytest.approx(costs[(None, None)] / min(costs.values()))


@pytest.mark.parametrize("fusion", ["casa", "insertion"])
def test_interleaved_uneven_row_is_the_best_chunked_split(tmp_path, fusion):
    """PP=2 with 2 chunks per rank over 6 layers: the even split is 3+3, which does not cut into 2
    chunks, so only uneven stages (2+4, 4+2) can run interleaved; the row offered is the one with
    the shortest simulated step, its overrides and per-rank layers say which."""
    from benchmarks.pipeline_balance import interleaved_step, load, plan, stage_costs, step_counts
    from casa_megatron.config.pipeline_split import virtual_stage_layer_counts

    counts = step_counts(load(str(_config(tmp_path, data={**MICRO["data"], "num_microbatches": 4})), []), fusion)
    rows = {row["split"]: row for row in plan(counts, 6, 2, virtual=(2,))["rows"]}
    assert "interleaved x2" not in rows  # no even chunked split of 6 layers over 2 x 2
    row = rows["interleaved x2, uneven"]
    steps = {}
    for first in (2, 4):
        virtual = virtual_stage_layer_counts(6, 2, 2, first)
        costs = stage_costs(counts, virtual)
        shares = [f / c for f, c in zip(stage_costs(counts, virtual, forward=True), costs)]
        steps[first] = interleaved_step(costs, 2, len(counts), shares)
    best = min(steps, key=steps.get)
    assert row["step_estimate"] == pytest.approx(steps[best], rel=1e-12)
    assert row["layers"] == [best, 6 - best]  # (first=2 and last=4 name the same split)
    assert (f"parallel.num_layers_in_first_pipeline_stage={best}" in row["overrides"]
            or f"parallel.num_layers_in_last_pipeline_stage={6 - best}" in row["overrides"])
    assert "virtual_pipeline_model_parallel_size=2" in row["overrides"]
    assert sum(row["stage_cost"]) == pytest.approx(sum(mb.total for mb in counts), rel=1e-9)


def test_one_f_one_b_simulation():
    """Equal stages: the textbook (m + p - 1) micro-batch slots; one stage: its whole cost; a slow
    stage sets the pace (worked out by hand: stage 1's backward of the last micro-batch ends at
    6.5, then stage 0's takes 1 more)."""
    from benchmarks.pipeline_balance import one_f_one_b_step

    for p, m, t in ((2, 4, 1.5), (4, 8, 0.25), (3, 3, 2.0), (4, 2, 1.0)):
        assert one_f_one_b_step([t * m] * p, m) == pytest.approx((m + p - 1) * t)
    assert one_f_one_b_step([6.0], 4) == pytest.approx(6.0)
    # p=2, m=2, stage 1 twice as slow: fwd/bwd per micro-batch 0.5/1 on stage 0, 1/2 on stage 1
    assert one_f_one_b_step([3.0, 6.0], 2) == pytest.approx(0.5 + 1 + 2 + 1 + 2 + 1)
    # per-stage shares (a frozen first stage: forward only). Uniform 1/3: stage 0 runs F 0-1, 1-2,
    # its backwards 2-4 and 4-6 -> 6. All forward on stage 0: F 0-3, 3-6; stage 1 runs F1 at 6-6.33
    # and B1 at 6.33-7; stage 0's empty backward of it ends at 7.
    assert one_f_one_b_step([6.0, 2.0], 2) == pytest.approx(6.0)
    assert one_f_one_b_step([6.0, 2.0], 2, [1.0, 1 / 3]) == pytest.approx(7.0)


def test_interleaved_simulation():
    """Equal virtual stages: the textbook ``m + (p - 1) / v`` micro-batch slots (megatron's
    interleaved bubble) against 1F1B's ``m + p - 1``; a rank that carries most of the work sets
    the pace in both schedules (the encoder on rank 0: nothing gained)."""
    from benchmarks.pipeline_balance import interleaved_step, one_f_one_b_step

    for p, v, m in ((2, 2, 4), (2, 2, 8), (4, 2, 8), (4, 4, 16), (2, 3, 6), (4, 2, 4)):
        assert interleaved_step([m / v] * (p * v), p, m) == pytest.approx(m + (p - 1) / v)
    # rank 0's first chunk holds 10x the work of every other virtual stage
    heavy = [10.0, 1.0, 1.0, 1.0]
    assert interleaved_step(heavy, 2, 4) == pytest.approx(11.0)  # rank 0's own work, never idle
    assert one_f_one_b_step([11.0, 2.0], 4) == pytest.approx(11.0)


def test_cli_plans_calibrates_and_times_two_ranks(tmp_path):
    out = tmp_path / "plan.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "pipeline_balance.py"), "--config", str(_config(tmp_path)),
         "--pp", "2", "3", "--vp", "3", "--calibrate", "1", "--measure", "1", "--json", str(out), "fusions=[casa]"],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["results"]
    assert {r["pp"] for r in rows} == {2, 3} and all(r["unit"] == "s" for r in rows)
    pp2 = [r for r in rows if r["pp"] == 2]
    assert all(r["measured_step_s"] > 0 for r in pp2)  # both PP=2 splits ran on two ranks
    # and 3 model chunks per rank through the interleaved schedule (6 layers: 1 per virtual stage)
    interleaved, = [r for r in pp2 if r["split"] == "interleaved x3"]
    assert interleaved["layers"] == [3, 3] and interleaved["speedup"] > 0
    assert sum(interleaved["stage_cost"]) == pytest.approx(sum(pp2[0]["stage_cost"]), rel=1e-9)
    assert "parallel.virtual_pipeline_model_parallel_size=3" in proc.stdout
    calibration = report["calibration"]["casa"]
    assert calibration["step_s_with_encoder"] > 0 and calibration["lm_flops_per_s"] > 0
    # the suggestion (an uneven split, or the even one where the calibrated costs say so) is printed
    assert "casa, PP=2: parallel.pipeline_model_parallel_size=2" in proc.stdout
    assert "casa, PP=3: parallel.pipeline_model_parallel_size=3" in proc.stdout


def test_cli_config_errors_are_one_line():
    from benchmarks.pipeline_balance import main

    assert main(["--config", "benchmarks/configs/pipeline_cpu.yaml", "data.samples_per_row=0"]) == 2
    assert main(["--config", "benchmarks/configs/pipeline_cpu.yaml", "--measure", "1", "vision=frozen_stub"]) == 2


def test_encoder_split_is_scored_and_wins_where_the_encoder_dominates(tmp_path):
    """A 4-block encoder twice the LM's width: at PP=2 no split of the LM alone balances CASA's
    stages; the planner then scores every encoder split (a blocks on stage 0, 4 - a on stage 1
    with the projector and all LM layers), each costed by hand from the per-block FLOPs, and
    suggests the shortest, which beats the best LM-only split."""
    from benchmarks.pipeline_balance import balanced_groups, encoder_splits, load, one_f_one_b_step, plan, step_counts

    vision = {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 2, "ffn_hidden_size": 128}
    cfg = load(str(_config(tmp_path, model={**MICRO["model"], "vision": vision})), [])
    counts = step_counts(cfg, "casa")
    assert encoder_splits(4, 2) == [(3, 1), (2, 2), (1, 3)]
    # over three stages also: the blocks before the encoder's last stage spread evenly, extras later
    assert encoder_splits(4, 3) == [(3, 1), (2, 2), (1, 3), (1, 2, 1), (1, 1, 2)]
    # ... or by cost: a heavy first block gets a stage to itself
    assert (1, 5, 1) in encoder_splits(7, 3, [5, 1, 1, 1, 1, 1, 9]) and (3, 3, 1) in encoder_splits(7, 3)
    assert balanced_groups([5, 1, 1, 1, 1, 1], 2) == [1, 5] and balanced_groups([1] * 6, 3) == [2, 2, 2]
    by_hand = {}
    for first in (1, 2, 3):
        stage0 = sum(sum(mb.patch_embed) + sum(sum(b) for b in mb.vision_blocks[:first]) for mb in counts)
        stage1 = sum(mb.total for mb in counts) - stage0
        forward0 = sum(sum(mb.forward_encoder[:1 + first]) for mb in counts)
        forward1 = sum(mb.forward for mb in counts) - forward0
        by_hand[(first, 4 - first)] = one_f_one_b_step([stage0, stage1], len(counts),
                                                       [forward0 / stage0, forward1 / stage1])
    rows = {row["split"]: row for row in plan(counts, 6, 2, num_blocks=4)["rows"]}
    split = rows["best, encoder split"]
    assert split["step_estimate"] == pytest.approx(min(by_hand.values()), rel=1e-12)
    assert tuple(split["vision_blocks"]) == min(by_hand, key=by_hand.get)
    assert split["layers"] == [0, 6] and sum(split["stage_cost"]) == sum(mb.total for mb in counts)
    lm_only = rows.get("best", rows.get("even = best"))
    assert split["step_estimate"] < lm_only["step_estimate"] and split["balance"] > lm_only["balance"]
    assert "parallel.vision_blocks_per_pipeline_stage=[" in split["overrides"]
    assert plan(counts, 6, 3, num_blocks=4)["rows"]  # three stages: the encoder over two or three
