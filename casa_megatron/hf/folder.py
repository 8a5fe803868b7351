"""Write a Hugging Face folder for our CASA model: config, remote code, sharded safetensors with an
index, tokenizer, chat template, processor and generation config.

Everything is written into ``OUT.tmp-<pid>`` next to the target and renamed at the end, so a
crash never leaves a folder that looks complete. An existing target is refused unless ``force``.
Tensors are taken as a ``{hf_name: tensor}`` dict (the conversion tables produce it).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch

REMOTE_DIR = Path(__file__).with_name("remote")
REMOTE_FILES = ("configuration_casa.py", "modeling_casa.py", "layers_casa.py", "cache_casa.py",
                "vision_casa.py", "processing_casa.py")


def copy_remote_code(out_dir: Path) -> None:
    for name in REMOTE_FILES:
        shutil.copyfile(REMOTE_DIR / name, out_dir / name)


def write_hf_folder(out_dir: str | Path, config: Dict[str, Any], tensors: Mapping[str, torch.Tensor],
                    tokenizer_dir: Optional[str | Path] = None, processor: Optional[Dict[str, Any]] = None,
                    generation: Optional[Dict[str, Any]] = None, force: bool = False,
                    max_shard_size: str = "2GB") -> Path:
    from huggingface_hub import save_torch_state_dict

    out = Path(out_dir)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass force=True (--force) to replace it")
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        copy_remote_code(tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_torch_state_dict(state, str(tmp), max_shard_size=max_shard_size)
        gen = {"_from_model_config": False, "do_sample": False}
        if tokenizer_dir is not None:
            gen.update(_write_tokenizer_and_processor(tmp, Path(tokenizer_dir), config, dict(processor or {})))
        gen.update(generation or {})
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_tokenizer_and_processor(out: Path, tokenizer_dir: Path, config: Dict[str, Any],
                                   processor: Dict[str, Any]) -> Dict[str, Any]:
    """Tokenizer files, the chat template (processor's, and the tokenizer's if it has none) and
    ``processor_config.json`` whose ``auto_map`` makes ``AutoProcessor`` find our class. Returns
    the generation-config token ids: generation stops at the end of a turn (``<eot>``) or at eos."""
    from transformers import AutoTokenizer

    from casa_megatron.hf.remote.processing_casa import DEFAULT_CHAT_TEMPLATE

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    template = processor.pop("chat_template", None) or DEFAULT_CHAT_TEMPLATE
    if not getattr(tok, "chat_template", None):
        tok.chat_template = template
    tok.save_pretrained(str(out))
    vision = config.get("vision_config", {})
    fields = dict(encoder=vision.get("encoder", "tiny_vit"), patch_size=vision.get("patch_size", 14),
                  merge_size=vision.get("spatial_merge_size", 2),
                  temporal_patch_size=2 if vision.get("encoder") == "qwen2_5_vl" else 1)
    fields.update(processor)
    fields.update(processor_class="CasaProcessor", auto_map={"AutoProcessor": "processing_casa.CasaProcessor"})
    (out / "processor_config.json").write_text(json.dumps(fields, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(template)
    stops = [i for i in (tok.convert_tokens_to_ids("<eot>"), tok.eos_token_id)
             if i is not None and i != tok.unk_token_id]
    return {"eos_token_id": stops, "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id}
