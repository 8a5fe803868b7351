"""Cached generation == full recomputation, and what the cache holds while frames stream in."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.hf_cases import IMG, hf_inputs, make_case

GENERATED = ["casa_parallel", "casa_replace", "cross_attention_gated", "insertion"]


def _load(root, variant):
    from transformers import AutoModelForCausalLM, AutoProcessor

    model = AutoModelForCausalLM.from_pretrained(root / variant, trust_remote_code=True).eval()
    return model, AutoProcessor.from_pretrained(root / variant, trust_remote_code=True)


def _prompt(kind="video", length=18):
    inputs = hf_inputs(make_case(kind))
    ids = inputs["input_ids"][:1, :length]
    n_img = int((ids == IMG).sum())
    n_patches = int(inputs["image_grid_thw"][:n_img].prod(-1).sum())
    return {"input_ids": ids, "pixel_values": inputs["pixel_values"][:n_patches],
            "image_grid_thw": inputs["image_grid_thw"][:n_img]}


@pytest.mark.parametrize("variant", GENERATED)
def test_cached_generation_equals_full_recomputation(exported, variant):
    model, _ = _load(exported[0], variant)
    prompt = _prompt()
    kwargs = dict(max_new_tokens=8, do_sample=False, suppress_tokens=[IMG], return_dict_in_generate=True,
                  output_logits=True, pad_token_id=0)
    cached = model.generate(**prompt, use_cache=True, **kwargs)
    full = model.generate(**prompt, use_cache=False, **kwargs)
    assert type(cached.past_key_values).__name__ == "CasaCache"
    assert torch.equal(cached.sequences, full.sequences)
    for step, (a, b) in enumerate(zip(cached.logits, full.logits)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{variant} step {step}: {m}")


@pytest.mark.parametrize("variant", ["casa_parallel", "cross_attention", "insertion"])
def test_prompt_in_pieces_equals_one_pass(exported, variant):
    """Feeding the prompt in arbitrary pieces (cut inside windows and at window starts) through a
    kept cache gives the one-pass logits: window continuation and opening are exact."""
    model, _ = _load(exported[0], variant)
    prompt = _prompt(length=24)
    with torch.no_grad():
        whole = model(**prompt, use_cache=False).logits
        cache, outs, used = model.new_cache(), [], 0
        ids = prompt["input_ids"]
        for a, b in ((0, 2), (2, 7), (7, 8), (8, 12), (12, 13), (13, 24)):
            piece = ids[:, a:b]
            n_img = int((piece == IMG).sum())
            grids = prompt["image_grid_thw"][used:used + n_img]
            start = int(prompt["image_grid_thw"][:used].prod(-1).sum())
            n_patch = int(grids.prod(-1).sum())
            images = {"pixel_values": prompt["pixel_values"][start:start + n_patch], "image_grid_thw": grids} if n_img else {}
            used += n_img
            outs.append(model(input_ids=piece, past_key_values=cache, use_cache=True, **images).logits)
    torch.testing.assert_close(torch.cat(outs, 1), whole, rtol=1e-5, atol=1e-5)


def test_image_run_split_across_calls_is_refused(exported):
    """Images of one window must arrive together (the first placeholder's query already ran)."""
    model, _ = _load(exported[0], "casa_parallel")
    prompt = _prompt(length=24)  # placeholders at 2, 3, 4 share a window
    cache = model.new_cache()
    grid = prompt["image_grid_thw"]
    first = int(grid[0].prod())
    model(input_ids=prompt["input_ids"][:, :3], pixel_values=prompt["pixel_values"][:first],
          image_grid_thw=grid[:1], past_key_values=cache)
    with pytest.raises(ValueError, match="continues across forward calls"):
        second = first + int(grid[1:3].prod(-1).sum())
        model(input_ids=prompt["input_ids"][:, 3:5], pixel_values=prompt["pixel_values"][first:second],
              image_grid_thw=grid[1:3], past_key_values=cache)


@pytest.mark.parametrize("variant", ["casa_parallel", "casa_replace", "cross_attention_gated", "insertion"])
def test_streamed_frames_cache_holds_text_and_one_window(exported, variant):
    from transformers import AutoConfig

    from casa_megatron.inference.streaming import LiveCaptioner

    model, processor = _load(exported[0], variant)
    cfg = AutoConfig.from_pretrained(exported[0] / variant, trust_remote_code=True)
    rng = np.random.default_rng(0)
    captioner = LiveCaptioner(model, processor, max_new_tokens=4, max_pixels=56 * 84)
    sa_layers = [i for i in range(cfg.num_hidden_layers)
                 if not (i in cfg.fusion_layers and cfg.fusion_placement == "replace")]
    per_token = 2 * cfg.num_key_value_heads * cfg.head_dim * 4  # fp32 K and V of one token, one layer
    image_tokens = generated = 0
    for k in range(5):
        frame = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
        record = captioner.caption_frame(frame, k / 2)
        row = captioner.cache.rows[0]
        image_tokens += 6  # 56x84 px -> 4x6 patches -> 6 tokens per frame
        expect_sa = row.text_tokens + (image_tokens if variant == "insertion" else 0)
        for i in sa_layers:
            assert row.self_attn[i].length == expect_sa, (variant, k, i)
        for i in cfg.fusion_layers:
            window = row.windows[i]
            assert window.num_image_tokens == 6  # one window: this frame's image only
            expected_text = row.text_tokens - row.window_start if cfg.fusion_mechanism == "casa" else 0
            assert window.text.length == expected_text
        assert record.cache_bytes["self_attention"] == expect_sa * len(sa_layers) * per_token
        generated += len(record.tokens)
        # bos, then per frame: its placeholder and its tokens, the last one entering with the next frame
        assert record.text_tokens == row.text_tokens == 1 + (k + 1) + generated - 1
    assert captioner.frames_seen == 5


@pytest.mark.parametrize("variant", ["casa_parallel", "insertion"])
def test_left_padded_batch_generates_like_each_row_alone(exported, variant):
    model, processor = _load(exported[0], variant)
    rng = np.random.default_rng(3)
    frames = [rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) for _ in range(3)]
    texts = ["<bos> w1 <image> w2 w3 w4", "<bos> <image> w5 <image> w6"]
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, suppress_tokens=[IMG])
    batch = processor(text=texts, images=frames)
    assert batch["attention_mask"][0].tolist() == [1] * 6 and batch["attention_mask"][1, 0] == 0
    together = model.generate(**batch, **kwargs)[:, -5:]
    alone = [model.generate(**processor(text=[texts[0]], images=frames[:1]), **kwargs)[:, -5:],
             model.generate(**processor(text=[texts[1]], images=frames[1:]), **kwargs)[:, -5:]]
    assert torch.equal(together, torch.cat(alone))


