"""The insertion baseline imported from a Qwen2.5-VL checkpoint *is* Qwen2.5-VL: a tiny random
``Qwen2_5_VLForConditionalGeneration`` saved by transformers goes through the real import
(``casa-convert import-hf``'s ``main``: LM + vision encoder + merger), the model is built from
``checkpoint.pretrained``, and its text logits equal transformers' on image + text and video +
text inputs (fp32) at TP=1 and TP=2 (the same two processes), with multimodal RoPE positions
computed from the batch structure, and at PP=2 with the encoder split over both stages.

And back: the TP=2 model trains one step, saves a training checkpoint, and ``casa-convert
export-hf`` writes it as transformers' own ``Qwen2_5_VLForConditionalGeneration`` folder (no
remote code), whose logits equal the trained megatron model's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support.dist import run_distributed
from support.hf_equivalence import build_pretrained, stage_logits
from support.qwen_vl import hf_qwen_vl

IMAGE_SLOTS = 16


def _batch(patch_dim: int):
    """Row 0: an image at 3, a 4-frame video (2 temporal patches, 1 s each) at 8.
    Row 1: an image at 2 and another at 6."""
    from casa_megatron.model.batch import VLMBatch

    g = torch.Generator().manual_seed(0)
    grid_t = torch.tensor([1, 2, 1, 1])
    grid_hw = torch.tensor([[4, 6], [4, 4], [6, 4], [4, 4]])
    n = int((grid_t * grid_hw.prod(1)).sum())
    return VLMBatch(input_ids=torch.randint(0, 100, (2, 12), generator=g),
                    position_ids=torch.arange(12).repeat(2, 1),
                    pixel_patches=torch.randn(n, patch_dim, generator=g), image_grid_hw=grid_hw,
                    image_grid_t=grid_t, image_second_per_grid=torch.tensor([0.0, 1.0, 0.0, 0.0]),
                    image_rows=torch.tensor([0, 0, 1, 1]), image_positions=torch.tensor([3, 8, 2, 6]))


def _hf_logits(hf, model, batch):
    """The same streams as HF inputs: image / video placeholder ids (the HF config's) where our
    images sit."""
    image_id, video_id = hf.config.image_token_id, hf.config.video_token_id
    layout = model.layout(batch)
    b, s = batch.shape
    grid = batch.image_grid_thw
    counts = grid.prod(1) // 4
    video = batch.image_second_per_grid > 0
    ids = torch.zeros(b * layout.length, dtype=torch.long)
    types = torch.zeros(b * layout.length, dtype=torch.int)
    ids[layout.text_index] = batch.input_ids.reshape(-1)
    ids[layout.image_index] = torch.repeat_interleave(torch.where(video, video_id, image_id), counts)
    types[layout.image_index] = torch.repeat_interleave(torch.where(video, 2, 1), counts).int()
    mask = (layout.segment_ids >= 0).long()  # stream padding at the end of a row
    patches = torch.split(batch.pixel_patches, grid.prod(1).tolist())
    with torch.no_grad():
        out = hf(input_ids=ids.view(b, -1), attention_mask=mask, mm_token_type_ids=types.view(b, -1),
                 pixel_values=torch.cat([p for p, v in zip(patches, video) if not v]),
                 image_grid_thw=grid[~video],
                 pixel_values_videos=torch.cat([p for p, v in zip(patches, video) if v]),
                 video_grid_thw=grid[video], second_per_grid_ts=batch.image_second_per_grid[video])
    logits = out.logits.reshape(b * layout.length, -1)[layout.text_index]  # [b*s, v]
    return logits.view(b, s, -1).transpose(0, 1)  # [s, b, v]


def _import(rank, world, hf_dir, out):
    from casa_megatron.conversion.cli import main

    assert main(["import-hf", hf_dir, out, "model.fusion.mechanism=insertion", "model.transformer_impl=local",
                 "--no-progress"]) == 0
    return json.loads((Path(out) / "import_report.json").read_text())


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    from support.export import chat_tokenizer

    root = tmp_path_factory.mktemp("qwen_vl")
    hf_qwen_vl().save_pretrained(str(root / "hf"))
    chat_tokenizer(root / "hf")  # copied into the import, then found by the export
    report, = run_distributed(_import, world_size=1, hf_dir=str(root / "hf"), out=str(root / "imported"))
    return root, report


def test_import_reads_every_tensor_of_the_checkpoint(imported):
    _, report = imported
    assert report["summary"]["fresh"] == 0 and report["summary"]["hf_not_imported"] == 0
    assert report["summary"]["hf_unused"] == 0
    read = {h for names in report["imported"].values() for h in names}
    assert any(n.startswith("visual.blocks.") for n in read) and "visual.merger.mlp.2.weight" in read
    assert report["source"]["dtype"] == "float32"


def _train_and_save(model, root, tp, batch, run="run", overrides=()):
    """One training step at this layout, then a training checkpoint (with optimizer state)."""
    import dataclasses

    from casa_megatron.config import load_config
    from casa_megatron.config.schema import TrainConfig
    from casa_megatron.training.checkpoint import Checkpointer
    from support.hf_fixture import one_step

    cfg = load_config(TrainConfig, None, [
        f"checkpoint.pretrained={root}/imported", "model.transformer_impl=local", f"run_dir={root}/{run}",
        f"parallel.tensor_model_parallel_size={tp}", f"data.tokenizer_path={root}/imported",
        f"data.image_seq_length={IMAGE_SLOTS}", "optimizer.warmup_steps=0", "train_steps=1", *overrides])
    g = torch.Generator().manual_seed(1)
    batch = dataclasses.replace(batch, labels=torch.randint(0, 100, batch.shape, generator=g),
                                loss_mask=torch.ones(batch.shape))
    optimizer, scheduler = one_step(model, cfg, batch, IMAGE_SLOTS)
    Checkpointer(f"{root}/{run}/checkpoints").save(1, model, optimizer, scheduler, {}, cfg)


# DoRA on every linear of the frozen LM and on blocks 1 and 2 of the frozen encoder (another rank)
LORA = ["model.freeze_lm=true", "model.lora.rank=4", "model.lora.alpha=8", "model.lora.dora=true",
        "model.vision.trainable_blocks=0", "model.vision.lora.rank=2", "model.vision.lora.alpha=4",
        "model.vision.lora.layers=[1,2]", "model.vision.lora.dora=true"]


def _random_adapters(model, pad_rows: bool = False) -> int:
    """B = 0 would make the adapters invisible: random A and B, each drawn from its name (the
    replicated pieces equal on every rank), and DoRA's magnitudes moved off the norms they start
    at. ``B``'s rows of the encoder MLP's zero padding units stay zero, as training keeps them
    (zero gradient; their magnitudes, the norms of zero rows, too), unless ``pad_rows``; so do
    ``fc2``'s ``A`` columns that read those units (model/lora.py, ``real_in``)."""
    import zlib

    from megatron.core import parallel_state

    from casa_megatron.model.lora import init_magnitudes, lora_adapters

    adapters = list(lora_adapters(model))
    vision = model.model_config.vision
    with torch.no_grad():
        for name, adapter in adapters:
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            for p in (adapter.lora_a, adapter.lora_b):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            tp_rank = parallel_state.get_tensor_model_parallel_rank()
            if name.startswith("vision.") and name.endswith("linear_fc1_lora") and not pad_rows:
                for half in adapter.lora_b.chunk(2):  # [gate; up], this rank's rows of each
                    half[max(vision.ffn_hidden_size - tp_rank * half.shape[0], 0):] = 0
            if name.startswith("vision.") and name.endswith("linear_fc2_lora"):  # A's padded input columns
                a = adapter.lora_a  # [r, in / tp]: this rank's columns
                a[:, max(vision.ffn_hidden_size - tp_rank * a.shape[1], 0):] = 0
        init_magnitudes(model)  # m = ||W + s B A||, then moved
        for name, adapter in adapters:
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 1)
            adapter.lora_magnitude.mul_(1 + 0.3 * torch.randn(adapter.lora_magnitude.shape, generator=g))
    return len(adapters)


