"""Helpers of the export tests: tokenizers, model-only checkpoints, weights of a checkpoint.

``save_weights_checkpoint`` writes a training checkpoint without optimizer state (``iter_N/``
with the model's dist checkpoint, ``config.yaml`` and ``manifest.json``, plus ``latest``): what
``export-hf`` reads of a checkpoint, for models whose optimizer state would only cost time
(round trips, the export benchmark). Checkpoints with optimizer state written by
``Checkpointer.save`` after a training step are made by ``support/hf_fixture.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_WORDS = 100


def chat_tokenizer(out_dir: Path, words: int = CHAT_WORDS) -> Path:
    """A word tokenizer with Qwen2.5-VL's chat specials (``<|image_pad|>`` ...) and template."""
    from casa_megatron.data.synthetic_dataset import CHAT_SPECIALS, CHAT_TEMPLATE
    from casa_megatron.data.tokenization import build_word_tokenizer

    return build_word_tokenizer([" ".join(f"w{i}" for i in range(words))], out_dir, extra_tokens=CHAT_SPECIALS,
                                chat_template=CHAT_TEMPLATE)


def save_weights_checkpoint(model, cfg, run_dir: Path, step: int = 1) -> Path:
    """``run_dir/checkpoints/iter_N`` (model weights, config.yaml, manifest) and ``latest``."""
    from casa_megatron.config import save_config
    from casa_megatron.training.ckpt_manifest import write_manifest
    from casa_megatron.training.pretrained import save_model_weights

    folder = Path(run_dir) / "checkpoints" / f"iter_{step:07d}"
    save_model_weights(model, folder)
    save_config(cfg, folder / "config.yaml")
    write_manifest(folder, step)
    (folder.parent / "latest").write_text(folder.name)
    return folder


def load_weights(directory, model_cfg=None) -> dict:
    """{megatron name: full tensor} of an import folder or training checkpoint (TP=1)."""
    from casa_megatron.config import ParallelConfig
    from casa_megatron.config.loader import load_config_dict, read_yaml
    from casa_megatron.config.schema import ModelConfig
    from casa_megatron.model.build import build_vlm
    from casa_megatron.parallel import initialize_parallel
    from casa_megatron.training.pretrained import load_model_weights

    if model_cfg is None:
        model_cfg = load_config_dict(ModelConfig, read_yaml(Path(directory) / "model.yaml"))
    initialize_parallel(1, 1, seed=0)
    model = build_vlm(model_cfg, ParallelConfig(), 16)
    load_model_weights(model, directory)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def perturb(model, model_cfg, seed: int = 5, scale: float = 0.05) -> None:
    """Every parameter moves (CASA copies stop equalling self-attention, gates leave 0); the
    padding (vocabulary rows, vision MLP units) stays zero, as training keeps it."""
    g = torch.Generator().manual_seed(seed)
    vocab, ffn = model_cfg.lm.vocab_size, model_cfg.vision.ffn_hidden_size
    padded_ffn = model_cfg.vision.padded_ffn_hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))
            if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                p[vocab:] = 0
            elif name.startswith("vision.blocks.") and ".mlp.linear_fc1." in name:
                p[ffn:padded_ffn] = 0
                p[padded_ffn + ffn:] = 0
            elif name.startswith("vision.blocks.") and name.endswith("mlp.linear_fc2.weight"):
                p[:, ffn:] = 0


def export_megatron(model, model_cfg, out_dir: Path, tokenizer_dir: Path, image_token_id=None) -> Path:
    """An in-memory TP=1 model -> HF folder through the real ``export-hf`` (drop-in for the deleted
    temporary ``support.hf_export.export_megatron``): the weights are saved as a model-only
    training checkpoint next to ``out_dir`` and exported from there. Call it in a process whose
    megatron state is TP=1/PP=1 (a forked worker)."""
    from casa_megatron.config.schema import TrainConfig
    from casa_megatron.conversion.exporter import export_hf
    from casa_megatron.data.config import DataConfig

    out_dir = Path(out_dir)
    run = out_dir.parent / f".{out_dir.name}-checkpoint"
    cfg = TrainConfig(model=model_cfg, data=DataConfig(tokenizer_path=str(tokenizer_dir)))
    save_weights_checkpoint(model, cfg, run)
    export_hf(run, out_dir, force=True, progress=False)
    if image_token_id is not None:
        import json

        assert json.loads((out_dir / "config.json").read_text())["image_token_id"] == image_token_id
    return out_dir
