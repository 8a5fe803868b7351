"""``casa-eval --data HELD_OUT [--checkpoint CKPT] [--hf HF_DIR]``: answer held-out questions and
caption held-out clips with greedy generation, through the megatron model, the exported Hugging
Face model, or both (then their answers must agree, and the report says whether they do).

Writes ``eval.json`` (settings, every item's generated tokens and text per side, scores,
agreement) and ``eval.md`` (the table, also printed) into ``--out``. Accuracy is exact match
per question type and task, or the benchmark metric a question names (VQA accuracy, ANLS,
relaxed accuracy: ``evaluation/answer_metrics.py``); video captions get token F1, exact match and silence accuracy
(``evaluation/metrics.py`` says why). A checkpoint or HF folder that is not one stops with exit
code 2 and a message naming what was expected.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from casa_megatron.config.run_files import saved_tokenizer
from casa_megatron.data.records import ShardError
from casa_megatron.data.recipe import RecipeError
from casa_megatron.evaluation.answer_metrics import MetricError
from casa_megatron.evaluation.answering import decoder, is_rank0, run_replicas, run_side
from casa_megatron.evaluation.checkpoint_model import NotACheckpoint, checkpoint_config, resolve_checkpoint
from casa_megatron.evaluation.items import Items
from casa_megatron.evaluation.report import agreement, table
from casa_megatron.evaluation.shares import HeldOutError, read_held_out, replica_share
from casa_megatron.evaluation.tracking import NoTrackedRun
from casa_megatron.inference.model_folder import NotAnHFFolder, check_hf_folder, resolve_adapter


class EvalInputError(ValueError):
    """The data to evaluate on gives nothing to ask."""


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="casa-eval", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="held-out source: shard dir, .tar, manifest .jsonl, LLaVA / chat "
                   ".json(l), or a YAML data recipe of several (e.g. data/synthetic/valid)")
    p.add_argument("--checkpoint", help="training checkpoint (iter_N/ or a run's checkpoints/) or import folder")
    p.add_argument("--hf", help="exported Hugging Face folder (casa-convert export-hf)")
    p.add_argument("--adapter", default="auto", help="HF side: LoRA adapter merged into the model: auto (the "
                   "folder's lora_adapter/ from export-hf --lora separate, when there is one), none, or a folder")
    p.add_argument("--out", default="eval_out", help="folder for eval.json and eval.md")
    p.add_argument("--track", action="store_true", help="log the scores to the MLflow run that trained --checkpoint, "
                   "at its iteration (eval/<side>/<group>; eval.json and eval.md as artifacts)")
    p.add_argument("--max-samples", type=int, default=None, help="first N samples of --data")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8, help="questions (megatron side: and clips) answered "
                   "together: one left-padded generate() on the HF side, one row each on the megatron side")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder when the checkpoint's data config no longer "
                   "finds it (default: the checkpoint's, else the HF folder's)")
    p.add_argument("--media-root", default="", help="JSON datasets: where relative media paths point")
    p.add_argument("--device", default=None, help="HF side: cpu / cuda (default: cuda when there is one)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="HF side; agreement with megatron (fp32) is only expected in float32")
    p.add_argument("--tensor-parallel", type=int, default=1, help="megatron side: TP ranks (under torchrun with "
                   "a multiple of tensor x pipeline processes, the rest data-parallel replicas that split the items; "
                   "outputs and the HF side on rank 0)")
    p.add_argument("--pipeline-parallel", type=int, default=1, help="megatron side: pipeline stages (even split)")
    args = p.parse_args(argv)
    if not args.checkpoint and not args.hf:
        p.error("give --checkpoint, --hf or both")
    if args.track and not args.checkpoint:
        p.error("--track logs to the run of --checkpoint: give it")
    if args.max_new_tokens < 1 or args.batch_size < 1 or (args.max_samples is not None and args.max_samples < 1):
        p.error("--max-new-tokens, --batch-size and --max-samples must be >= 1")
    if args.tensor_parallel < 1 or args.pipeline_parallel < 1:
        p.error("--tensor-parallel and --pipeline-parallel must be >= 1")
    ranks = args.tensor_parallel * args.pipeline_parallel
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not args.checkpoint:
        p.error("several processes split the megatron side: give --checkpoint")
    if world % ranks:
        p.error(f"--tensor-parallel {args.tensor_parallel} x --pipeline-parallel {args.pipeline_parallel} needs a "
                f"multiple of {ranks} processes (the rest answer items in data-parallel replicas), this launch has "
                f"{world}: torchrun --nproc-per-node {ranks} -m casa_megatron.evaluation ...")
    return args


def settings_for(args: argparse.Namespace):
    """The pipeline settings of the evaluated model (pixel budgets, fps, frames, text layout)."""
    from casa_megatron.data.processor import ProcessorSettings

    if args.checkpoint:
        cfg, folder = checkpoint_config(args.checkpoint, verify=False)  # checked in run()
        d = cfg.data
        tok = args.tokenizer or (str(p) if (p := saved_tokenizer(folder) or _tokenizer_of(d)) else None) or args.hf
        if tok is None:
            raise NotACheckpoint(f"the tokenizer of {args.checkpoint} ({d.tokenizer_path or 'next to ' + d.source}) "
                                 "is gone; pass --tokenizer")
        template = ""
        if d.chat_template:  # the run's own template instead of the tokenizer's
            try:
                template = d.chat_template_text()
            except OSError:
                if not args.hf:
                    raise NotACheckpoint(f"the run's data.chat_template {d.chat_template!r} is gone; pass --hf "
                                         "(the export carries it as its chat template)") from None
                tok = args.hf  # the export's tokenizer carries the run's template
        layout = d.text_layout
        if layout == "auto" and args.hf and str(tok) == str(args.hf):  # the export's copy of the tokenizer
            layout = json.loads((Path(args.hf) / "processor_config.json").read_text()).get("text_layout", layout)
        return ProcessorSettings(str(tok), d.seq_length, d.image_seq_length, d.pixel_budget, d.min_pixels,
                                 d.video_pixel_budget, d.fps, d.max_frames, d.window_per_frame, d.qa_windows, "cpu",
                                 False, d.image_token, d.answer_token, d.end_of_turn_token, layout,
                                 d.image_placeholder, d.video_placeholder,
                                 merge_consecutive=cfg.model.fusion.mechanism != "insertion", chat_template=template)
    proc = json.loads((Path(args.hf) / "processor_config.json").read_text())
    layout = proc.get("text_layout", "auto")
    return ProcessorSettings(args.tokenizer or args.hf, 1 << 20, 1 << 20, proc.get("max_pixels", 448 * 448),
                             proc.get("min_pixels", 56 * 56), proc.get("video_max_pixels", 224 * 224),
                             proc.get("fps", 2.0), decoder="cpu", truncate=False, text_layout=layout)


def _tokenizer_of(data) -> Optional[Path]:
    try:
        path = data.resolved_tokenizer_path()
    except (OSError, ValueError):
        return None
    return path if path is not None and path.exists() else None


def load_megatron(args):
    """(this rank's model, its TrainConfig): every rank of the launch (initialises megatron's groups)."""
    from casa_megatron.evaluation.checkpoint_model import load_checkpoint_model

    return load_checkpoint_model(args.checkpoint, tp=args.tensor_parallel, pp=args.pipeline_parallel,
                                 verify=False)  # checked in run()


def run_megatron(args, settings, items: Items, loaded) -> Dict:
    from casa_megatron.evaluation.megatron_side import greedy_for

    model, cfg = loaded
    runner = greedy_for(model, cfg, settings, args.max_new_tokens)
    return run_replicas(runner, items, decoder(runner.tok, runner.stop_ids), batch_size=args.batch_size)


def run_hf(args, items: Items, adapter: Optional[Path] = None) -> Dict:
    """The exported model's side; ``adapter``: the PEFT adapter folder merged into it (resolved)."""
    from casa_megatron.evaluation.hf_side import HFGreedy
    from casa_megatron.inference.model_folder import load_model

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = load_model(args.hf, device, args.dtype, str(adapter) if adapter else "none")
    banned = [t for t in (processor.image_token_id, processor.video_token_id) if t is not None]
    runner = HFGreedy(model, processor, args.max_new_tokens, processor.stop_token_ids, banned)
    return run_side("hf", runner, items, processor.tokenizer, processor.stop_token_ids, args.batch_size)


