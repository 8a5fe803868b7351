"""``casa-convert import-hf HF_DIR OUT_DIR --config RECIPE.yaml [key=value ...]`` and
``casa-convert export-hf CHECKPOINT OUT_DIR [--force]`` (also ``python -m casa_megatron.conversion``).

``import-hf`` turns a Hugging Face Qwen2 / Qwen2.5, Qwen2.5-VL, Helium, Llama or exported CASA
folder (safetensors) into a megatron dist checkpoint that ``checkpoint.pretrained=OUT_DIR``
starts a run from, at any TP/PP. The HF config.json decides the LM architecture; the recipe
decides fusion and the rest. ``export-hf`` writes a training checkpoint of any TP/PP (or an
import) as a Hugging Face folder through the same tables. See docs/conversion.md.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from typing import List, Optional


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="casa-convert", description=__doc__.strip().splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import-hf", help="Hugging Face folder -> megatron dist checkpoint")
    imp.add_argument("hf_dir", help="Hugging Face folder: config.json + safetensors (index or single file)")
    imp.add_argument("out_dir", help="output folder (refused if it exists and is not empty, unless --force)")
    imp.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    imp.add_argument("--config", help="recipe YAML (fusion, vision, ...); the LM comes from HF_DIR")
    imp.add_argument("--force", action="store_true", help="replace an existing OUT_DIR")
    imp.add_argument("--vision-from", help="take the vision encoder from this HF folder (e.g. Qwen2.5-VL)")
    imp.add_argument("--skip-vision", action="store_true", help="do not import a vision encoder (reported)")
    imp.add_argument("--dtype", default="auto", help="auto (the checkpoint's), bf16 or fp32")
    imp.add_argument("--adapter", default="auto", help="PEFT LoRA adapter merged into the imported weights: auto "
                     "(HF_DIR/lora_adapter when there is one), none, or an adapter folder")
    imp.add_argument("--add-tokens", metavar="TOKENS", help="add tokens the tokenizer lacks, with embedding rows "
                     "at the mean of the known ones: 'layout' (the recipe's <image>, <answer>, <eot>) or a "
                     "comma-separated list")
    imp.add_argument("--no-progress", action="store_true", help="no progress bar")
    exp = sub.add_parser("export-hf", help="training (any TP/PP) or imported checkpoint -> Hugging Face folder")
    exp.add_argument("checkpoint", help="iter_N/, a run's checkpoints/ folder or run dir, or an import-hf folder")
    exp.add_argument("out_dir", help="output folder (refused if it exists and is not empty, unless --force)")
    exp.add_argument("--force", action="store_true", help="replace an existing OUT_DIR")
    exp.add_argument("--format", default="auto", choices=("auto", "casa", "qwen2_5_vl"),
                     help="casa (remote code) or qwen2_5_vl (transformers' own class, insertion baseline); "
                          "auto picks qwen2_5_vl for insertion with the Qwen2.5-VL encoder and mrope")
    exp.add_argument("--dtype", default="auto", help="auto (the checkpoint's), bf16 or fp32")
    exp.add_argument("--tokenizer", help="tokenizer folder, when the checkpoint's own is not found")
    exp.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    exp.add_argument("--lora", default="merge", choices=("merge", "separate"),
                     help="LoRA adapters: merged into the weights (default), or the base weights plus a PEFT "
                          "adapter folder OUT_DIR/lora_adapter")
    exp.add_argument("--repo-id", help="the model card's snippet loads this Hub id (e.g. org/name, where you will "
                     "push the folder); default: the folder's path")
    exp.add_argument("--base-model", action="append", default=[], metavar="ID",
                     help="the model card's base_model (repeatable); default: the import's Hub id when its "
                          "config.json names one")
    exp.add_argument("--license", help="the model card's license (a Hub license id, e.g. apache-2.0)")
    exp.add_argument("--eval-results", action="append", default=[], metavar="EVAL_JSON",
                     help="casa-eval's eval.json of this checkpoint: its scores go into the model card (repeatable)")
    exp.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _parse(argv: List[str]) -> argparse.Namespace:
    """``key=value`` overrides may also follow the options (``HF OUT --config R k=v``, the
    documented form), where argparse has already closed the positional list."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or args.command != "import-hf"]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*getattr(args, "overrides", []), *extra]
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    if args.command == "export-hf":
        return _export(args)
    from casa_megatron.conversion.errors import ConversionError
    from casa_megatron.conversion.importer import import_hf

    try:
        result = import_hf(args.hf_dir, args.out_dir, args.config, args.overrides, force=args.force,
                           vision_from=args.vision_from, skip_vision=args.skip_vision, dtype=args.dtype,
                           progress=not args.no_progress, phases=True, adapter=args.adapter,
                           add_tokens=args.add_tokens)
    except ConversionError as exc:
        print(f"casa-convert: error: {exc}", file=sys.stderr)
        return 2
    summary = result.report.summary()
    print(f"imported {args.hf_dir} -> {result.out_dir} in {result.seconds:.1f} s: " +
          ", ".join(f"{k} {v}" for k, v in summary.items()), flush=True)
    listed = f"(listed in {result.out_dir}/import_report.json)"
    for why, count in Counter(result.report.fresh.values()).items():
        print(f"{count} parameters initialised fresh: {why} {listed}", flush=True)
    for why, count in sorted(Counter(result.report.not_imported.values()).items()):
        print(f"WARNING: {count} HF tensors NOT imported: {why} {listed}", file=sys.stderr)
    return 0


def _export(args: argparse.Namespace) -> int:
    from casa_megatron.conversion.errors import ConversionError
    from casa_megatron.conversion.exporter import export_hf

    try:
        result = export_hf(args.checkpoint, args.out_dir, force=args.force, fmt=args.format, dtype=args.dtype,
                           tokenizer=args.tokenizer, max_shard_size=args.max_shard_size,
                           progress=not args.no_progress, phases=True, lora=args.lora, repo_id=args.repo_id,
                           base_models=args.base_model, license=args.license, eval_results=args.eval_results)
    except ConversionError as exc:
        print(f"casa-convert: error: {exc}", file=sys.stderr)
        return 2
    src = result.source
    what = f"{src.kind} checkpoint {src.path}" + (f" (step {src.step})" if src.step is not None else "")
    print(f"exported {what} -> {result.out_dir} as {result.format} ({result.tensors} tensors, "
          f"{result.nbytes / 2**20:.1f} MiB {result.dtype}) in {result.seconds:.1f} s", flush=True)
    if args.lora == "separate":
        from casa_megatron.conversion.peft_import import ADAPTER_DIR

        print(f"LoRA adapters: {result.out_dir}/{ADAPTER_DIR} (PEFT: PeftModel.from_pretrained(model, that folder))",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