def _row_inputs(inputs, r):
    """Row r of a batch alone: its ids and only its images (rows' images are in row order)."""
    ids = inputs["input_ids"][r:r + 1]
    counts = (inputs["input_ids"] == IMG).sum(1).tolist()
    first = sum(counts[:r])
    grid = inputs["image_grid_thw"][first:first + counts[r]]
    start = int(inputs["image_grid_thw"][:first].prod(-1).sum())
    return {"input_ids": ids, "image_grid_thw": grid,
            "pixel_values": inputs["pixel_values"][start:start + int(grid.prod(-1).sum())]}


@pytest.mark.parametrize("variant", ["casa_parallel", "cross_attention_gated", "insertion"])
def test_beam_search_scores_equal_teacher_forced_log_probs(exported, variant):
    """generate(num_beams=3, num_return_sequences=3) on two rows with different images: each
    returned beam's score equals the log-probability of its tokens computed by one plain forward
    of that row alone with its own images (length_penalty 0: the score is the sum), with and
    without the cache. Catches the image inputs being interleaved when generate repeats rows, and
    a cache not reordered with the beams (both were the case)."""
    model, _ = _load(exported[0], variant)
    inputs = hf_inputs(make_case("image"))
    prompt_len = inputs["input_ids"].shape[1]
    eos = model.generation_config.eos_token_id
    eos = set([eos] if isinstance(eos, int) else eos or [])
    kwargs = dict(max_new_tokens=5, num_beams=3, num_return_sequences=3, do_sample=False, length_penalty=0.0,
                  suppress_tokens=[IMG], return_dict_in_generate=True, output_scores=True, pad_token_id=0)
    runs = {cache: model.generate(**inputs, use_cache=cache, **kwargs) for cache in (True, False)}
    assert torch.equal(runs[True].sequences, runs[False].sequences)
    torch.testing.assert_close(runs[True].sequences_scores, runs[False].sequences_scores, rtol=1e-5, atol=1e-5)
    out = runs[True]
    for j, (seq, score) in enumerate(zip(out.sequences, out.sequences_scores)):
        alone = _row_inputs(inputs, j // 3)
        new = seq[prompt_len:].tolist()
        if any(t in eos for t in new):
            new = new[:next(i for i, t in enumerate(new) if t in eos) + 1]
        ids = torch.cat([alone["input_ids"], torch.tensor([new])], 1)
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=alone["pixel_values"], image_grid_thw=alone["image_grid_thw"],
                           use_cache=False).logits[0].float()
        # beam search log-softmaxes the raw logits, then applies suppress_tokens (no renormalising)
        logp = logits.log_softmax(-1)[prompt_len - 1:prompt_len - 1 + len(new)].gather(1, torch.tensor(new)[:, None])
        torch.testing.assert_close(score, logp.sum(), rtol=1e-4, atol=1e-4, msg=lambda m: f"{variant} beam {j}: {m}")


def test_cache_refuses_to_crop_and_resets(exported):
    """Assisted / speculative decoding rolls caches back with ``crop``; CasaCache cannot roll back
    across a dropped window, so it says so instead of the base class's silent no-op."""
    model, _ = _load(exported[0], "casa_parallel")
    out = model.generate(**_prompt(), max_new_tokens=2, do_sample=False, suppress_tokens=[IMG], pad_token_id=0,
                         return_dict_in_generate=True)
    cache = out.past_key_values
    assert cache.nbytes()["self_attention"] > 0
    with pytest.raises(NotImplementedError, match="assisted / speculative decoding"):
        cache.crop(4)
    cache.reset()
    assert cache.rows == [] and cache.get_seq_length() == 0 and cache.nbytes()["self_attention"] == 0
