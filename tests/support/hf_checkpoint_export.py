"""Export a training checkpoint to a Hugging Face folder for the eval tests: the real
``casa-convert export-hf CHECKPOINT OUT_DIR`` (its ``main``), which lays the folder out as the
training run laid text out (``hf/layout_map.export_fields``). Runs where megatron may be
initialised (a forked worker, ``support.dist.run_distributed``). An in-memory model:
``support.export.export_megatron``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def export_checkpoint(checkpoint, out_dir, tokenizer: Optional[str] = None) -> Path:
    from casa_megatron.conversion.cli import main

    extra = ["--tokenizer", str(tokenizer)] if tokenizer else []
    assert main(["export-hf", str(checkpoint), str(out_dir), "--force", "--no-progress", *extra]) == 0
    return Path(out_dir)
