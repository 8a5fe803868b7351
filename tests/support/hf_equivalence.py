"""Workers comparing our imported LM with the Hugging Face model (run in forked gloo
processes, see support/dist.py): logits on text at TP=1, TP=2 (+SP) and PP=2."""

from __future__ import annotations

import torch

IMAGE_SLOTS = 4
TOL = dict(rtol=1e-4, atol=3e-5)


def text_only_batch(input_ids, patch_dim: int = 3 * 14 * 14):
    from casa_megatron.model.batch import VLMBatch

    b, s = input_ids.shape
    empty = torch.zeros(0, dtype=torch.long)
    return VLMBatch(input_ids=input_ids, position_ids=torch.arange(s).expand(b, s).contiguous(),
                    pixel_patches=torch.zeros(0, patch_dim), image_grid_hw=torch.zeros(0, 2, dtype=torch.long),
                    image_rows=empty, image_positions=empty)


def build_pretrained(directory, tp: int = 1, pp: int = 1, sp: bool = False, overrides=(), image_slots=IMAGE_SLOTS):
    """Our model with the architecture and weights of an imported checkpoint, at a layout."""
    from casa_megatron.config import load_config
    from casa_megatron.config.schema import TrainConfig
    from casa_megatron.model.build import build_vlm
    from casa_megatron.parallel import initialize_parallel
    from casa_megatron.training.pretrained import load_model_weights

    cfg = load_config(TrainConfig, None, [f"checkpoint.pretrained={directory}", "model.transformer_impl=local",
                                          f"parallel.tensor_model_parallel_size={tp}",
                                          f"parallel.pipeline_model_parallel_size={pp}",
                                          f"parallel.sequence_parallel={str(sp).lower()}", *overrides])
    initialize_parallel(tp, pp, seed=0)
    model = build_vlm(cfg.model, cfg.parallel, image_slots)
    load_model_weights(model, directory)
    return model.eval()


def stage_logits(model, batch, image_slots: int = IMAGE_SLOTS):
    """[b, s, v_padded] full logits on the last pipeline stage (None elsewhere), gathered over TP
    (PP: megatron's forward-only schedule)."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    b, s = batch.input_ids.shape
    with torch.no_grad():
        if parallel_state.get_pipeline_model_parallel_world_size() == 1:
            out = model(batch)
        else:
            outs = get_forward_backward_func()(
                forward_step_func=lambda it, m: (m(next(it)), None), data_iterator=iter([batch]), model=[model],
                num_microbatches=1, seq_length=s + image_slots, micro_batch_size=b, forward_only=True)
            if not parallel_state.is_pipeline_last_stage():
                return None
            out = outs[0]
    return tensor_parallel.gather_from_tensor_model_parallel_region(out).transpose(0, 1).contiguous()


def full_logits(model, input_ids, vocab: int):
    """[b, s, vocab] of a text-only batch on the last pipeline stage (None elsewhere), padding cut."""
    out = stage_logits(model, text_only_batch(input_ids, model.model_config.vision.patch_dim))
    if out is None:
        return None
    assert torch.isinf(out[..., vocab:]).all(), "padded vocabulary columns must be -inf"
    return out[..., :vocab]


def layouts_worker(rank, world, cases, vocab):
    """Every case (imported dir, input ids, HF logits) at TP=2, TP=2+SP and PP=2."""
    report = {}
    for name, (directory, input_ids, ref) in cases.items():
        for tp, pp, sp in ((2, 1, False), (2, 1, True), (1, 2, False)):
            model = build_pretrained(directory, tp, pp, sp)
            ours = full_logits(model, torch.as_tensor(input_ids), vocab)
            if ours is not None:
                torch.testing.assert_close(ours, torch.as_tensor(ref), **TOL,
                                           msg=lambda m: f"{name} tp={tp} pp={pp} sp={sp}: {m}")
                report[f"{name} tp={tp} pp={pp} sp={sp}"] = (ours - torch.as_tensor(ref)).abs().max().item()
    return report
