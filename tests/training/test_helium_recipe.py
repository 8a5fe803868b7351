"""The paper's recipe path end to end, at toy size: a Helium-style base LM whose tokenizer has
neither a chat template nor our layout tokens, the Qwen2.5-VL encoder and merger from another
folder (``--vision-from``), ``import-hf --add-tokens layout``, CASA trained on the generated data
set from ``checkpoint.pretrained`` with the import's tokenizer (text laid out with the added
layout tokens), then ``export-hf`` and transformers: the folder loads, its tokenizer and
vocabulary hold the added tokens, its processor lays text out with them, and ``generate()`` runs.
Without ``--add-tokens`` the run stops at start-up naming the option."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import torch
from support.dist import run_distributed
from support.hf import make_hf_model, save_hf_model

REPO = Path(__file__).resolve().parents[2]
RECIPE = """\
model:
  fusion: {mechanism: casa, placement: parallel}
  vision: {trainable_blocks: 1}
  transformer_impl: local
data: {seq_length: 96, image_seq_length: 96, pixel_budget: 12544, video_pixel_budget: 12544, num_workers: 0}
optimizer: {lr_new: 2.0e-3, lr_pretrained: 2.0e-3, warmup_steps: 0, decay_style: constant}
micro_batch_size: 2
global_batch_size: 4
train_steps: 4
log_interval: 1
tracking: {enabled: false}
"""


def _helium_folder(root: Path, words) -> Path:
    """A random HeliumForCausalLM with a Helium-like tokenizer: <pad> <s> </s> <unk> and the
    generated data set's words, lower-cased, no chat template, no layout tokens."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import HeliumConfig, HeliumForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    torch.manual_seed(0)
    config = HeliumConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2)
    folder = save_hf_model(HeliumForCausalLM(config).eval(), root / "helium")
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(folder))
    return folder


def _convert(*args):
    return subprocess.run([sys.executable, "-m", "casa_megatron.conversion", *map(str, args), "--no-progress"],
                          cwd=REPO, capture_output=True, text=True)


def _train(rank, world, recipe, overrides):
    from casa_megatron.config import load_config
    from casa_megatron.config.errors import ConfigError
    from casa_megatron.config.schema import TrainConfig
    from casa_megatron.training.loop import train

    try:
        return train(load_config(TrainConfig, recipe, overrides))
    except ConfigError as exc:  # what casa-train reports as "config error: ..." (exit status 2)
        return {"error": str(exc)}


def _export(rank, world, run_dir, out):
    from support.hf_checkpoint_export import export_checkpoint

    return str(export_checkpoint(Path(run_dir) / "checkpoints", out))


def test_helium_base_lm_with_added_layout_tokens_trains_and_exports(tmp_path):
    from casa_megatron.data.synthetic_dataset import make_dataset
    from casa_megatron.data.synthetic_media import vocabulary

    data = make_dataset(tmp_path / "data", num_images=8, num_videos=0, seed=6, samples_per_shard=8, progress=False)
    helium = _helium_folder(tmp_path, vocabulary())
    qwen = save_hf_model(make_hf_model("qwen2_5_vl"), tmp_path / "qwen")  # its merger maps to 64: Helium's width
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)

    plain, extended = tmp_path / "imported_plain", tmp_path / "imported"
    done = _convert("import-hf", helium, plain, "--vision-from", qwen, "--config", recipe)
    assert done.returncode == 0, done.stderr[-3000:]
    done = _convert("import-hf", helium, extended, "--vision-from", qwen, "--config", recipe, "--add-tokens", "layout")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "added 3 tokens (<image> =" in done.stderr

    common = [f"data.source={data['shards']}"]
    refused, = run_distributed(_train, world_size=1, recipe=str(recipe), overrides=[
        *common, f"checkpoint.pretrained={plain}", f"data.tokenizer_path={plain}", f"run_dir={tmp_path / 'run_plain'}"])
    assert "error" in refused and "--add-tokens layout" in refused["error"], refused

    run_dir = tmp_path / "run"
    summary, = run_distributed(_train, world_size=1, recipe=str(recipe), overrides=[
        *common, f"checkpoint.pretrained={extended}", f"data.tokenizer_path={extended}", f"run_dir={run_dir}"])
    assert "error" not in summary, summary
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in rows)

    from transformers import AutoModelForCausalLM, AutoProcessor

    out, = run_distributed(_export, world_size=1, run_dir=str(run_dir), out=str(tmp_path / "hf"))
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    tok = processor.tokenizer
    ids = tok.convert_tokens_to_ids(["<image>", "<answer>", "<eot>"])
    assert len(tok) == model.config.vocab_size == ids[-1] + 1 and min(ids) == len(vocabulary()) + 4
    assert json.loads((Path(out) / "processor_config.json").read_text())["text_layout"] == "layout_tokens"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is the shape ?"}]}]
    image = torch.randint(0, 255, (3, 56, 56), dtype=torch.uint8)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           images=[image])
    assert ids[0] in inputs["input_ids"][0].tolist() and inputs["input_ids"][0, -1] == ids[1]  # <image> ... <answer>
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3 or ids[2] in generated[0].tolist()
