"""Write a Hugging Face model folder: config, remote code (for ``model_type: casa``), sharded
safetensors with an index, tokenizer, chat template, processor and generation config.

Everything is written into a hidden ``.OUT.tmp-<pid>`` sibling and renamed at the end
(``conversion/output_dir.py``), so a crash never leaves a folder that looks complete; an
existing, non-empty target is refused unless ``force``. Tensors come either as a
``{hf_name: tensor}`` dict or as :class:`TensorUnit` s whose data is produced while its shard is
written (``casa-convert export-hf``: the model plus one parameter's HF tensors in memory).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

import torch

from casa_megatron.conversion.output_dir import staged_output
from casa_megatron.conversion.safetensors_io import TensorUnit, units_from_tensors, write_safetensors_shards

REMOTE_DIR = Path(__file__).with_name("remote")
REMOTE_FILES = ("configuration_casa.py", "modeling_casa.py", "layers_casa.py", "cache_casa.py",
                "vision_casa.py", "processing_casa.py")
STOP_TOKENS = ("<eot>", "<|im_end|>")  # end of an assistant turn: our layout token, Qwen-style templates

Tensors = Union[Mapping[str, torch.Tensor], Sequence[TensorUnit]]


def copy_remote_code(out_dir: Path) -> None:
    for name in REMOTE_FILES:
        shutil.copyfile(REMOTE_DIR / name, out_dir / name)


def write_hf_folder(out_dir: str | Path, config: Dict[str, Any], tensors: Tensors,
                    tokenizer_dir: Optional[str | Path] = None, processor: Optional[Dict[str, Any]] = None,
                    generation: Optional[Dict[str, Any]] = None, force: bool = False,
                    max_shard_size: str = "2GB", remote_code: bool = True,
                    files: Optional[Dict[str, Path]] = None,
                    progress: Optional[Callable[[int], None]] = None,
                    extra: Optional[Callable[[Path], None]] = None,
                    texts: Optional[Dict[str, str]] = None) -> Path:
    """``remote_code``: our CASA model (remote files, ``processor_config.json`` for
    ``CasaProcessor``). Without it (transformers' own class, e.g. Qwen2.5-VL) ``processor`` is
    written as ``preprocessor_config.json`` as given. ``files``: more files copied in by name;
    ``extra``: writes more into the staged folder (a PEFT adapter), published with the rest;
    ``texts``: more files written from their text by name (the model card ``README.md``)."""
    units = units_from_tensors(dict(tensors)) if isinstance(tensors, Mapping) else list(tensors)
    out = Path(out_dir)
    with staged_output(out, force) as tmp:
        if remote_code:
            copy_remote_code(tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        write_safetensors_shards(tmp, units, max_shard_size, progress)
        gen = {"_from_model_config": False, "do_sample": False}
        if tokenizer_dir is not None:
            tok = _write_tokenizer(tmp, Path(tokenizer_dir), dict(processor or {}))
            gen.update(_stop_ids(tok))
            if remote_code:
                _write_casa_processor(tmp, config, dict(processor or {}))
        if not remote_code and processor:
            (tmp / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
        for name, source in (files or {}).items():
            shutil.copyfile(source, tmp / name)
        for name, text in (texts or {}).items():
            (tmp / name).write_text(text)
        gen.update(generation or {})
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if extra is not None:
            extra(tmp)
    return out


def _write_tokenizer(out: Path, tokenizer_dir: Path, processor: Dict[str, Any]):
    """Tokenizer files and ``chat_template.jinja``: the template the run laid text out with (the
    processor's: the tokenizer's own or ``data.chat_template``), else the tokenizer's own, else our
    layout-token default."""
    from transformers import AutoTokenizer

    from casa_megatron.hf.remote.processing_casa import DEFAULT_CHAT_TEMPLATE

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    template = processor.pop("chat_template", None)
    if template:
        tok.chat_template = template
    elif not getattr(tok, "chat_template", None):
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    tok.save_pretrained(str(out))
    (out / "chat_template.jinja").write_text(tok.chat_template)
    return tok


def _write_casa_processor(out: Path, config: Dict[str, Any], processor: Dict[str, Any]) -> None:
    """``processor_config.json`` whose ``auto_map`` makes ``AutoProcessor`` find our class."""
    processor.pop("chat_template", None)
    vision = config.get("vision_config", {})
    fields = dict(encoder=vision.get("encoder", "tiny_vit"), patch_size=vision.get("patch_size", 14),
                  merge_size=vision.get("spatial_merge_size", 2),
                  temporal_patch_size=2 if vision.get("encoder") == "qwen2_5_vl" else 1)
    fields.update(processor)
    fields.update(processor_class="CasaProcessor", auto_map={"AutoProcessor": "processing_casa.CasaProcessor"})
    (out / "processor_config.json").write_text(json.dumps(fields, indent=2) + "\n")


def _stop_ids(tok) -> Dict[str, Any]:
    """Generation stops at the end of a turn (``<eot>`` / ``<|im_end|>``) or at eos."""
    turn = [tok.convert_tokens_to_ids(t) for t in STOP_TOKENS]
    stops = [i for i in (*turn, tok.eos_token_id) if i is not None and i != tok.unk_token_id]
    return {"eos_token_id": list(dict.fromkeys(stops)), "bos_token_id": tok.bos_token_id,
            "pad_token_id": tok.pad_token_id}