def _worker(rank, world, root):
    from megatron.core import tensor_parallel
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(f"{root}/hf", attn_implementation="eager").float().eval()
    report = {}
    for tp in (1, world):
        model = build_pretrained(f"{root}/imported", tp=tp, image_slots=IMAGE_SLOTS)
        assert model.image_position_scheme == "mrope"  # the default with the Qwen2.5-VL encoder
        batch = _batch(model.model_config.vision.patch_dim)
        with torch.no_grad():
            ours = tensor_parallel.gather_from_tensor_model_parallel_region(model(batch))  # [s, b, v]
        ref = _hf_logits(hf, model, batch)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4, msg=lambda m: f"tp={tp}: {m}")
        report[tp] = ((ours - ref).abs().max().item(), ref.abs().max().item())
    _train_and_save(model, root, world, batch)  # the TP=2 model
    with torch.no_grad():
        trained = tensor_parallel.gather_from_tensor_model_parallel_region(model(batch))
    report["trained"] = trained
    report["moved"] = (trained - ours).abs().max().item()
    # the imported encoder over both pipeline stages (blocks 0-2 | block 3, full attention in 1 and 3,
    # 64 wide before a 48-wide LM): the same logits as transformers
    split = build_pretrained(f"{root}/imported", pp=world, image_slots=IMAGE_SLOTS,
                             overrides=["parallel.vision_blocks_per_pipeline_stage=[3,1]"])
    out = stage_logits(split, batch, IMAGE_SLOTS)  # [b, s, v] on the last stage
    if out is not None:
        torch.testing.assert_close(out.transpose(0, 1), ref, rtol=1e-4, atol=1e-4)
        report["encoder_split"] = ((out.transpose(0, 1) - ref).abs().max().item(), len(split.vision.blocks))
    else:
        report["encoder_split"] = (None, len(split.vision.blocks))
    # the LoRA run at TP=2: adapters trained one step and saved with the frozen weights
    lora = build_pretrained(f"{root}/imported", tp=world, image_slots=IMAGE_SLOTS, overrides=LORA)
    report["adapters"] = _random_adapters(lora)
    _train_and_save(lora, root, world, batch, run="run_lora", overrides=LORA)
    with torch.no_grad():
        report["lora"] = tensor_parallel.gather_from_tensor_model_parallel_region(lora(batch))
    return report


