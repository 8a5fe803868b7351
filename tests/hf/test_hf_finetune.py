"""Fine-tuning the export with transformers: ``labels`` give the loss megatron gives, and its
gradients are megatron's.

A transformers user adapts an exported model with the HF ``Trainer`` (or PEFT): it calls
``model(**inputs, labels=labels).loss.backward()``. The exported logits equal megatron's
(test_megatron_equivalence.py); this checks what training adds on top: the label shift and the
ignored positions (``-100`` on image placeholders), and the backward pass through the remote
code. The reference is the megatron model of the same training checkpoint, in one process, with
the same loss on its logits: the word-embedding gradient (every text position's path back
through every layer, CASA / cross-attention / insertion included) and the vision encoder's
patch-embedding gradient (the path back from the text through the images' keys and values, the
projector and the whole encoder) must agree.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.dist import run_distributed
from support.hf_cases import IMAGE_SLOTS, hf_inputs, make_case, megatron_batch

VARIANTS = ["casa_parallel", "cross_attention_gated", "insertion"]
TOL = dict(rtol=1e-4, atol=1e-5)


def _targets(input_ids: torch.Tensor, placeholders) -> torch.Tensor:
    """HF ``labels``: the tokens themselves, image placeholders ignored (-100)."""
    labels = input_ids.clone()
    labels[torch.isin(input_ids, torch.tensor(placeholders))] = -100
    return labels


def _shifted_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Position t predicts labels[t + 1]: the causal-LM loss, written out."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def _megatron_side(rank, world, checkpoint, kind, placeholders, vocab):
    from casa_megatron.evaluation.checkpoint_model import load_checkpoint_model

    model, _ = load_checkpoint_model(checkpoint, image_slots=IMAGE_SLOTS)
    case = make_case(kind)
    logits = model(megatron_batch(case)).transpose(0, 1)[..., :vocab]  # [s, b, v] -> [b, s, vocab]
    loss = _shifted_loss(logits, _targets(case["input_ids"], placeholders))
    loss.backward()
    grads = {"embedding": model.embedding.word_embeddings.weight.grad[:vocab]}
    patch = model.vision.patch_embed.weight
    if patch.grad is not None:
        grads["patch_embed"] = patch.grad
    return {"loss": loss.detach(), **grads}


@pytest.mark.parametrize("kind", ["image", "video"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_loss_and_gradients_equal_megatron(exported, variant, kind):
    from transformers import AutoModelForCausalLM

    root, _ = exported
    model = AutoModelForCausalLM.from_pretrained(root / "hf" / "tp2" / variant, trust_remote_code=True).eval()
    placeholders = model._placeholder_ids()
    case = make_case(kind)
    labels = _targets(case["input_ids"], placeholders)
    assert (labels == -100).any() and (labels != -100).sum() > 4  # images in the text, and text to learn
    out = model(**hf_inputs(case), labels=labels, use_cache=False)
    torch.testing.assert_close(out.loss, _shifted_loss(out.logits, labels))  # the shift, as transformers' models
    out.loss.backward()

    ref = run_distributed(_megatron_side, world_size=1, checkpoint=str(root / "tp2" / variant / "checkpoints"),
                          kind=kind, placeholders=placeholders, vocab=model.config.vocab_size)[0]
    torch.testing.assert_close(out.loss.detach(), torch.as_tensor(ref["loss"]), **TOL)
    embedding = model.model.embed_tokens.weight.grad
    assert embedding.abs().max() > 0
    torch.testing.assert_close(embedding, torch.as_tensor(ref["embedding"]), **TOL)
    assert "patch_embed" in ref, "the test model's vision encoder should train"
    patch = model.visual.patch_embed.proj.weight.grad
    assert patch.abs().max() > 0  # the images' K/V carry gradient back to the encoder
    torch.testing.assert_close(patch, torch.as_tensor(ref["patch_embed"]), **TOL)


def test_gradient_accumulation_as_the_trainer_runs_it(exported):
    """transformers' ``Trainer`` sees ``**kwargs`` in ``forward``, passes ``num_items_in_batch`` (the
    target tokens of the whole accumulated batch) and stops dividing by the accumulation steps: the
    model must sum its token losses and divide by that count. Then two micro-batches of one row
    give exactly the loss and gradients of one batch of both rows (a mean per micro-batch would
    give twice the gradient here)."""
    from transformers import AutoModelForCausalLM

    root, _ = exported
    model = AutoModelForCausalLM.from_pretrained(root / "casa_parallel", trust_remote_code=True).eval()
    case = make_case("image")
    inputs, labels = hf_inputs(case), _targets(case["input_ids"], model._placeholder_ids())
    assert labels.shape[0] == 2

    model.zero_grad()
    whole = model(**inputs, labels=labels, use_cache=False).loss
    whole.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    items = (labels[:, 1:] != -100).sum()
    per_image = inputs["image_grid_thw"].prod(-1)
    images_of_row0 = int(torch.isin(case["input_ids"][0], torch.tensor(model._placeholder_ids())).sum())
    split = int(per_image[:images_of_row0].sum())
    rows = [dict(input_ids=inputs["input_ids"][:1], pixel_values=inputs["pixel_values"][:split],
                 image_grid_thw=inputs["image_grid_thw"][:images_of_row0]),
            dict(input_ids=inputs["input_ids"][1:], pixel_values=inputs["pixel_values"][split:],
                 image_grid_thw=inputs["image_grid_thw"][images_of_row0:])]
    total = 0.0
    for r, row in enumerate(rows):
        loss = model(**row, labels=labels[r:r + 1], num_items_in_batch=items, use_cache=False).loss
        loss.backward()
        total = total + loss.detach()
    torch.testing.assert_close(total, whole.detach(), **TOL)
    assert reference and all(torch.allclose(p.grad, reference[n], rtol=1e-4, atol=1e-6)
                             for n, p in model.named_parameters() if n in reference)


@pytest.mark.parametrize("variant", ["casa_parallel", "insertion"])
def test_bf16_finetuning_step_follows_float32(exported, variant):
    """Fine-tuning on a GPU runs in bf16: loaded with ``dtype=torch.bfloat16`` on the CPU, the loss
    and the gradients down to the vision encoder are float32's within bf16 tolerance (measured:
    loss 1e-4, gradients 1.1-1.4 % relative L2), and every gradient stays bf16."""
    from transformers import AutoModelForCausalLM

    root, _ = exported
    case = make_case("image")
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(root / variant, trust_remote_code=True, dtype=dtype).eval()
        out = model(**hf_inputs(case), labels=_targets(case["input_ids"], model._placeholder_ids()), use_cache=False)
        out.loss.backward()
        assert all(p.grad is None or p.grad.dtype == dtype for p in model.parameters())
        runs[dtype] = (out.loss.detach().float(), model.model.embed_tokens.weight.grad.float(),
                       model.visual.patch_embed.proj.weight.grad.float())
    ref, low = runs[torch.float32], runs[torch.bfloat16]
    torch.testing.assert_close(low[0], ref[0], rtol=2e-2, atol=0)
    for got, want in zip(low[1:], ref[1:]):
        assert (got - want).norm() / want.norm() < 3e-2


def _import_and_logits(rank, world, hf_folder, out, kinds):
    """(worker) ``casa-convert import-hf`` the folder, then the megatron model's logits from it."""
    from casa_megatron.conversion.cli import main
    from casa_megatron.evaluation.checkpoint_model import load_checkpoint_model

    assert main(["import-hf", hf_folder, out, "--no-progress"]) == 0
    model, _ = load_checkpoint_model(out, image_slots=IMAGE_SLOTS)
    with torch.no_grad():
        return {kind: model(megatron_batch(make_case(kind))).transpose(0, 1) for kind in kinds}


