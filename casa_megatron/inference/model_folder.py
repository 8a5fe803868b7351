"""An exported model folder: checked first, then loaded as a transformers user loads it.

``casa-stream`` and ``casa-eval`` take a folder written by ``casa-convert export-hf``; anything
else (no ``config.json``, another architecture, no exported processor) is refused with a message
naming what is wrong, before transformers' own less specific error.
"""

from __future__ import annotations

import json
from pathlib import Path

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


def load_model(model_dir: str | Path, device: str = "cpu", dtype: str = "float32"):
    """An exported folder -> (model, processor) through transformers' remote code."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    model_dir = str(check_hf_folder(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True,
                                                 dtype=getattr(torch, dtype)).to(device).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    return model, processor
