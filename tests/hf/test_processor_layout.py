"""The exported processor lays text and images out exactly like the training pipeline.

Oracle: the data pipeline itself (``ChatTemplateLayout`` / ``LayoutTokens`` -> ``Packer.collate``),
for a Qwen2.5-style and a Helium-style tokenizer built in the test and for our layout-token
fallback: the same text ids (placeholders removed for the chat template), the same image
positions (one per encoder input), windows, patch grids, pixels and clip durations, for one
image, two consecutive images, a video, for CASA and token insertion, for ``tiny_vit`` and the
Qwen2.5-VL encoder's frame pairs; training samples and generation prompts alike.
"""

from __future__ import annotations

from typing import List

import pytest
import torch

from casa_megatron.data.chat_template import ChatTemplateLayout, DecodedMedia
from casa_megatron.data.formats import parse_conversation
from casa_megatron.data.packing import Packer
from casa_megatron.hf.remote.processing_casa import CasaProcessor

ENCODERS = {"tiny_vit": 1, "qwen2_5_vl": 2}  # encoder -> temporal patch size


def _frames(n: int, h: int, w: int, seed: int) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for _ in range(n)]


CASES = {  # name -> (messages with payloads, DecodedMedia in stream order)
    "one_image": lambda: _case([("image", _frames(1, 56, 84, 0))], [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]},
        {"role": "assistant", "content": "red"}]),
    "two_images": lambda: _case([("image", _frames(1, 56, 56, 1)), ("image", _frames(1, 56, 112, 2)),
                                 ("image", _frames(1, 84, 56, 3))], [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " "}, {"type": "image"},
                                     {"type": "text", "text": "Which picture has more shapes?"}]},
        {"role": "assistant", "content": "the first one"},
        {"role": "user", "content": [{"type": "text", "text": "What colour? "}, {"type": "image"},
                                     {"type": "text", "text": " Compare them."}]},
        {"role": "assistant", "content": "yes"}]),
    "video": lambda: _case([("video", _frames(5, 56, 84, 4))], [
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Describe the video."}]},
        {"role": "assistant", "content": "the red circle moves right"}]),
}


def _case(media, messages):
    parts = iter(media)
    with_payload = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [dict(p) for p in content]
            for p in content:
                if p["type"] in ("image", "video"):
                    kind, frames = next(parts)
                    p[p["type"]] = frames[0] if kind == "image" else frames
        with_payload.append({"role": m["role"], "content": content})
    decoded = [DecodedMedia(kind, frames, [0.5 * k for k in range(len(frames))] if kind == "video" else None)
               for kind, frames in media]
    return with_payload, messages, decoded


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from data.chat_tokenizers import QWEN3_TEXT_TEMPLATE, helium_style, qwen3_style, qwen_style

    from casa_megatron.data.synthetic_media import vocabulary
    from casa_megatron.data.tokenization import build_word_tokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    return {"qwen": str(qwen_style(root / "qwen")), "helium": str(helium_style(root / "helium")),
            "qwen3_text": str(qwen3_style(root / "qwen3_text", QWEN3_TEXT_TEMPLATE)),
            "layout_tokens": str(build_word_tokenizer([" ".join(vocabulary()) + " describe the video one"],
                                                      root / "words"))}


def _processor(path: str, encoder: str, insertion: bool) -> CasaProcessor:
    from transformers import AutoTokenizer

    return CasaProcessor(AutoTokenizer.from_pretrained(path), encoder=encoder, temporal_patch_size=ENCODERS[encoder],
                         merge_consecutive=not insertion, max_pixels=200_000, video_max_pixels=200_000)


def _pipeline_batch(sample, encoder: str, pad: int):
    packer = Packer(1, len(sample), 10_000, pad, temporal_patch_size=ENCODERS[encoder], fps=2.0)
    batch, _ = packer.collate([[sample]])
    return batch