def test_finetuned_with_transformers_comes_back_to_megatron(exported, tmp_path):
    """Adapt with transformers, continue with megatron: one AdamW step on the export, then
    ``save_pretrained`` (model and processor) and ``casa-convert import-hf`` of that folder give a
    megatron model with the fine-tuned model's logits."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    root, _ = exported
    model = AutoModelForCausalLM.from_pretrained(root / "casa_parallel", trust_remote_code=True).eval()
    case = make_case("image")
    inputs = hf_inputs(case)
    with torch.no_grad():
        before = model(**inputs, use_cache=False).logits
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(**inputs, labels=_targets(case["input_ids"], model._placeholder_ids()), use_cache=False).loss.backward()
    optimizer.step()
    tuned = tmp_path / "tuned"
    model.save_pretrained(tuned)
    AutoProcessor.from_pretrained(root / "casa_parallel", trust_remote_code=True).save_pretrained(tuned)

    kinds = ("image", "video")
    got = run_distributed(_import_and_logits, world_size=1, hf_folder=str(tuned), out=str(tmp_path / "megatron"),
                          kinds=kinds)[0]
    with torch.no_grad():
        after = {kind: model(**hf_inputs(make_case(kind)), use_cache=False).logits for kind in kinds}
    assert (after["image"] - before).abs().max() > 1e-2  # the step changed the model
    vocab = model.config.vocab_size
    for kind in kinds:
        torch.testing.assert_close(torch.as_tensor(got[kind])[..., :vocab], after[kind], **TOL)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_checkpointing_gives_the_same_gradients(exported, variant):
    """``gradient_checkpointing_enable()`` (``activation_checkpointing_enable`` in newer
    transformers), as a fine-tune of a large export turns it on: every layer runs again in
    backward (counted), and loss and every gradient equal the run that kept its activations. The
    video case has several windows per row, so a recomputed layer must first rewind caches that
    later window pieces have grown and re-opened (``RowCache.rewind``)."""
    from transformers import AutoModelForCausalLM

    root, _ = exported
    model = AutoModelForCausalLM.from_pretrained(root / variant, trust_remote_code=True).train()
    calls = []
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda module, args: calls.append(module.index))

    def step(kind):
        model.zero_grad()
        case = make_case(kind)
        loss = model(**hf_inputs(case), labels=_targets(case["input_ids"], model._placeholder_ids()),
                     use_cache=False).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    for kind in ("image", "video"):
        calls.clear()
        loss, grads = step(kind)
        plain_calls = len(calls)
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
        assert model.model.gradient_checkpointing
        calls.clear()
        loss_ckpt, grads_ckpt = step(kind)
        assert len(calls) == 2 * plain_calls  # each layer of each window piece ran twice
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
        assert grads_ckpt.keys() == grads.keys() and len(grads) > 10
        for name, grad in grads.items():
            torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


class _Rows(torch.utils.data.Dataset):
    """One training row each (its own pixels and image grid): what a VLM fine-tuning dataset yields."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _collate(rows):
    """Rows of equal length stacked; pixels and grids of all their images concatenated."""
    return {"input_ids": torch.stack([r["input_ids"] for r in rows]),
            "labels": torch.stack([r["labels"] for r in rows]),
            "pixel_values": torch.cat([r["pixel_values"] for r in rows]),
            "image_grid_thw": torch.cat([r["image_grid_thw"] for r in rows])}


