"""Export a megatron model / training checkpoint to a Hugging Face folder for the eval and
processor tests, laid out as training laid text out (``hf/layout_map.export_fields``).

Stand-in for ``casa-convert export-hf CHECKPOINT OUT_DIR`` (being built in parallel by the
helper ``hfexport``): once it exists, ``export_checkpoint``'s body becomes the one line
``assert conversion.cli.main(["export-hf", str(checkpoint), str(out_dir)]) == 0``. Tensors go
through the real conversion tables (``conversion.engine.export_tensors``), the folder through
``hf/folder.write_hf_folder``. Runs where megatron's parallel state is initialised (a forked
worker, ``support.dist.run_distributed``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def export_model(model, model_cfg, data_cfg, out_dir, tokenizer: Optional[str] = None, force: bool = True) -> Path:
    from casa_megatron.conversion.engine import export_tensors
    from casa_megatron.conversion.tables import tables_for
    from casa_megatron.hf.config_map import casa_config_dict
    from casa_megatron.hf.folder import write_hf_folder
    from casa_megatron.hf.layout_map import export_fields

    fields = export_fields(model_cfg, data_cfg, tokenizer)
    tensors = {name: t.float().clone() for name, t in export_tensors(model, tables_for(model_cfg))}
    config = casa_config_dict(model_cfg, fields.config["image_token_id"], extra=fields.config)
    return write_hf_folder(out_dir, config, tensors, tokenizer_dir=tokenizer or data_cfg.resolved_tokenizer_path(),
                           processor=fields.processor, generation=fields.generation, force=force)


def export_checkpoint(checkpoint, out_dir, tokenizer: Optional[str] = None) -> Path:
    from casa_megatron.evaluation.checkpoint_model import load_checkpoint_model

    model, cfg = load_checkpoint_model(checkpoint)
    return export_model(model, cfg.model, cfg.data, out_dir, tokenizer)