def run(args: argparse.Namespace) -> Dict:
    if not Path(args.data).exists():  # before any checkpoint is read or model loaded (torchrun loads first)
        raise FileNotFoundError(f"data source {args.data} does not exist")
    given = args.checkpoint
    if args.checkpoint:
        # the folder checked against its manifest (the one full read of its files) is the one used
        # below, also if a running training writes a newer checkpoint meanwhile
        args = argparse.Namespace(**{**vars(args), "checkpoint": str(resolve_checkpoint(args.checkpoint)[0])})
    tracked = None
    if args.track:  # every rank, before the evaluation: a run to log to exists, or fail now
        from casa_megatron.evaluation.tracking import find_run, locate_run

        tracked = locate_run(args.checkpoint, verified=True)
        find_run(tracked)
    adapter = None
    if args.hf:
        check_hf_folder(args.hf)
        adapter = resolve_adapter(args.hf, args.adapter)  # a wrong --adapter fails before the megatron side
    settings = settings_for(args)
    loaded, share = None, (0, 1)
    if args.checkpoint and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        # data-parallel replicas: each reads only the samples it answers, rank 0 all of them when it
        # runs the HF side (evaluation/shares.py); the model first, for the replica's rank
        loaded = load_megatron(args)
        share = replica_share()
    held_out = read_held_out(args.data, settings, args.max_samples, args.media_root, share,
                             whole=bool(args.hf) and is_rank0())
    if held_out.empty:
        raise EvalInputError(f"{args.data}: no usable held-out sample (skipped: {held_out.skipped})")
    items = held_out.items
    sides = {}
    if args.checkpoint:
        sides["megatron"] = run_megatron(args, settings, items, loaded or load_megatron(args))
    if not is_rank0():  # the other ranks of a parallel megatron side: rank 0 reports
        return {}
    if args.hf:
        sides["hf"] = run_hf(args, items, adapter)
    from casa_megatron.training.ckpt_manifest import manifest_digest

    digest = manifest_digest(Path(args.checkpoint)) if args.checkpoint else None
    result = {"data": str(args.data), "checkpoint": given, "checkpoint_folder": args.checkpoint,
              "checkpoint_digest": digest, "hf": args.hf,
              "adapter": adapter and str(adapter),
              "megatron_layout": {"tensor_parallel": args.tensor_parallel, "pipeline_parallel": args.pipeline_parallel,
                                  "data_parallel": int(os.environ.get("WORLD_SIZE", 1)) // (
                                      args.tensor_parallel * args.pipeline_parallel)},
              "max_new_tokens": args.max_new_tokens, "skipped": held_out.skipped,
              "text_layout": settings.text_layout, "sides": sides}
    if len(sides) == 2:
        result["agreement"] = agreement(sides["megatron"], sides["hf"])
    out = Path(args.out)
    from casa_megatron.runtime.atomic import atomic_write_json, atomic_write_text

    atomic_write_json(out / "eval.json", result)
    report = table(result)
    atomic_write_text(out / "eval.md", report)
    print(report)
    if args.track:
        from casa_megatron.evaluation.tracking import log_result

        # rank 0 alone: with the run located at the start (locating it checks the checkpoint's
        # files on every rank together, which rank 0 alone cannot do here)
        print(f"logged to MLflow run {log_result(tracked, result, out)}")
    return result


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except (NotACheckpoint, NotAnHFFolder, EvalInputError, FileNotFoundError, ShardError, MetricError,
            RecipeError, NoTrackedRun, HeldOutError) as e:
        print(f"casa-eval: {e}", file=sys.stderr)
        return 2
    agree = result.get("agreement")
    if agree is not None and not agree["all_equal"]:
        print(f"casa-eval: the megatron and HF models disagree on {agree['questions_differ']} question(s) and "
              f"{agree['frames_differ']} caption frame(s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