def test_trainer_step_with_gradient_accumulation_equals_one_whole_batch_step(exported, tmp_path):
    """The exported model under transformers' own ``Trainer`` (accelerate underneath), as a user
    fine-tunes it: two rows, one per micro-batch, ``gradient_accumulation_steps=2``, one SGD step.
    The weights after it equal one hand-written step on the whole two-row batch (the Trainer passes
    ``num_items_in_batch``: the model must sum its token losses over the accumulated batch), and the
    Trainer's logged loss is that batch's loss."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    root, _ = exported
    lr = 0.5
    reference = AutoModelForCausalLM.from_pretrained(root / "casa_parallel", trust_remote_code=True).train()
    case = make_case("image")
    inputs, labels = hf_inputs(case), _targets(case["input_ids"], reference._placeholder_ids())
    whole = reference(**inputs, labels=labels, use_cache=False).loss
    whole.backward()
    with torch.no_grad():
        expected = {n: p - lr * p.grad for n, p in reference.named_parameters() if p.grad is not None}

    images_of_row0 = int(torch.isin(case["input_ids"][0], torch.tensor(reference._placeholder_ids())).sum())
    split = int(inputs["image_grid_thw"][:images_of_row0].prod(-1).sum())
    rows = [dict(input_ids=inputs["input_ids"][r], labels=labels[r],
                 pixel_values=inputs["pixel_values"][:split] if r == 0 else inputs["pixel_values"][split:],
                 image_grid_thw=inputs["image_grid_thw"][:images_of_row0] if r == 0 else
                 inputs["image_grid_thw"][images_of_row0:]) for r in range(2)]
    model = AutoModelForCausalLM.from_pretrained(root / "casa_parallel", trust_remote_code=True)
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=1,
                             gradient_accumulation_steps=2, max_steps=1, learning_rate=lr, optim="sgd",
                             lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
                             use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                             remove_unused_columns=False, dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(rows), data_collator=_collate)
    result = trainer.train()
    assert trainer.state.global_step == 1
    assert result.training_loss == pytest.approx(whole.item(), rel=1e-4)
    tuned = dict(model.named_parameters())
    moved = 0
    for name, want in expected.items():
        torch.testing.assert_close(tuned[name].detach(), want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        moved += int(not torch.equal(want, dict(reference.named_parameters())[name].detach()))
    assert moved > 10  # the step changed the weights (so equality is not that of two untouched models)