@pytest.fixture(scope="module")
def layouts(imported):
    """Both ranks' reports: logits vs HF at TP=1 and TP=2, then the trained TP=2 logits."""
    root, _ = imported
    return run_distributed(_worker, world_size=2, root=str(root))


def test_imported_insertion_equals_qwen2_5_vl_at_tp1_and_tp2(layouts):
    for report in layouts:
        checks = {k: v for k, v in report.items() if isinstance(k, int)}
        assert sorted(checks) == [1, 2]
        assert all(err < 1e-4 and scale > 1.0 for err, scale in checks.values()), report


def test_imported_encoder_split_over_two_stages_equals_qwen2_5_vl(layouts):
    """``parallel.vision_blocks_per_pipeline_stage=[3,1]`` on the imported checkpoint: stage 0 holds
    blocks 0-2, stage 1 block 3; the last stage's logits equal transformers'."""
    (err, first_blocks), (last_err, last_blocks) = (r["encoder_split"] for r in layouts)
    assert (first_blocks, last_blocks) == (3, 1) and err is None and last_err < 1e-4


def _export_native(rank, world, root, trained):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from casa_megatron.conversion.cli import main

    assert main(["export-hf", f"{root}/run", f"{root}/exported", "--no-progress"]) == 0
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(f"{root}/exported", attn_implementation="eager").eval()
    model = build_pretrained(f"{root}/imported", tp=1, image_slots=IMAGE_SLOTS)  # for the stream layout
    ref = _hf_logits(hf, model, _batch(model.model_config.vision.patch_dim))
    trained = torch.as_tensor(trained)
    torch.testing.assert_close(ref, trained, rtol=1e-4, atol=1e-4)
    return (ref - trained).abs().max().item(), sorted(p.name for p in Path(f"{root}/exported").iterdir())


