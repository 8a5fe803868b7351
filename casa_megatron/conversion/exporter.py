"""``export-hf``: a training checkpoint (any TP/PP) or an imported one -> a Hugging Face folder.

The model is rebuilt at TP=1/PP=1 from the checkpoint's own config (``config.yaml`` of a
training checkpoint, ``model.yaml`` of an import), megatron reshards the dist-checkpoint
tensors into it on load (a TP=2 or PP=2 checkpoint holds global tensors cut in pieces; the
TP=1 model asks for whole ones), and the tensors leave through the *same* mapping tables as the
import (``engine.export_units``): vocabulary padding sliced off, Helium's Q/K permutation
undone, the vision MLP padding removed. Before anything is loaded the checkpoint's tensor
list is compared with the model's (missing tensors are named).

Two formats (``hf_formats.py``): our ``model_type: casa`` folder with the remote code, or
transformers' own ``Qwen2_5_VLForConditionalGeneration`` for the insertion baseline whose
backbone is Qwen2.5-VL. The folder (``hf/folder.py``) is written into a hidden temporary
sibling and renamed into place; shards are streamed parameter by parameter, so memory holds
the model plus one parameter's HF tensors.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from tqdm import tqdm

from casa_megatron.config.schema import ConfigError, ModelConfig, ParallelConfig
from casa_megatron.conversion.checkpoint_source import CheckpointSource, locate_checkpoint
from casa_megatron.conversion.engine import SHOW, export_units
from casa_megatron.conversion.errors import ConversionError
from casa_megatron.conversion.hf_formats import QWEN_TOKENS, choose_format, qwen2_5_vl_config
from casa_megatron.conversion.output_dir import check_output
from casa_megatron.conversion.safetensors_io import parse_size
from casa_megatron.conversion.tables import tables_for

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
QWEN_PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json")


@dataclass
class ExportResult:
    out_dir: Path
    format: str
    source: CheckpointSource
    tensors: int
    nbytes: int
    dtype: str
    seconds: float


def _phase_logger(start: float, enabled: bool):
    def log(phase: str) -> None:
        if enabled:
            print(f"export-hf [{time.perf_counter() - start:.1f} s] {phase}", file=sys.stderr, flush=True)
    return log


def export_hf(checkpoint: str | Path, out_dir: str | Path, force: bool = False, fmt: str = "auto",
              dtype: str = "auto", tokenizer: Optional[str | Path] = None, max_shard_size: str = "2GB",
              progress: bool = True, phases: bool = False, lora: str = "merge", repo_id: Optional[str] = None,
              base_models: Sequence[str] = (), license: Optional[str] = None,
              eval_results: Sequence[str | Path] = ()) -> ExportResult:
    """See the module docstring. ``dtype``: auto (the checkpoint's), fp32 or bf16; ``tokenizer``:
    a tokenizer folder when the checkpoint's own cannot be found; ``lora``: ``merge`` folds LoRA
    adapters into the weights, ``separate`` writes the base weights and a PEFT adapter folder
    (``OUT_DIR/lora_adapter``, conversion/lora_export.py). The model card (``README.md``,
    conversion/model_card.py): ``repo_id`` is what its snippet loads (default: the folder's path),
    ``base_models`` its Hub ``base_model`` (default: the import's, when its config names a Hub
    id), ``license`` its Hub license, ``eval_results`` casa-eval ``eval.json`` files of this
    checkpoint whose scores it shows (checked before the load: conversion/model_card.py)."""
    start = time.perf_counter()
    log = _phase_logger(start, phases)
    out = Path(out_dir)
    check_output(out, force)
    if dtype != "auto" and dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r} not in {sorted(DTYPES) + ['auto']}")
    parse_size(max_shard_size)  # a bad size fails now, not after the load
    source = locate_checkpoint(checkpoint)
    model_cfg = dataclasses.replace(source.model, transformer_impl="local")  # TE checkpoints load into local
    target = choose_format(model_cfg, fmt)
    _check_lora_mode(lora, model_cfg)
    from casa_megatron.conversion.model_card import read_evaluation

    evaluations = [read_evaluation(Path(f), source.path) for f in eval_results]  # before the (long) load
    tok_dir = resolve_tokenizer(source, tokenizer)
    tok = _load_tokenizer(tok_dir, model_cfg)
    marks = _token_ids(tok, tok_dir, QWEN_TOKENS) if target == "qwen2_5_vl" else \
        _casa_layout(source, model_cfg, tok_dir)  # the tokenizer is checked before the (long) load
    log(f"building the model ({source.kind} checkpoint {source.path})")
    model = load_model(source, model_cfg)
    out_dtype = DTYPES[dtype] if dtype != "auto" else next(model.parameters()).dtype
    dtype_name = str(out_dtype).replace("torch.", "")
    adapter = _lora_out(model, model_cfg, lora, target, out_dtype, out, log)
    units = export_units(model, tables_for(model_cfg), dtype=out_dtype)
    config, processor, generation, files = _folder_files(target, source, model_cfg, tok, marks, dtype_name)
    adapter_writer = None
    if adapter is not None:
        from casa_megatron.conversion.lora_export import check_modules, write_adapter

        if target == "qwen2_5_vl":
            check_modules(config, adapter[1])
        adapter_writer = functools.partial(write_adapter, tensors=adapter[0], config=adapter[1])
    log(f"writing {out} ({target}, {dtype_name})")
    from casa_megatron.hf.folder import write_hf_folder

    count = sum(len(u.names) for u in units)
    card, card_files = _card(out, target, source, model_cfg, units, dtype_name, lora, repo_id, base_models, license,
                             evaluations)
    files.update(card_files)
    with tqdm(total=count, desc="export", unit="tensor", disable=not progress) as bar:
        write_hf_folder(out, config, units, tokenizer_dir=tok_dir, processor=processor, generation=generation,
                        force=force, max_shard_size=max_shard_size, remote_code=target == "casa", files=files,
                        progress=bar.update, extra=adapter_writer, texts={"README.md": card})
    log("done")
    return ExportResult(out, target, source, count, sum(u.nbytes for u in units), dtype_name,
                        time.perf_counter() - start)


def _card(out: Path, target: str, source: CheckpointSource, model_cfg: ModelConfig, units, dtype_name: str,
          lora: str, repo_id: Optional[str], base_models: Sequence[str], license: Optional[str],
          evaluations: Sequence[Dict] = ()) -> tuple[str, Dict[str, Path]]:
    """The folder's ``README.md`` from what the checkpoint holds (conversion/model_card.py), and
    the files it shows (the run's ``loss.png``), to copy in by name."""
    from casa_megatron.config.loader import read_yaml
    from casa_megatron.conversion.model_card import (CardFacts, base_models_of, last_logged_step, metrics_at_step,
                                                      model_card)

    train = read_yaml(source.path / "config.yaml") if source.kind == "training" else None
    results, results_from, curves_to, shown = {}, None, None, {}
    if train is not None and source.step is not None:
        # the run's folder (metrics.jsonl, loss.png): <run_dir>/checkpoints/iter_N by default,
        # else the run_dir its config names
        custom = (train.get("checkpoint") or {}).get("dir")
        run_dir = Path(train["run_dir"]) if custom and train.get("run_dir") else source.path.parent.parent
        results, results_from = metrics_at_step(run_dir, source.step)
        if (run_dir / "loss.png").is_file():
            curves_to, shown = last_logged_step(run_dir), {"loss.png": run_dir / "loss.png"}
    if not base_models:
        pretrained = (train or {}).get("checkpoint", {}).get("pretrained")
        base_models = base_models_of(source.path if source.kind == "import" else
                                     Path(pretrained) if pretrained else None)
    facts = CardFacts(name=out.name, format=target, model=model_cfg, kind=source.kind, step=source.step,
                      parameters=sum(math.prod(s) for u in units for s in u.shapes), dtype=dtype_name,
                      repo_id=repo_id or str(out.resolve()), lora=lora if _has_lora(model_cfg) else "merge",
                      train=train, base_models=list(base_models), license=license, results=results,
                      results_from=str(results_from) if results_from else None, evaluations=list(evaluations),
                      curves_to_step=curves_to)
    return model_card(facts), shown


def _has_lora(model_cfg: ModelConfig) -> bool:
    return model_cfg.lora.enabled or model_cfg.vision.lora.enabled


LORA_MODES = ("merge", "separate")


def _check_lora_mode(lora: str, model_cfg: ModelConfig) -> None:
    """Before the (long) load: the mode exists and, for ``separate``, the checkpoint has adapters."""
    if lora not in LORA_MODES:
        raise ConversionError(f"--lora {lora!r} not in {list(LORA_MODES)}")
    if lora == "separate" and not (model_cfg.lora.enabled or model_cfg.vision.lora.enabled):
        raise ConversionError("--lora separate: the checkpoint holds no LoRA adapters (its model.lora and "
                              "model.vision.lora are off); export it without --lora")


def _lora_out(model, model_cfg: ModelConfig, lora: str, target: str, dtype, out: Path, log):
    """Take the LoRA adapters out of the model: merged into the weights, or (``separate``) kept
    apart as a PEFT adapter; returns that adapter's (tensors, ``adapter_config.json``) or None."""
    from casa_megatron.model.lora import remove_lora

    adapter = None
    if lora == "separate":
        from casa_megatron.conversion.lora_export import peft_adapter

        adapter = peft_adapter(model, tables_for(model_cfg), model_cfg, dtype, target)
    removed = remove_lora(model, merge=lora == "merge")  # W + (alpha / rank) B A, or W as trained
    if removed:
        log(f"{'merged' if lora == 'merge' else 'kept apart'} {removed} LoRA adapters")
    if adapter is not None:
        adapter[1]["base_model_name_or_path"] = str(out.resolve())
    return adapter


def _folder_files(target: str, source: CheckpointSource, model_cfg: ModelConfig, tok, marks, dtype_name: str):
    """``config.json``, processor settings, generation settings and files copied as they are."""
    if target == "qwen2_5_vl":
        text_tokens = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                       "pad_token_id": tok.pad_token_id}
        config = qwen2_5_vl_config(model_cfg, marks, dtype_name, text_tokens)
        files = {n: source.path / n for n in QWEN_PROCESSOR_FILES if (source.path / n).exists()}
        return config, (None if files else qwen_image_processor(source, model_cfg)), None, files
    from casa_megatron.hf.config_map import casa_config_dict

    config = casa_config_dict(model_cfg, marks.config["image_token_id"], extra={**marks.config, "dtype": dtype_name})
    return config, marks.processor, marks.generation, {}


# --- the model ----------------------------------------------------------------------------
def load_model(source: CheckpointSource, model_cfg: ModelConfig):
    """The whole model at TP=1/PP=1 with the checkpoint's weights, in the stored dtype."""
    from megatron.core import dist_checkpointing

    from casa_megatron.model.build import build_vlm
    from casa_megatron.parallel import initialize_parallel

    initialize_parallel(1, 1, seed=0)
    stored = dist_checkpointing.load_tensors_metadata(str(source.weights))
    embedding = stored.get("embedding.word_embeddings.weight")
    params_dtype = embedding.dtype if embedding is not None else torch.float32
    try:
        model = build_vlm(model_cfg, ParallelConfig(), source.data.image_seq_length, params_dtype,
                          skip_init=("lm", "vision", "projector"))  # every weight is loaded (checked first)
    except (ValueError, ConfigError) as exc:
        raise ConversionError(f"the model described by {source.path} cannot be built: {exc}") from exc
    check_weights(model, stored, source)
    try:
        load_in_place(model, source.weights)
    except (KeyError, ValueError, RuntimeError, AssertionError) as exc:  # mismatched keys / shapes
        raise ConversionError(f"the weights of {source.weights} do not load into this model: {exc!r}") from exc
    return model.eval()


def load_in_place(model, weights: Path) -> None:
    """megatron's dist-checkpoint load straight into the parameters (megatron reshards whatever
    TP/PP wrote the checkpoint). The sharded-tensor factories (SwiGLU ``linear_fc1`` as gate and
    up halves) are applied here, so their halves are views of the weights and load in place:
    megatron's own merge would ``cat`` every fc1 into a new tensor first (measured: +0.9 GiB at
    1.2 B parameters), and ``load_state_dict`` would then copy it."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import apply_factories

    sharded = model.sharded_state_dict()
    apply_factories(sharded)
    with warnings.catch_warnings():  # megatron 0.16 calls torch's deprecated DCP entry point
        warnings.filterwarnings("ignore", message=".*load_state_dict. is deprecated", category=FutureWarning)
        loaded = dist_checkpointing.load({"model": sharded}, str(weights))
    owned = {p.untyped_storage().data_ptr() for p in model.parameters()}
    stray = [v.shape for v in nested_values(loaded["model"]) if torch.is_tensor(v)
             and v.untyped_storage().data_ptr() not in owned]
    if stray:  # a megatron version that loads into new tensors: the parameters would stay unset
        raise ConversionError(f"internal: {len(stray)} tensors were not loaded into the model's parameters")


def check_weights(model, stored: dict, source: CheckpointSource) -> None:
    """The checkpoint's tensors against the model its config describes: one error naming every
    missing tensor and shape mismatch (and model-looking tensors the config does not explain)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    expected = {sh.key: sh for sh in nested_values(model.sharded_state_dict())
                if isinstance(sh, (ShardedTensor, ShardedTensorFactory))}
    missing = sorted(k for k in expected if k not in stored)
    mismatched = [f"{k}: checkpoint {tuple(stored[k].global_shape)} vs model {tuple(sh.global_shape)}"
                  for k, sh in expected.items() if isinstance(sh, ShardedTensor) and k in stored
                  and tuple(stored[k].global_shape) != tuple(sh.global_shape)]
    unexpected = sorted(k for k in stored if k not in expected and not k.startswith("optimizer."))
    problems = [_listing(kind, items) for kind, items in (("missing tensors", missing),
                                                          ("shape mismatches", mismatched),
                                                          ("unexpected tensors", unexpected)) if items]
    if problems:
        config = "config.yaml" if source.kind == "training" else "model.yaml"
        raise ConversionError(f"the checkpoint {source.weights} does not hold the model its {config} describes:\n  "
                              + "\n  ".join(problems))


def _listing(kind: str, items: List[str]) -> str:
    more = f" ... and {len(items) - SHOW} more" if len(items) > SHOW else ""
    return f"{kind} ({len(items)}): " + ", ".join(items[:SHOW]) + more


# --- tokenizer and processor --------------------------------------------------------------------
def resolve_tokenizer(source: CheckpointSource, explicit: Optional[str | Path]) -> Path:
    candidates = [Path(explicit)] if explicit else source.tokenizer_candidates
    for folder in candidates:
        if (folder / "tokenizer_config.json").exists():
            return folder
    if explicit:
        raise ConversionError(f"--tokenizer {explicit}: no tokenizer_config.json there")
    looked = ", ".join(str(c) for c in candidates) or "nowhere (the run trained on the in-memory synthetic task)"
    raise ConversionError(f"no tokenizer found for {source.path} (looked in: {looked}); pass --tokenizer DIR")


def _load_tokenizer(folder: Path, model: ModelConfig):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if len(tok) > model.lm.vocab_size:
        raise ConversionError(f"the tokenizer in {folder} has {len(tok)} tokens but the model's vocabulary is "
                              f"model.lm.vocab_size={model.lm.vocab_size}: not this model's tokenizer")
    return tok


def _has(tok, name: str) -> bool:
    idx = tok.convert_tokens_to_ids(name)
    return idx is not None and idx != tok.unk_token_id


def _token_ids(tok, folder: Path, names: Dict[str, str]) -> Dict[str, int]:
    missing = [n for n in names.values() if not _has(tok, n)]
    if missing:
        raise ConversionError(f"the tokenizer in {folder} has no {missing}: Qwen2_5_VLForConditionalGeneration "
                              "expands <|image_pad|> / <|video_pad|> between <|vision_start|> and <|vision_end|> "
                              "(the chat-template layout this model must have been trained with)")
    return {field: int(tok.convert_tokens_to_ids(n)) for field, n in names.items()}


def _casa_layout(source: CheckpointSource, model_cfg: ModelConfig, tok_dir: Path):
    """The text layout the run trained with, as the exported folder must reproduce it
    (``hf/layout_map.export_fields``: the data pipeline's own rule, chat template or layout
    tokens): ``config.json`` extras (placeholder ids, ``placeholders_in_stream``), the
    ``processor_config.json`` fields (with the run's pixel budgets) and the generation stops."""
    from casa_megatron.hf.layout_map import export_fields

    try:
        return export_fields(model_cfg, source.data, str(tok_dir))
    except (ValueError, FileNotFoundError) as exc:
        raise ConversionError(f"the tokenizer in {tok_dir} cannot lay text out as the run did: {exc}") from exc


def qwen_image_processor(source: CheckpointSource, model: ModelConfig) -> dict:
    """transformers' ``Qwen2VLImageProcessor`` settings from the run's data config."""
    from transformers import Qwen2VLImageProcessor

    d, v = source.data, model.vision
    return Qwen2VLImageProcessor(min_pixels=d.min_pixels, max_pixels=d.pixel_budget, patch_size=v.patch_size,
                                 temporal_patch_size=v.temporal_patch_size, merge_size=v.spatial_merge_size,
                                 image_mean=list(d.image_mean), image_std=list(d.image_std)).to_dict()