def _compare(out, batch, placeholder_ids, in_stream: bool) -> None:
    """Processor output == the pipeline's packed row: text, image positions, windows, pixels."""
    ids = out["input_ids"][0].tolist()
    is_ph = [t in placeholder_ids for t in ids]
    text = ids if in_stream else [t for t, p in zip(ids, is_ph) if not p]
    assert text == batch.input_ids[0].tolist()
    positions, k = [], 0
    while k < len(ids):  # a run of placeholders: its images open a window at the run (in stream) / after it
        if is_ph[k]:
            j = k
            while j < len(ids) and is_ph[j]:
                j += 1
            at = k if in_stream else sum(1 for p in is_ph[:k] if not p)
            positions += [at] * (j - k)
            k = j
        else:
            k += 1
    assert positions == batch.image_positions.tolist()
    assert sorted({0, *positions}) == batch.window_starts[0].nonzero().flatten().tolist()
    assert out["image_grid_thw"].tolist() == batch.image_grid_thw.tolist()
    torch.testing.assert_close(out["pixel_values"], batch.pixel_patches, rtol=0, atol=1e-5)
    if batch.image_second_per_grid is not None:
        assert out["second_per_grid_ts"].tolist() == batch.image_second_per_grid.tolist()


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
@pytest.mark.parametrize("fusion", ["casa", "insertion"])
@pytest.mark.parametrize("style", ["qwen", "helium"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_chat_template_layout_equals_the_pipeline(tokenizers, style, fusion, encoder, case):
    proc = _processor(tokenizers[style], encoder, fusion == "insertion")
    layout = ChatTemplateLayout(tokenizers[style], merge_consecutive=fusion != "insertion")
    assert proc.layout == "chat_template" and proc.image_token_id == proc._id(layout.image_placeholder)
    placeholders = {proc.image_token_id, proc.video_token_id}
    with_payload, plain, media = CASES[case]()
    conv = parse_conversation({"messages": plain}, case)
    # a training sample (the whole conversation) ...
    sample = layout.build(case, conv, media)
    out = proc.apply_chat_template(with_payload, tokenize=True, return_dict=True)
    _compare(out, _pipeline_batch(sample, encoder, layout.pad_id), placeholders, in_stream=False)
    # ... and a generation prompt (up to the last user turn)
    prompt = layout.prompt(case, conv.messages[:-1], media)
    out = proc.apply_chat_template(with_payload[:-1], add_generation_prompt=True, tokenize=True, return_dict=True)
    _compare(out, _pipeline_batch(prompt, encoder, layout.pad_id), placeholders, in_stream=False)
    # the text route: render, then process (what a transformers user writes)
    text = proc.apply_chat_template(with_payload[:-1], add_generation_prompt=True)
    images = [p.get("image", p.get("video")) for m in with_payload[:-1] if isinstance(m["content"], list)
              for p in m["content"] if p["type"] != "text"]
    if case == "video" and proc.video_token_id is not None:
        again = proc(text=text, videos=images)
    else:
        again = proc(text=text, images=images)
    assert again["input_ids"].tolist() == out["input_ids"].tolist()
    if case == "two_images":  # consecutive images share a window unless the model inserts tokens
        runs = sum(1 for a, b in zip([None] + out["input_ids"][0].tolist(), out["input_ids"][0].tolist())
                   if b in placeholders and a not in placeholders)
        assert runs == (3 if fusion == "insertion" else 2)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_run_s_data_chat_template_is_the_export_s_template(tokenizers, tmp_path, case):
    """A run that laid text out with ``data.chat_template`` (a text-only LM's tokenizer, Qwen3's
    behaviour, with configs/chat_templates/qwen3_vl.jinja): the export writes that template as the
    folder's own, and its processor lays the conversation out as the pipeline did."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from casa_megatron.config.schema import ModelConfig
    from casa_megatron.data.config import DataConfig
    from casa_megatron.hf.folder import _write_tokenizer
    from casa_megatron.hf.layout_map import export_fields

    shipped = Path(__file__).resolve().parents[2] / "configs/chat_templates/qwen3_vl.jinja"
    data = DataConfig(tokenizer_path=tokenizers["qwen3_text"], chat_template=str(shipped))
    fields = export_fields(ModelConfig(), data)
    assert fields.processor["chat_template"] == shipped.read_text()
    out = tmp_path / "export"
    out.mkdir()
    _write_tokenizer(out, Path(tokenizers["qwen3_text"]), dict(fields.processor))
    assert (out / "chat_template.jinja").read_text() == shipped.read_text()
    assert AutoTokenizer.from_pretrained(str(out)).chat_template == shipped.read_text()
    proc = CasaProcessor(AutoTokenizer.from_pretrained(str(out)), encoder="tiny_vit", temporal_patch_size=1,
                         merge_consecutive=True, max_pixels=200_000, video_max_pixels=200_000)
    layout = ChatTemplateLayout(tokenizers["qwen3_text"], chat_template=shipped.read_text())
    with_payload, plain, media = CASES[case]()
    sample = layout.build(case, parse_conversation({"messages": plain}, case), media)
    out_ids = proc.apply_chat_template(with_payload, tokenize=True, return_dict=True)
    _compare(out_ids, _pipeline_batch(sample, "tiny_vit", layout.pad_id),
             {proc.image_token_id, proc.video_token_id}, in_stream=False)


@pytest.mark.parametrize("case", ["one_image", "two_images", "video"])
def test_layout_token_fallback_equals_the_pipeline(tokenizers, case):
    from casa_megatron.data.interleave import LayoutTokens

    proc = _processor(tokenizers["layout_tokens"], "tiny_vit", insertion=False)
    layout = LayoutTokens(tokenizers["layout_tokens"])
    assert proc.layout == "layout_tokens"
    with_payload, plain, media = CASES[case]()
    conv = parse_conversation({"messages": plain}, case)
    ids = {proc.image_token_id}
    out = proc.apply_chat_template(with_payload, tokenize=True, return_dict=True)
    _compare(out, _pipeline_batch(layout.build(case, conv, media), "tiny_vit", layout.pad_id), ids, in_stream=True)
    prompt = proc.apply_chat_template(with_payload[:-1], add_generation_prompt=True, tokenize=True, return_dict=True)
    batch = _pipeline_batch(layout.prompt(case, conv.messages[:-1], media), "tiny_vit", layout.pad_id)
    _compare(prompt, batch, ids, in_stream=True)
    assert prompt["input_ids"][0, -1] == proc._id("<answer>")


def test_stop_tokens_and_the_live_captioner_protocol(tokenizers):
    """Generation stops at the template's end of turn; the live captioner's pieces (stream prompt,
    then per frame its markup) are the pipeline's caption layout: one assistant turn in which each
    frame opens a window right where the template put its placeholder."""
    from transformers import AutoTokenizer

    expected_stop = {"qwen": "<|im_end|>", "helium": "</s>", "layout_tokens": "<eot>"}
    frames = _frames(3, 28, 28, 5)
    conv = parse_conversation({"captions": [{"t": 0.0, "text": "the red circle"}, {"t": 1.0, "text": "moves right"}],
                               "prompt": "Describe the video."}, "c")
    for style, path in ((name, tokenizers[name]) for name in expected_stop):  # (qwen3_text needs a template)
        tok = AutoTokenizer.from_pretrained(path)
        proc = _processor(path, "tiny_vit", insertion=False)
        assert tok.convert_ids_to_tokens(proc.stop_token_ids[0]) == expected_stop[style]
        if style == "layout_tokens":
            continue  # captions in our layout: <bos> [f0] <image> caption <eot> ... (tests/inference)
        layout = ChatTemplateLayout(path, fps=2.0)
        sample = layout.build("c", conv, [DecodedMedia("video", frames, [0.0, 0.5, 1.0])])
        prefix = proc.stream_prompt_ids("Describe the video.")
        assert sample.input_ids[:len(prefix)] == prefix == layout.stream_prefix("Describe the video.")
        frame = proc.frame_ids()
        k = frame.index(proc.image_token_id)
        before, after = frame[:k], frame[k + 1:]
        for n, im in enumerate(sample.images):
            p = im.position
            assert sample.input_ids[p - len(before):p] == before and sample.input_ids[p:p + len(after)] == after
            if n:  # the previous frame's text ended with the end-of-turn token
                assert sample.input_ids[p - len(before) - 1] == proc.stop_token_ids[0]
            else:
                assert p - len(before) == len(prefix)


def test_bad_input_names_the_problem(tokenizers):
    proc = _processor(tokenizers["qwen"], "tiny_vit", insertion=False)
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}])
    with pytest.raises(ValueError, match="more '<\\|image_pad\\|>' placeholders than images"):
        proc(text=text)
    with pytest.raises(ValueError, match="beyond the text's placeholders"):
        proc(text=text, images=_frames(2, 28, 28, 0))
    with pytest.raises(ValueError, match="text_layout"):
        _processor(tokenizers["qwen"], "tiny_vit", False).__class__(proc.tokenizer, text_layout="chat")


@pytest.mark.parametrize("native_fps", [10, 5, 1])
@pytest.mark.parametrize("style, encoder", [("qwen", "qwen2_5_vl"), ("layout_tokens", "tiny_vit")])
def test_a_video_given_as_a_file_is_sampled_like_the_training_pipeline(tokenizers, tmp_path, style, encoder,
                                                                       native_fps):
    """``{"type": "video", "path": ...}`` (and ``videos=[path]``), as a Qwen2.5-VL user writes it: the
    processor decodes the file with PyAV (no torchvision) and keeps the frames the training pipeline
    keeps (``sample_frame_indices`` at 2 fps; a 1 fps clip gives each frame once), so the inputs
    equal those of the same frames passed decoded."""
    import av
    import numpy as np

    from casa_megatron.data.video.encode import encode_video
    from casa_megatron.data.video.sampling import sample_frame_indices

    rng = np.random.default_rng(native_fps)
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(encode_video([rng.integers(0, 256, (56, 84, 3), dtype=np.uint8) for _ in range(12)],
                                  fps=native_fps))
    with av.open(str(clip)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]
    keep, _ = sample_frame_indices(len(decoded), native_fps, 2.0, max_frames=10 ** 6)
    assert len(keep) == {10: 3, 5: 5, 1: 12}[native_fps]

    proc = _processor(tokenizers[style], encoder, insertion=False)
    question = {"type": "text", "text": "describe the video"}
    by_path = proc.apply_chat_template([{"role": "user", "content": [{"type": "video", "path": str(clip)}, question]}],
                                       add_generation_prompt=True, tokenize=True, return_dict=True)
    frames = [decoded[i] for i in keep]
    by_frames = proc.apply_chat_template([{"role": "user", "content": [{"type": "video", "video": frames}, question]}],
                                         add_generation_prompt=True, tokenize=True, return_dict=True)
    assert set(by_path) == set(by_frames) and "pixel_values" in by_path
    for key in by_frames:
        assert torch.equal(torch.as_tensor(by_path[key]), torch.as_tensor(by_frames[key])), key
    if style == "qwen":  # the text route: render, then ``videos=[path]``
        text = proc.apply_chat_template([{"role": "user", "content": [{"type": "video"}, question]}],
                                        add_generation_prompt=True)
        direct = proc(text=text, videos=[str(clip)])
        assert torch.equal(direct["pixel_values"], by_frames["pixel_values"])

    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video" * 100)
    with pytest.raises(ValueError, match=f"cannot decode video {broken}"):
        proc.apply_chat_template([{"role": "user", "content": [{"type": "video", "path": str(broken)}, question]}],
                                 tokenize=True)
