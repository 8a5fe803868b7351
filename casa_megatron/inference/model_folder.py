"""An exported model folder: checked first, then loaded as a transformers user loads it.

``casa-stream`` and ``casa-eval`` take a folder written by ``casa-convert export-hf``; anything
else (no ``config.json``, another architecture, no exported processor) is refused with a message
naming what is wrong, before transformers' own less specific error.

A folder exported with ``--lora separate`` holds the base weights and the LoRA adapters apart
(``lora_adapter/``): loading the base alone would run a model that was never trained, silently.
``adapter="auto"`` (the default) therefore merges the folder's adapter into the weights through
PEFT, as a transformers user would (``PeftModel.from_pretrained(...).merge_and_unload()``), and
says so; ``"none"`` loads the base alone; a path loads that adapter folder instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import torch


class NotAnHFFolder(ValueError):
    """The path is not an exported model folder."""


def check_hf_folder(path: str | Path) -> Path:
    p = Path(path)
    config = p / "config.json"
    if not config.is_file():
        raise NotAnHFFolder(f"{p} is not a Hugging Face model folder (no config.json); expected a folder written "
                            "by `casa-convert export-hf`")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as exc:
        raise NotAnHFFolder(f"{config} is unreadable ({exc})") from None
    if model_type != "casa":
        raise NotAnHFFolder(f"{p}: model_type {model_type!r}, expected 'casa' (a folder written by "
                            "`casa-convert export-hf`)")
    if not (p / "processor_config.json").is_file():
        raise NotAnHFFolder(f"{p} has no processor_config.json (the exported processor)")
    return p


def resolve_adapter(model_dir: str | Path, adapter: str = "auto") -> Optional[Path]:
    """The PEFT adapter folder to merge: ``auto`` (the export's ``lora_adapter/`` when there is
    one), ``none``, or a path; NotAnHFFolder when a named folder is not an adapter."""
    from casa_megatron.conversion.errors import ConversionError
    from casa_megatron.conversion.peft_import import resolve_adapter as resolve

    try:
        return resolve(model_dir, adapter)
    except ConversionError as e:
        raise NotAnHFFolder(str(e)) from None


def load_model(model_dir: str | Path, device: str = "cpu", dtype: str = "float32", adapter: str = "auto"):
    """An exported folder -> (model, processor) through transformers' remote code, with its LoRA
    adapter merged in (``adapter``: see :func:`resolve_adapter`)."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    model_dir = str(check_hf_folder(model_dir))
    adapter_dir = resolve_adapter(model_dir, adapter)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=getattr(torch, dtype))
    if adapter_dir is not None:
        try:
            from peft import PeftModel
        except ImportError:
            raise NotAnHFFolder(f"{model_dir} comes with a LoRA adapter ({adapter_dir}); merging it needs peft "
                                "(pip install peft), or pass --adapter none to run the base model alone") from None
        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
        print(f"LoRA adapter {adapter_dir} merged into the model (--adapter none: the base alone)", file=sys.stderr)
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    return model.to(device).eval(), processor