def test_trained_tp2_checkpoint_exports_to_transformers_qwen2_5_vl(imported, layouts):
    root = imported[0]
    assert layouts[0]["moved"] > 1e-4  # the step changed the model: the export is of the trained weights
    (err, files), = run_distributed(_export_native, world_size=1, root=str(root), trained=layouts[0]["trained"])
    assert err < 1e-4
    assert not [f for f in files if f.endswith(".py")] and "model.safetensors" in files
    config = json.loads((root / "exported" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"] and "auto_map" not in config


def _export_lora(rank, world, root, trained):
    """The LoRA run exported both ways: merged into the weights, and apart (base + PEFT adapter)."""
    from peft import PeftModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    from casa_megatron.conversion.cli import main

    for mode in ("merge", "separate"):
        assert main(["export-hf", f"{root}/run_lora", f"{root}/lora_{mode}", "--lora", mode, "--no-progress"]) == 0
    model = build_pretrained(f"{root}/imported", tp=1, image_slots=IMAGE_SLOTS)  # for the stream layout
    batch = _batch(model.model_config.vision.patch_dim)

    def load(mode):
        return Qwen2_5_VLForConditionalGeneration.from_pretrained(f"{root}/lora_{mode}",
                                                                  attn_implementation="eager").eval()

    base = load("separate")
    logits = {"base": _hf_logits(base, model, batch), "merge": _hf_logits(load("merge"), model, batch)}
    peft = PeftModel.from_pretrained(base, f"{root}/lora_separate/lora_adapter").eval()
    logits["separate"] = _hf_logits(peft, model, batch)
    trained = torch.as_tensor(trained)
    config = json.loads(Path(f"{root}/lora_separate/lora_adapter/adapter_config.json").read_text())
    return ({k: (v - trained).abs().max().item() for k, v in logits.items()}, trained.abs().max().item(), config,
            _export_moved_padding(root))


def _export_moved_padding(root) -> dict:
    """Adapters whose B moved the encoder MLP's zero padding units: those units compute, and the
    HF MLP has no room for them. Both modes refuse (exit 2), naming the tensor; nothing is written."""
    import contextlib
    import io

    from casa_megatron.config import load_config
    from casa_megatron.config.schema import TrainConfig
    from casa_megatron.conversion.cli import main
    from support.export import save_weights_checkpoint

    model = build_pretrained(f"{root}/imported", tp=1, image_slots=IMAGE_SLOTS, overrides=LORA)
    _random_adapters(model, pad_rows=True)
    cfg = load_config(TrainConfig, None, [f"checkpoint.pretrained={root}/imported", "model.transformer_impl=local",
                                          f"data.tokenizer_path={root}/imported", *LORA])
    save_weights_checkpoint(model, cfg, Path(root) / "run_padding")
    out = {}
    for mode in ("merge", "separate"):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(["export-hf", f"{root}/run_padding", f"{root}/padding_{mode}", "--lora", mode, "--no-progress"])
        out[mode] = (code, err.getvalue(), Path(f"{root}/padding_{mode}").exists())
    return out


def test_lora_run_exports_to_qwen2_5_vl_merged_or_as_a_peft_adapter(imported, layouts):
    """DoRA adapters on the frozen LM and on two frozen encoder blocks, trained at TP=2: ``--lora merge``
    gives transformers' Qwen2.5-VL the trained logits; ``--lora separate`` gives them through PEFT
    on the base (the adapter addresses transformers' modules ``model.language_model.*`` /
    ``model.visual.*``, not the checkpoint's ``model.*`` / ``visual.*`` names), and the base
    alone differs. Adapters that moved the encoder MLP's zero padding units are refused."""
    root = imported[0]
    assert layouts[0]["adapters"] == 2 * 4 + 2 * 4  # 2 LM layers x 4 linears, 2 blocks x 4 linears
    (errors, scale, config, padding), = run_distributed(_export_lora, world_size=1, root=str(root),
                                                        trained=layouts[0]["lora"])
    assert errors["merge"] < 1e-4 and errors["separate"] < 1e-4, errors
    assert errors["base"] > 1e-2 and scale > 1.0, errors
    targets = config["target_modules"]
    assert "model.language_model.layers.0.self_attn.q_proj" in targets and "model.visual.blocks.1.attn.qkv" in targets
    assert not any(t.startswith(("model.layers.", "visual.")) for t in targets)
    assert not any(t.startswith("model.visual.blocks.0.") for t in targets)  # blocks 1 and 2 only
    assert config["r"] == 4 and set(config["rank_pattern"].values()) == {2} and config["use_dora"] is True
    for mode, (code, err, written) in padding.items():
        assert code == 2 and not written, (mode, err)
        assert "vision.blocks.1.mlp.linear_fc1" in err and "non-zero entries in the padded MLP units 45..47" in err, err
