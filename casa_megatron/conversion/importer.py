"""``import-hf``: a Hugging Face folder -> a megatron dist checkpoint (weights only) that
``checkpoint.pretrained`` loads at any TP/PP.

Output folder::

    OUT/
      weights/             megatron dist checkpoint of the whole model (torch_dist, TP=1/PP=1 keys)
      architecture.yaml    model fields the weights fix (model.lm from config.json, vision, fusion)
      model.yaml           the resolved model config the import was made with
      import_report.json   every parameter's origin; HF tensors not imported or unused, and why
      hf_config.json       the source config.json
      tokenizer / processor / chat-template files copied from the source

``--add-tokens`` adds tokens the tokenizer lacks (the recipe's layout tokens, or a list) with
embedding rows at the mean of the known ones (conversion/vocab_extension.py).

A PEFT LoRA adapter that comes with the folder (``lora_adapter/``, from ``export-hf --lora
separate``) or is named by ``--adapter DIR`` is merged into the weights as they are read
(conversion/peft_import.py); ``--adapter none`` imports the base alone.

It is written to a hidden sibling ``.OUT.tmp-PID`` and renamed into place at the end, so an
interrupted import never leaves a folder that looks like a checkpoint; an existing ``OUT`` is
refused unless ``force`` (then replaced only after the new one is complete).

The model is built once, on one process, in the checkpoint's dtype (bf16 for Qwen2.5-VL), and
filled row by row from the safetensors files (engine.py), so peak memory is about one model.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
import yaml

from casa_megatron.config.loader import apply_overrides, load_config_dict, save_config
from casa_megatron.config.pretrained import ARCHITECTURE_FILE, WEIGHTS_DIR, architecture_of, merge_architecture
from casa_megatron.config.schema import ConfigError, LoRAConfig, ParallelConfig, TrainConfig
from casa_megatron.conversion.engine import ImportReport, Source, component_of, load_weights
from casa_megatron.conversion.errors import ConversionError
from casa_megatron.conversion.hf_config import VISION_CONFIG_READERS, HFArchitecture, read_hf_config
from casa_megatron.conversion.safetensors_io import SafetensorsReader
from casa_megatron.conversion.mapping import MappingTable
from casa_megatron.conversion.output_dir import check_output, publish
from casa_megatron.conversion.peft_import import AdapterMergedReader, resolve_adapter
from casa_megatron.conversion.tables import VISION_TABLES, lm_table, projector_table, vision_table
from casa_megatron.conversion.vocab_extension import (VOCABULARY_FILES, AddedTokens, VocabExtendedReader,
                                                      extend_tokenizer, requested_tokens, say, vocabulary_names)

COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                "tokenizer.model", "added_tokens.json", "chat_template.json", "chat_template.jinja",
                "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
                "generation_config.json")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


@dataclass
class ImportResult:
    out_dir: Path
    config: TrainConfig
    report: ImportReport
    seconds: float


def resolve_config(recipe: Optional[str], overrides: Sequence[str], arch: HFArchitecture,
                   vision_fields: Optional[dict], hf_dir: str) -> TrainConfig:
    """The recipe with the HF architecture filled in; contradictions name both values.

    Only the recipe's ``model`` (and ``seed``) matter to the weights: data, parallelism,
    precision, optimizer and checkpoint settings are the training run's and are not validated
    here (the recipe's shard folder need not exist on the machine that converts, its bf16 needs
    no GPU here, and ``checkpoint.pretrained`` is this import's output)."""
    explicit = raw_recipe(recipe, overrides)
    explicit = {k: explicit[k] for k in ("model", "seed") if k in explicit}
    architecture = {"lm": arch.lm}
    if vision_fields:
        architecture["vision"] = vision_fields
    if arch.fusion is not None:  # an exported CASA folder: its fusion, and its defaults unless the recipe's
        architecture["fusion"] = arch.fusion
        fusion = explicit.setdefault("model", {}).setdefault("fusion", {})
        for key, value in arch.fusion_defaults.items():
            fusion.setdefault(key, value)
    merged = merge_architecture(explicit, architecture, f"{hf_dir}/config.json")
    return load_config_dict(TrainConfig, merged)


def raw_recipe(recipe: Optional[str], overrides: Sequence[str]) -> dict:
    """The recipe's YAML with the overrides applied (no defaults: what the user set)."""
    explicit = (yaml.safe_load(Path(recipe).read_text()) or {}) if recipe else {}
    if not isinstance(explicit, dict):
        raise ConversionError(f"--config {recipe}: not a YAML mapping")
    return apply_overrides(explicit, overrides)


def _phase_logger(start: float, enabled: bool):
    """``import-hf [12.3 s] phase`` lines on stderr (the benchmark reads them)."""
    def log(phase: str) -> None:
        if enabled:
            print(f"import-hf [{time.perf_counter() - start:.1f} s] {phase}", file=sys.stderr, flush=True)
    return log


def _dtype(choice: str, arch: HFArchitecture) -> torch.dtype:
    if choice == "auto":
        return torch.bfloat16 if arch.torch_dtype == "bfloat16" else torch.float32
    if choice not in DTYPES:
        raise ConversionError(f"--dtype {choice!r} not in {sorted(DTYPES) + ['auto']}")
    return DTYPES[choice]


def check_vision(cfg: TrainConfig, arch: HFArchitecture, vision_from: Optional[str], skip_vision: bool) -> None:
    """Refuse, before any tensor is read, a vision source the model cannot take: a vision kind
    with no table, a recipe with another encoder, or a recipe asking for a pretrained encoder
    the folders do not hold."""
    kind, where = arch.vision_kind, vision_from or "the checkpoint"
    encoder = cfg.model.vision.encoder
    if skip_vision:
        return
    if kind is None:
        if encoder != "tiny_vit":
            raise ConversionError(
                f"the recipe's model.vision.encoder={encoder!r} expects pretrained vision weights but {where} "
                "holds no vision encoder; pass --vision-from a folder that has one (e.g. Qwen2.5-VL), or "
                "--skip-vision to initialise the encoder fresh")
        return
    _check_vision_kind(kind, where)
    if encoder != kind:
        raise ConversionError(f"{where} holds a {kind!r} vision encoder but the recipe has model.vision.encoder="
                              f"{encoder!r}; set model.vision.encoder={kind} or pass --skip-vision")


def _check_vision_kind(kind: str, where: str) -> None:
    if kind not in VISION_TABLES or kind not in VISION_CONFIG_READERS:
        raise ConversionError(f"{where} holds a {kind!r} vision encoder, which has no conversion table "
                              f"(registered: {sorted(VISION_TABLES)}); pass --skip-vision to import the LM alone")


def vision_sources(cfg: TrainConfig, arch: HFArchitecture, lm_reader, vision_from: Optional[str],
                   skip_vision: bool) -> Tuple[Dict[str, Source], Dict[str, MappingTable]]:
    """Sources and tables of the ``vision`` and ``projector`` components (after
    :func:`check_vision`). The projector (the checkpoint's merger) is imported only when it maps
    to this LM's width; otherwise it starts fresh and its tensors are reported as not imported
    (Qwen2.5-VL-3B's encoder in Helium-2B). See docs/conversion.md "Vision"."""
    kind, where = arch.vision_kind, vision_from or "the checkpoint"
    if kind is None:
        why = "skipped (--skip-vision)" if skip_vision else "not in the source checkpoint (LM only)"
        fresh = Source(reason=f"{why}: initialised fresh")
        return {"vision": fresh, "projector": fresh}, {}
    reader = SafetensorsReader(vision_from) if vision_from else lm_reader
    only = "visual." if vision_from else None
    if skip_vision:
        why = "skipped (--skip-vision): initialised fresh"
        return {"vision": Source(reason=why, skipped=(reader, "visual."), only=only),
                "projector": Source(reason=why)}, {}
    sources = {"vision": Source(reader, only=only)}
    tables = {"vision": vision_table(cfg.model, kind)}
    width, lm_width = arch.vision_output_size, cfg.model.lm.hidden_size
    if width is None or width == lm_width:
        sources["projector"] = Source(reader, only=only)
        tables["projector"] = projector_table()
    else:
        why = (f"the merger of {where} maps to width {width} (vision_config.out_hidden_size), this LM's is "
               f"{lm_width}: projector initialised fresh")
        sources["projector"] = Source(reason=why, skipped=(reader, "visual.merger."), only=only)
    return sources, tables


def import_hf(hf_dir: str, out_dir: str, recipe: Optional[str] = None, overrides: Sequence[str] = (),
              force: bool = False, vision_from: Optional[str] = None, skip_vision: bool = False,
              dtype: str = "auto", progress: bool = True, phases: bool = False, adapter: str = "auto",
              add_tokens: Optional[str] = None) -> ImportResult:
    """See the module docstring; ``progress``: tqdm bar, ``phases``: timed phase lines on stderr;
    ``adapter``: a PEFT LoRA adapter merged into the weights (``auto``: ``HF_DIR/lora_adapter``
    when there is one, ``none``, or a folder; conversion/peft_import.py); ``add_tokens``: tokens
    the tokenizer lacks, added with embedding rows (``layout`` or a comma-separated list;
    conversion/vocab_extension.py)."""
    start = time.perf_counter()
    log = _phase_logger(start, phases)
    out = Path(out_dir)
    check_output(out, force)
    arch = read_hf_config(hf_dir)
    adapter_dir = resolve_adapter(hf_dir, adapter)
    params_dtype = _dtype(dtype, arch)
    vision_arch = arch
    if vision_from:
        vision_arch = read_hf_config(vision_from)
        if vision_arch.vision_kind is None:
            raise ConversionError(f"--vision-from {vision_from}: its config.json has no vision encoder")
        if arch.vision_kind is not None:
            raise ConversionError(f"{hf_dir} already holds a vision encoder; --vision-from {vision_from} "
                                  "would give two (use --skip-vision on one side instead)")
    importing_vision = vision_arch.vision_kind is not None and not skip_vision
    lm_reader = None  # the checkpoint's weights, opened after the config checks (an adapter: before)
    if adapter_dir is not None:  # read before the config: a fine-tune may have grown the vocabulary
        lm_reader = AdapterMergedReader(SafetensorsReader(hf_dir), adapter_dir)
        if lm_reader.vocabulary_rows is not None:
            if add_tokens:
                raise ConversionError(f"{adapter_dir} brings its own tokenizer and a vocabulary of "
                                      f"{lm_reader.vocabulary_rows} rows: --add-tokens has nothing to add to")
            arch.lm["vocab_size"] = lm_reader.vocabulary_rows
    added = None
    if add_tokens:
        added = extend_tokenizer(hf_dir, requested_tokens(add_tokens, raw_recipe(recipe, overrides).get("data") or {}))
        arch.lm["vocab_size"] = added.vocab_size(arch.lm["vocab_size"])
    try:
        cfg = resolve_config(recipe, overrides, arch, vision_arch.vision if importing_vision else None, hf_dir)
    except ConfigError as exc:
        raise ConversionError(str(exc)) from exc
    check_vision(cfg, vision_arch, vision_from, skip_vision)
    cfg = _without_adapters(cfg)

    adapter_modules, tokenizer_dir = 0, None
    if lm_reader is None:
        lm_reader = SafetensorsReader(hf_dir)
    else:
        adapter_modules, tokenizer_dir = len(lm_reader.updates), lm_reader.tokenizer_dir
        extra = "".join(f", {len(found)} {what}" for found, what in ((lm_reader.replaced, "saved modules"),
                                                                     (lm_reader.rows, "tables with trained token rows"))
                        if found)
        print(f"import-hf: merging the LoRA adapter {adapter_dir} ({len(lm_reader.updates)} modules{extra}) into the "
              "imported weights (--adapter none: the base alone)", file=sys.stderr)
        if tokenizer_dir is not None:
            print(f"import-hf: the adapter's vocabulary has {lm_reader.vocabulary_rows} rows: its tokenizer "
                  f"({tokenizer_dir}) replaces the checkpoint's", file=sys.stderr)
    tables = {"lm": lm_table(cfg.model)}
    if added is not None:  # the embedding and LM head as resize_token_embeddings leaves them
        lm_reader = VocabExtendedReader(lm_reader, added, cfg.model.lm.vocab_size, vocabulary_names(tables["lm"]))
        say(added, cfg.model)
    vision, vision_tables = vision_sources(cfg, vision_arch, lm_reader, vision_from, skip_vision)
    sources = {"lm": Source(lm_reader), **vision}
    tables.update(vision_tables)

    from casa_megatron.model.build import build_vlm
    from casa_megatron.parallel import initialize_parallel
    from casa_megatron.training.pretrained import save_model_weights

    initialize_parallel(1, 1, cfg.seed)
    log("building the model")
    model = build_vlm(cfg.model, ParallelConfig(), cfg.data.image_seq_length, params_dtype,
                      skip_init=tuple(tables))  # every weight of these is overwritten (engine accounting)
    log("loading weights")
    report = load_weights(model, tables, sources, progress=progress)
    _check_accounted(model, report, tables)

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        log("saving the dist checkpoint")
        save_model_weights(model, tmp / WEIGHTS_DIR, release_model=True)
        del model
        _write_metadata(tmp, cfg, arch, report, hf_dir, vision_from, params_dtype, adapter_dir,
                        adapter_modules, added, tokenizer_dir)
        publish(tmp, out, force)
        log("done")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ImportResult(out, cfg, report, time.perf_counter() - start)


def _without_adapters(cfg: TrainConfig) -> TrainConfig:
    """An import is the backbone: LoRA adapters of the recipe (``model.lora``,
    ``model.vision.lora``) start (B = 0) in the run that loads it, and a note says so."""
    model = cfg.model
    for where, lora in (("model.lora", model.lora), ("model.vision.lora", model.vision.lora)):
        if lora.enabled:
            print(f"import-hf: note: {where}.rank={lora.rank} is not part of an import: the LoRA adapters "
                  "start (B = 0) in the run that loads it", file=sys.stderr)
    vision = dataclasses.replace(model.vision, lora=LoRAConfig())
    return dataclasses.replace(cfg, model=dataclasses.replace(model, lora=LoRAConfig(), vision=vision))


def _check_accounted(model, report: ImportReport, tables) -> None:
    """Components built without initialisation must have had every weight written."""
    done = set(report.imported) | set(report.casa_from_self_attention) | set(report.zero_initialised)
    left = [n for n, _ in model.named_parameters() if component_of(n) in tables and n not in done]
    if left:
        raise ConversionError(f"internal: parameters neither imported nor initialised: {left}")


def _write_metadata(tmp: Path, cfg: TrainConfig, arch: HFArchitecture, report: ImportReport, hf_dir: str,
                    vision_from: Optional[str], dtype: torch.dtype, adapter_dir: Optional[Path] = None,
                    adapter_modules: int = 0, added: Optional[AddedTokens] = None,
                    tokenizer_dir: Optional[Path] = None) -> None:
    """``tokenizer_dir``: a PEFT adapter's folder whose tokenizer replaces the source's (a grown
    vocabulary): its files are copied, the source's vocabulary files are not."""
    source = {"hf_dir": str(Path(hf_dir).resolve()), "family": arch.family, "model_type": arch.model_type,
              "vision_from": str(Path(vision_from).resolve()) if vision_from else None,
              "dtype": str(dtype).replace("torch.", ""),
              "lora_adapter": str(adapter_dir.resolve()) if adapter_dir is not None else None,
              "lora_adapter_modules": adapter_modules,
              "added_tokens": added.to_json() if added is not None else None,
              "tokenizer_from": str(Path(tokenizer_dir).resolve()) if tokenizer_dir is not None else None}
    (tmp / ARCHITECTURE_FILE).write_text(yaml.safe_dump(
        {"model": architecture_of(cfg.model), "source": source}, sort_keys=False))
    save_config(cfg.model, tmp / "model.yaml")  # the resolved model the weights belong to
    (tmp / "import_report.json").write_text(json.dumps({"source": source, **report.to_json()}, indent=1))
    shutil.copy2(Path(hf_dir) / "config.json", tmp / "hf_config.json")
    if added is not None:  # the extended tokenizer, not the source's vocabulary files
        added.tokenizer.save_pretrained(str(tmp))
    own_vocabulary = added is not None or tokenizer_dir is not None
    folders = ([Path(tokenizer_dir)] if tokenizer_dir is not None else []) + [Path(hf_dir)] + \
        ([Path(vision_from)] if vision_from else [])
    for folder in folders:
        for name in COPIED_FILES:
            if own_vocabulary and name in VOCABULARY_FILES and folder != tokenizer_dir:
                continue
            if (folder / name).exists() and not (tmp / name).exists():
                shutil.copy2(folder / name, tmp / name)
