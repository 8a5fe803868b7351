"""The remote model with the chat-template layout (``placeholders_in_stream: false``): the
placeholders leave the text stream and their images open a window at the next token.

Oracles: the same weights in our layout-token mode, where the window opens AT a marked token
(declare that token the "image token"); one pass vs. pieces through the cache (images left
pending at the end of a call); the live captioner's cached stream vs. one uncached pass over
everything it fed.
"""

from __future__ import annotations

import torch

from casa_megatron.hf.remote.configuration_casa import CasaConfig
from casa_megatron.hf.remote.modeling_casa import CasaForCausalLM

PH, VPH, MARK = 5, 6, 9  # image / video placeholders; a text token that follows images
SMALL = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vision_config=dict(hidden_size=32, num_heads=2, intermediate_size=48))


def _model(**kw) -> CasaForCausalLM:
    torch.manual_seed(0)
    model = CasaForCausalLM(CasaConfig(**{**SMALL, **kw})).eval()
    with torch.no_grad():  # non-trivial norms and gates
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _images(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor([[1, 4, 4], [1, 2, 4], [1, 4, 2]][:n])
    return torch.randn(int(grid.prod(-1).sum()), 3 * 14 * 14, generator=g), grid


def test_removed_placeholders_open_the_window_at_the_next_token():
    for mechanism in ("casa", "cross_attention", "insertion"):
        removed = _model(fusion_mechanism=mechanism, image_token_id=PH, video_token_id=VPH,
                         placeholders_in_stream=False)
        marked = _model(fusion_mechanism=mechanism, image_token_id=MARK, placeholders_in_stream=True)
        marked.load_state_dict(removed.state_dict())
        pixels, grid = _images(2)
        ids = torch.tensor([[2, 20, 21, PH, MARK, 22, 23, 24, VPH, MARK, 25, 26]])
        text = torch.tensor([[2, 20, 21, MARK, 22, 23, 24, MARK, 25, 26]])
        with torch.no_grad():
            a = removed(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, use_cache=False).logits
            b = marked(input_ids=text, pixel_values=pixels, image_grid_thw=grid, use_cache=False).logits
            c = removed(input_ids=ids, pixel_values=pixels + 1, image_grid_thw=grid, use_cache=False).logits
        keep = (ids[0] != PH) & (ids[0] != VPH)
        torch.testing.assert_close(a[0, keep], b[0], rtol=1e-5, atol=1e-5, msg=lambda m: f"{mechanism}: {m}")
        # a removed placeholder predicts what the text token before it predicts
        torch.testing.assert_close(a[0, 3], a[0, 2]), torch.testing.assert_close(a[0, 8], a[0, 7])
        assert torch.equal(a[0, :4], c[0, :4]) and (a[0, 4:] - c[0, 4:]).abs().max() > 1e-3, mechanism


def test_images_pending_at_the_end_of_a_call_open_the_next_window():
    """A template with no markup after its placeholder (Helium's ``<image>``): when a call ends
    with placeholders, their images wait and open the window at the next call's first token."""
    model = _model(image_token_id=PH, placeholders_in_stream=False)
    pixels, grid = _images(2)
    ids = torch.tensor([[2, 20, 21, PH, PH, 22, 23, 24]])
    with torch.no_grad():
        whole = model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, use_cache=False).logits
        cache = model.new_cache()
        first = model(input_ids=ids[:, :5], pixel_values=pixels, image_grid_thw=grid, past_key_values=cache).logits
        assert len(cache.rows[0].pending_images) == 2 and cache.rows[0].windows_opened == 1
        second = model(input_ids=ids[:, 5:], past_key_values=cache).logits
    assert not cache.rows[0].pending_images and cache.rows[0].window_images == 2
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-5, atol=1e-5)


def test_live_captioner_stream_equals_one_uncached_pass(tmp_path):
    """Helium-style template (bare ``<image>``, pending images) and Qwen-style markup: every
    token the captioner generated is the argmax of one uncached pass over all it fed."""
    from data.chat_tokenizers import helium_style, qwen_style
    from transformers import AutoTokenizer

    from casa_megatron.hf.remote.processing_casa import CasaProcessor
    from casa_megatron.inference.streaming import LiveCaptioner

    g = torch.Generator().manual_seed(3)
    frames = [torch.randint(0, 256, (3, 56, 56), dtype=torch.uint8, generator=g) for _ in range(3)]
    for style in (helium_style, qwen_style):
        proc = CasaProcessor(AutoTokenizer.from_pretrained(str(style(tmp_path / style.__name__))))
        model = _model(vocab_size=len(proc.tokenizer), image_token_id=proc.image_token_id,
                       video_token_id=proc.video_token_id, placeholders_in_stream=False)
        captioner = LiveCaptioner(model, proc, max_new_tokens=4, prompt="Describe the video.")
        records = list(captioner.stream((0.5 * k, f) for k, f in enumerate(frames)))
        fed, steps = proc.stream_prompt_ids("Describe the video."), []
        for r in records:
            fed += proc.frame_ids()
            for t in r.tokens:
                steps.append((len(fed) - 1, t))
                fed.append(t)
        pixels, grid = proc.process_images(frames, proc.video_max_pixels)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([fed]), pixel_values=pixels, image_grid_thw=grid,
                           use_cache=False).logits[0]
        logits[:, [proc.image_token_id] + ([proc.video_token_id] if proc.video_token_id else [])] = float("-inf")
        assert [t for _, t in steps] == [int(logits[i].argmax()) for i, _ in steps], style.__name__
        assert captioner.cache.rows[0].windows_opened == 4  # the leading text-only window + one per frame
