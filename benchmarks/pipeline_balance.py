"""Where to cut the pipeline: the cost of each stage for the even split and the best uneven one.

    python benchmarks/pipeline_balance.py --config benchmarks/configs/pipeline_paper.yaml --pp 2 4 8 \
        [--calibrate STEPS] [--measure STEPS --repeats R] [--json OUT.json] [key=value ...]

A VLM's first pipeline stage runs the vision encoder and the projector before its LM layers
(``model/vlm.py``); the last one adds the output layer. In 1F1B every stage waits for the slowest
in each micro-batch's forward and backward, so an even split of the LM layers leaves the other
stages idle for the encoder's time. ``parallel.num_layers_in_first_pipeline_stage`` /
``..._last_...`` (``config/pipeline_split.py``) move LM layers off the heavy ends.

For each pipeline size and fusion this counts the model FLOPs (forward + backward) of every stage
from the config and representative packed micro-batches (``benchmarks/common.image_heavy_batch``:
the config's text/image shape), with the count the training loop logs (``training/flops.py``;
``MicroBatchFlops.stages`` equals torch's FLOP counter on each stage of a real PP=2 step:
``tests/training/test_model_flops.py``). Every (first, last) pair the split rule accepts is scored
by the 1F1B step it implies (``one_f_one_b_step`` simulates megatron's schedule); the shortest wins. Reported per split: layers
and cost per stage, the bottleneck, ``balance`` = mean / max stage cost (1.0 = even) and the
estimated speed-up over the even split.

FLOPs are not seconds: GEMMs of another width or attention run at other rates.
``--calibrate`` measures two rates on this machine (one process, CPU or one GPU: the whole model
timed with its encoder and with a frozen stand-in) and costs the encoder's FLOPs and the LM's each
at its own rate. ``--measure`` then times the even and the best PP=2 split for real on two forked
CPU ranks (``--repeats``: alternated, median kept) and reports each stage's busy time (step time
minus its pipeline send / receive time).

The simulation gives each stage its own forward / backward shares from the forward FLOPs of its
pieces (a frozen encoder block whose input needs no gradient runs in the forward slot only).
Not modelled: the first stage holding up to ``pp`` micro-batches of activations in 1F1B (memory),
p2p transfer time. The vision encoder is counted as the model config says (``model.vision``:
blocks, ``trainable_blocks``), also under the config's ``vision: frozen_stub`` (that is only how
``train_efficiency.py`` stands in for the encoder).

The interleaved schedule (``parallel.virtual_pipeline_model_parallel_size``, ``--vp``: model chunks
per rank to score, 2 by default) is scored too where the layers and micro-batches allow it, with
the even split and with the best LM-only uneven split whose stages cut into equal chunks
("interleaved xV, uneven"): ``interleaved_step`` simulates megatron's interleaved order over the virtual stages
(checked: with equal stage costs it gives the textbook ``(m + (p - 1) / v)`` micro-batch times
against 1F1B's ``m + p - 1``), and the row reports each rank's cost over its chunks. It shrinks the
pipeline's idle time, not the heaviest rank's work: where the encoder makes rank 0 the bottleneck
it buys nothing.

The encoder over several stages (``parallel.vision_blocks_per_pipeline_stage``) is scored too:
for each number of stages it spans and each count of blocks on its last stage (the one that
also runs the projector and the first LM layers), the other blocks spread before it into near-equal
costs (blocks differ: full-attention blocks, trained blocks), with
every LM split the rule accepts after it; the shortest is reported as "best, encoder split"
when it beats the LM-only "best".
"""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` and `casa_megatron` importable
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # support.dist (--measure), as benchmarks/vision_encoder.py does

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    BenchConfig, fusion_model_config, format_table, image_heavy_batch, machine_info,
)
from casa_megatron.config.errors import ConfigError  # noqa: E402
from casa_megatron.config.pipeline_split import (  # noqa: E402
    FIRST, LAST, VIRTUAL, VISION, describe_split, describe_virtual_split, rank_totals, stage_layer_counts,
    virtual_stage_layer_counts, vision_stage_blocks,
)
from casa_megatron.runtime.atomic import atomic_write_json  # noqa: E402
from casa_megatron.training.flops import MicroBatchFlops, microbatch_flops  # noqa: E402

# (LM layers on the first stage, on the last, encoder blocks per stage or None: all on the first)
Split = Tuple[Optional[int], Optional[int], Optional[Tuple[int, ...]]]
EVEN: Split = (None, None, None)
COLUMNS = [("fusion", "fusion", ""), ("PP", "pp", ""), ("split", "split", ""), ("LM layers per stage", "layers", ""),
           ("encoder blocks per stage", "blocks_text", ""),
           ("cost per stage (step)", "stage_text", ""), ("bottleneck", "bottleneck", ""),
           ("balance", "balance", ".3f"), ("est. speedup vs even", "speedup", ".3f")]


def load(config_path: str, overrides) -> BenchConfig:
    from casa_megatron.config import load_config

    return load_config(BenchConfig, config_path, overrides)


def step_counts(cfg: BenchConfig, mechanism: str) -> List[MicroBatchFlops]:
    """FLOP counts of the micro-batches of one step (``data.num_microbatches``)."""
    model = fusion_model_config(cfg.model, mechanism)
    data = cfg.data
    return [microbatch_flops(model, image_heavy_batch(data, model.lm.vocab_size, cfg.seed + k), data.image_seq_length)
            for k in range(data.num_microbatches)]


@dataclass(frozen=True)
class Rates:
    """Cost of one FLOP of the vision encoder (+ projector) and of the LM side. FLOPs: both 1.
    ``--calibrate``: seconds per FLOP measured on this machine (``calibrate``)."""

    vision: float = 1.0
    lm: float = 1.0
    unit: str = "FLOPs"


def stage_costs(counts: List[MicroBatchFlops], layers: List[int], rates: Rates = Rates(),
                blocks: Optional[List[int]] = None, forward: bool = False) -> List[float]:
    """Cost of each stage over the step's micro-batches: its LM layers (and the output layer on
    the last stage) at ``rates.lm``, its part of the encoder and projector (all on the first
    without ``blocks``, the encoder blocks per stage) at ``rates.vision``. ``forward``: of the
    forward passes alone (a frozen piece whose input needs no gradient has no backward)."""
    per_stage = [0.0] * len(layers)
    for mb in counts:
        if forward:
            encoder = mb.encoder_forward_stages(len(layers), blocks)
            totals = mb.stage_forward_totals(layers, blocks)
        else:
            encoder = [gemm + attention for gemm, attention in mb.encoder_stages(len(layers), blocks)]
            totals = mb.stage_totals(layers, blocks)
        for i, flops in enumerate(totals):
            per_stage[i] += (flops - encoder[i]) * rates.lm + encoder[i] * rates.vision
    return per_stage


def encoder_splits(num_blocks: int, pp: int, block_costs: Optional[List[float]] = None) -> List[Tuple[int, ...]]:
    """Encoder splits worth scoring: over ``v`` = 2 .. ``pp`` stages, every count of blocks on the
    encoder's last stage (which also runs the projector and LM layers), the rest spread over the
    stages before it: by ``block_costs`` into near-equal costs (blocks differ: Qwen2.5-VL's
    full-attention blocks, the trained last ones), else evenly by count (the extra blocks on the
    later stages: the first also embeds)."""
    out = []
    for v in range(2, pp + 1):
        for tail in range(1, num_blocks - v + 2):
            head = num_blocks - tail
            if block_costs is not None:
                out.append(tuple(balanced_groups(block_costs[:head], v - 1) + [tail]))
                continue
            base, extra = divmod(head, v - 1)
            out.append(tuple([base] * (v - 1 - extra) + [base + 1] * extra + [tail]))
    return list(dict.fromkeys(out))


def balanced_groups(costs: List[float], parts: int) -> List[int]:
    """Sizes of ``parts`` consecutive non-empty groups of ``costs`` whose sums are near equal: each
    cut at the block boundary nearest its share of the total."""
    prefix = list(itertools.accumulate(costs))
    sizes, start = [], 0
    for k in range(1, parts):
        target = prefix[-1] * k / parts
        ends = range(start + 1, len(costs) - (parts - k) + 1)  # leave a block for each later group
        end = min(ends, key=lambda e: abs(prefix[e - 1] - target))
        sizes.append(end - start)
        start = end
    return sizes + [len(costs) - start]


def candidate_splits(num_layers: int, pp: int, num_blocks: Optional[int] = None,
                     block_costs: Optional[List[float]] = None) -> Dict[Split, Tuple[List[int], Optional[List[int]]]]:
    """Every (first, last) the split rule accepts, the even split as ``EVEN`` when it exists; with
    ``num_blocks``, also each of ``encoder_splits`` (spread by ``block_costs`` if given) with every
    (first, last) the rule accepts. Values: (LM layers per stage, encoder blocks per stage or None)."""
    options = [None, *range(1, num_layers)]
    out = {}
    for first, last in itertools.product(options, options):
        try:
            out[(first, last, None)] = (stage_layer_counts(num_layers, pp, first, last), None)
        except ConfigError:
            continue
    for blocks in encoder_splits(num_blocks, pp, block_costs) if num_blocks else []:
        for first, last in itertools.product(options, options):
            try:
                layers = stage_layer_counts(num_layers, pp, first, last, vision_stages=len(blocks))
            except ConfigError:
                continue
            out[(first, last, blocks)] = (layers, vision_stage_blocks(num_blocks, pp, list(blocks)))
    return out


def one_f_one_b_step(stage_costs_: List[float], num_microbatches: int,
                     forward_share: Union[float, List[float]] = 1 / 3) -> float:
    """Step time of megatron's 1F1B schedule (``forward_backward_pipelining_without_interleaving``),
    simulated from each stage's cost over the step: stage ``k`` runs ``p - k - 1`` warm-up
    forwards, then alternates one forward and one backward, then drains its backwards; a forward
    waits for the previous stage's forward of the same micro-batch, a backward for the next
    stage's backward (the last stage's for its own forward). A micro-batch's forward is
    ``forward_share`` of its cost (one share, or one per stage: ``plan`` gives each stage's from
    its pieces' forward FLOPs; 1/3 where everything trains). Transfers are free."""
    p, m = len(stage_costs_), num_microbatches
    orders = []
    for k in range(p):
        warmup = min(p - k - 1, m)
        order = [("F", k, j) for j in range(warmup)]
        for i in range(m - warmup):
            order += [("F", k, warmup + i), ("B", k, i)]
        order += [("B", k, j) for j in range(m - warmup, m)]
        orders.append(order)
    return _simulate(orders, stage_costs_, m, forward_share)


def interleaved_step(virtual_costs: List[float], pp: int, num_microbatches: int,
                     forward_share: Union[float, List[float]] = 1 / 3) -> float:
    """Step time of megatron's interleaved schedule (``forward_backward_pipelining_with_interleaving``,
    ``parallel.virtual_pipeline_model_parallel_size = len(virtual_costs) / pp``), simulated as
    ``one_f_one_b_step`` from the cost of each *virtual* stage over the step (virtual stage
    ``v * pp + r`` is chunk ``v`` of rank ``r``). Each rank runs its chunks' work in megatron's
    order: micro-batches in groups of ``pp`` per chunk (its ``microbatch_group_size_per_vp_stage``
    default), ``(pp - r - 1) * 2 + (vp - 1) * pp`` warm-up forwards, then one forward and one
    backward in turn (backwards take the chunks in reverse), then the remaining backwards."""
    vp, m = len(virtual_costs) // pp, num_microbatches
    table = [(j, chunk) for start in range(0, m, pp) for chunk in range(vp) for j in range(start, min(start + pp, m))]
    orders = []
    for rank in range(pp):
        forwards = [("F", chunk * pp + rank, j) for j, chunk in table]
        backwards = [("B", (vp - 1 - chunk) * pp + rank, j) for j, chunk in table]
        warmup = min((pp - rank - 1) * 2 + (vp - 1) * pp, len(table))
        order = forwards[:warmup]
        for i in range(len(table) - warmup):
            order += [forwards[warmup + i], backwards[i]]
        orders.append(order + backwards[len(table) - warmup:])
    return _simulate(orders, virtual_costs, m, forward_share)


def _simulate(orders: List[List[Tuple[str, int, int]]], stage_costs_: List[float], num_microbatches: int,
              forward_share: Union[float, List[float]]) -> float:
    """When the last of ``orders`` ends: ``orders[r]`` lists the work of rank ``r`` in its order,
    each ("F" or "B", pipeline stage, micro-batch); a stage's forward of a micro-batch waits for
    the previous stage's, its backward for the next stage's (the last stage's for its own forward)."""
    p, m = len(stage_costs_), num_microbatches
    shares = forward_share if isinstance(forward_share, list) else [forward_share] * p
    fwd = [c / m * f for c, f in zip(stage_costs_, shares)]
    bwd = [c / m * (1 - f) for c, f in zip(stage_costs_, shares)]
    done: Dict[Tuple[str, int, int], float] = {}
    ranks = len(orders)
    position, clock = [0] * ranks, [0.0] * ranks
    while any(position[r] < len(orders[r]) for r in range(ranks)):
        progressed = False
        for r in range(ranks):
            while position[r] < len(orders[r]):
                kind, k, j = orders[r][position[r]]
                needs = (("F", k - 1, j) if k > 0 else None) if kind == "F" else \
                    (("B", k + 1, j) if k < p - 1 else ("F", k, j))
                if needs is not None and needs not in done:
                    break
                start = max(clock[r], done[needs] if needs is not None else 0.0)
                clock[r] = start + (fwd[k] if kind == "F" else bwd[k])
                done[(kind, k, j)] = clock[r]
                position[r] += 1
                progressed = True
        if not progressed:
            raise RuntimeError("pipeline simulation deadlocked")  # cannot happen for a valid schedule
    return max(clock)


def plan(counts: List[MicroBatchFlops], num_layers: int, pp: int, rates: Rates = Rates(),
         num_blocks: Optional[int] = None, virtual: Tuple[int, ...] = ()) -> dict:
    """The even split (if the layers divide), the split of the LM alone whose estimated 1F1B step
    is shortest ("best") and, with ``num_blocks``, the shortest with the encoder over several
    stages ("best, encoder split") when it beats "best"; for each ``virtual`` size V the
    interleaved schedule with V model chunks per rank ("interleaved xV": the even split, and
    "interleaved xV, uneven": the LM-only split whose chunks give the shortest step, when it is not
    the even one), where the layers and micro-batches allow it."""
    m = len(counts)
    scored = {}
    block_costs = None
    if num_blocks:  # each block's cost over the step; the patch embedding rides with block 0
        block_costs = [sum(sum(mb.vision_blocks[i]) for mb in counts) * rates.vision for i in range(num_blocks)]
        block_costs[0] += sum(sum(mb.patch_embed) for mb in counts) * rates.vision
    for split, (layers, blocks) in candidate_splits(num_layers, pp, num_blocks, block_costs).items():
        costs = stage_costs(counts, layers, rates, blocks)
        shares = [f / c if c else 1 / 3 for f, c in zip(stage_costs(counts, layers, rates, blocks, forward=True), costs)]
        # the step estimate, then the heaviest stages in turn, then the plain even split
        scored[split] = (one_f_one_b_step(costs, m, shares), sorted(costs, reverse=True), split != EVEN,
                         layers, blocks, costs)
    if not scored:
        raise ConfigError(f"no split of {num_layers} LM layers over {pp} stages")

    def shortest(splits):
        return min(splits, key=lambda s: scored[s][:3]) if splits else None

    best_split = shortest([s for s in scored if s[2] is None])
    encoder_best = shortest([s for s in scored if s[2] is not None])
    if encoder_best is not None and (best_split is None or scored[encoder_best][0] >= scored[best_split][0]):
        encoder_best = None  # splitting the encoder buys nothing here
    even = scored.get(EVEN)
    rows = []
    for name, split in (("even", EVEN), ("best", best_split), ("best, encoder split", encoder_best)):
        if split is None or split not in scored or (name == "best" and split == EVEN and even is not None):
            continue
        step, _, _, layers, blocks, costs = scored[split]
        bottleneck = max(costs)
        rows.append({"pp": pp, "split": name, "first": split[0], "last": split[1],
                     "vision_blocks": list(split[2]) if split[2] else None, "layers": layers,
                     "blocks_text": "+".join(map(str, blocks)) if blocks else "all on stage 0",
                     "stage_cost": costs, "stage_text": " / ".join(_short(c, rates.unit) for c in costs),
                     "unit": rates.unit, "bottleneck": f"stage {costs.index(bottleneck)}",
                     "balance": sum(costs) / len(costs) / bottleneck, "step_estimate": step,
                     "speedup": even[0] / step if even is not None else None,
                     "overrides": overrides_for(pp, split), "describe": describe_split(layers, blocks)})
    if best_split == EVEN and rows[0]["split"] == "even":
        rows[0]["split"] = "even = best"
    for vp in virtual:
        if m % pp:
            continue  # micro-batches per step: a multiple of PP (training/batch_schedule.py)
        scored_v = {}
        for split in (s for s in candidate_splits(num_layers, pp) if s[2] is None):
            try:  # the LM-only splits whose stages cut into vp equal chunks (config/pipeline_split.py)
                layers = virtual_stage_layer_counts(num_layers, pp, vp, split[0], split[1])
            except ConfigError:
                continue
            scored_v[split] = _interleaved_row(counts, layers, split, pp, vp, rates,
                                               even[0] if even is not None else None)
        best_v = min(scored_v, key=lambda s: (scored_v[s]["step_estimate"], s != EVEN), default=None)
        if EVEN in scored_v:
            rows.append(scored_v[EVEN])
        if best_v is not None and best_v != EVEN:
            rows.append({**scored_v[best_v], "split": f"interleaved x{vp}, uneven"})
    return {"pp": pp, "rows": rows}


def _interleaved_row(counts: List[MicroBatchFlops], virtual: List[int], split: Split, pp: int, vp: int, rates: Rates,
                     even_step: Optional[float]) -> dict:
    """The interleaved schedule's row for LM layers ``virtual`` per virtual stage: costs per
    virtual stage simulated, reported per rank (the sum of its chunks)."""
    costs = stage_costs(counts, virtual, rates)
    shares = [f / c if c else 1 / 3 for f, c in zip(stage_costs(counts, virtual, rates, forward=True), costs)]
    step = interleaved_step(costs, pp, len(counts), shares)
    per_rank = rank_totals(costs, pp)
    bottleneck = max(per_rank)
    return {"pp": pp, "vp": vp, "split": f"interleaved x{vp}", "first": split[0], "last": split[1], "vision_blocks": None,
            "layers": rank_totals(virtual, pp), "blocks_text": "all on rank 0",
            "stage_cost": per_rank, "stage_text": " / ".join(_short(c, rates.unit) for c in per_rank),
            "unit": rates.unit, "bottleneck": f"rank {per_rank.index(bottleneck)}",
            "balance": sum(per_rank) / len(per_rank) / bottleneck, "step_estimate": step,
            "speedup": even_step / step if even_step is not None else None,
            "overrides": f"{overrides_for(pp, split)} {VIRTUAL}={vp}",
            "describe": describe_virtual_split(virtual, pp)}


def _short(value: float, unit: str) -> str:
    if unit != "FLOPs":
        return f"{value:.3g}"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if value >= scale:
            return f"{value / scale:.3g}{prefix}"
    return f"{value:.3g}"


def encoder_share(counts: List[MicroBatchFlops]) -> float:
    """The vision encoder's and projector's share of the step's model FLOPs."""
    return sum(sum(mb.vision) for mb in counts) / sum(mb.total for mb in counts)


def overrides_for(pp: int, split: Split) -> str:
    parts = [f"parallel.pipeline_model_parallel_size={pp}"]
    parts += [f"{name}={value}" for name, value in ((FIRST, split[0]), (LAST, split[1])) if value is not None]
    if split[2]:
        parts.append(f"{VISION}=[{','.join(map(str, split[2]))}]")
    return " ".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--pp", type=int, nargs="+", default=[2, 4, 8], help="pipeline sizes to plan (it takes every number after it: write key=value "
                             "overrides before --pp or after another option)")
    parser.add_argument("--vp", type=int, nargs="*", default=[2], help="model chunks per rank to score with the "
                        "interleaved schedule (parallel.virtual_pipeline_model_parallel_size; none: --vp with no number)")
    parser.add_argument("--json", help="write the plans here")
    parser.add_argument("--calibrate", type=int, default=0, metavar="STEPS",
                        help="cost FLOPs at the encoder's and the LM's speed measured here (two timed runs "
                             "of STEPS steps, one process; CPU or one GPU) instead of counting every FLOP alike")
    parser.add_argument("--measure", type=int, default=0, metavar="STEPS",
                        help="also time the even and the best PP=2 split for STEPS steps on this machine "
                             "(two forked CPU ranks; small configs: benchmarks/configs/pipeline_cpu.yaml)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="--measure: alternate the two splits this many times, keep each one's median run")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    from benchmarks.pipeline_timing import calibrate, measure

    try:
        cfg = load(args.config, args.overrides)
        if args.measure and cfg.vision != "encoder":
            raise ConfigError("--measure runs the model as built: set vision=encoder")
        if args.measure and torch.cuda.is_available():
            raise ConfigError("--measure forks two CPU ranks; on a GPU machine time the splits under torchrun")
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    num_layers = cfg.model.lm.num_layers
    results, shares, calibration = [], {}, {}
    for fusion in cfg.fusions:
        counts = step_counts(cfg, fusion)
        shares[fusion] = encoder_share(counts)
        rates = Rates()
        if args.calibrate:
            rates, calibration[fusion] = calibrate(cfg, fusion, args.calibrate)
            c = calibration[fusion]
            print(f"{fusion}: encoder side {c['vision_flops_per_s'] / 1e9:.1f} GFLOP/s, LM side "
                  f"{c['lm_flops_per_s'] / 1e9:.1f} GFLOP/s on this machine", file=sys.stderr)
        for pp in args.pp:
            if pp > num_layers:
                print(f"PP={pp}: more stages than the {num_layers} LM layers, skipped", file=sys.stderr)
                continue
            rows = plan(counts, num_layers, pp, rates, cfg.model.vision.num_layers, tuple(args.vp))["rows"]
            if args.measure and pp == 2:
                measure(cfg, fusion, rows, args.measure, args.repeats)
            results.extend({"fusion": fusion, **row} for row in rows)
    data = cfg.data
    print(f"{num_layers} LM layers; per micro-batch {data.micro_batch_size} x {data.seq_length} text + "
          f"{data.image_seq_length} image tokens, {data.num_microbatches} micro-batch(es) per step; "
          + ("costs in seconds per step from this machine's measured FLOP rates (--calibrate)" if args.calibrate
             else "costs in model FLOPs per step"))
    columns = COLUMNS + ([("measured busy s per stage", "measured_busy", ""), ("measured s/step", "measured_step_s", ".3f"),
                          ("measured speedup", "measured_speedup", ".3f")]
                         if args.measure else [])
    print(format_table(results, columns))
    for row in results:
        if row["split"] != "even":
            print(f"{row['fusion']}, PP={row['pp']}: {row['overrides']}  ({row['describe']}; {row['split']})")
    for fusion, share in shares.items():
        limit = [pp for pp in args.pp if share > 1 / pp]
        print(f"{fusion}: the vision encoder + projector are {100 * share:.1f} % of the step's FLOPs"
              + (f"; at PP={', '.join(map(str, limit))} no split of the LM alone can balance the stages "
                 f"(the encoder over several stages can: {VISION})" if limit else ""))
    if args.json:
        from casa_megatron.config import to_dict

        atomic_write_json(Path(args.json), {"results": results, "encoder_share": shares, "calibration": calibration,
                                            "config": to_dict(cfg), "config_path": args.config,
                                            "machine": machine_info(), "command": " ".join(sys.argv) if argv is None else None,
                                            "method": "analytic model FLOPs per stage (training/flops.py "
                                            "MicroBatchFlops.stages)" + (", costed at the FLOP rates measured "
                                            "here" if args.calibrate else "")}, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
