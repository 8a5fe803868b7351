"""Every annotation format gives the same packed batch as the equivalent sample in our format.

One sample is written in each storage x format (tar shard with our JSON / LLaVA / chat messages,
LLaVA .json list, LLaVA .jsonl, chat-messages .jsonl, manifest) and read through the loader;
the batches must be equal field by field, with the tokenizer's chat template (Qwen2.5-style)
and with our layout tokens (the generated word-level tokenizer).
"""

from __future__ import annotations

import json

import pytest
import torch
from data.helpers import colour_clip, solid_png, write_shard_dir

from casa_megatron.data.config import DataConfig
from casa_megatron.data.formats import detect_format, parse_conversation
from casa_megatron.data.loader import make_train_iterator
from casa_megatron.data.records import SampleError, ShardError
from casa_megatron.data.tokenization import load_tokenizer
from casa_megatron.data.video.encode import encode_video

Q1, A1, Q2, A2 = "what colour is the shape ?", "red", "how many shapes are there ?", "one"
MULTI_Q, MULTI_A = "which picture has more shapes ?", "the first"
FIELDS = ("input_ids", "labels", "loss_mask", "position_ids", "sample_starts", "window_starts", "pixel_patches",
          "image_grid_hw", "image_rows", "image_positions")


def _llava(images, turns, path=True):
    """LLaVA record; ``turns`` = [(human, gpt), ...]; images named in ``image`` unless ``path`` is off."""
    conv = [x for h, g in turns for x in ({"from": "human", "value": h}, {"from": "gpt", "value": g})]
    rec = {"conversations": conv}
    if path:
        rec["image"] = images[0] if len(images) == 1 else images
    return rec


def _messages(images, turns, path=True):
    """Chat-messages record: the images before the first question's text."""
    msgs = []
    for i, (h, g) in enumerate(turns):
        parts = [{"type": "image", **({"path": im} if path else {})} for im in (images if i == 0 else [])]
        msgs += [{"role": "user", "content": parts + [{"type": "text", "text": h}]},
                 {"role": "assistant", "content": [{"type": "text", "text": g}]}]
    return {"messages": msgs}


def _write_all(root, images, media_bytes, turns, ours=None):
    """The same sample in every storage x format; returns {name: source path}."""
    for name, data in zip(images, media_bytes):
        (root / name).write_bytes(data)
    ext = images[0].rsplit(".", 1)[-1]
    parts = {ext: media_bytes[0]} if len(images) == 1 else {f"{j}.{ext}": b for j, b in enumerate(media_bytes)}
    llava_turns = [("<image>\n" * len(images) + turns[0][0], turns[0][1])] + turns[1:]
    sources = {}
    for name, record in (("tar_llava", _llava(images, llava_turns, path=False)),
                         ("tar_llava_named", _llava(images, llava_turns)),
                         ("tar_messages", _messages(images, turns, path=False)),
                         *([("tar_ours", ours)] if ours else [])):
        write_shard_dir(root / name, {"s0": {**parts, "json": json.dumps(record).encode()}})
        sources[name] = root / name
    (root / "llava.json").write_text(json.dumps([{"id": "s0", **_llava(images, llava_turns)}]))
    (root / "llava.jsonl").write_text(json.dumps({"id": "s0", **_llava(images, llava_turns)}) + "\n")
    (root / "messages.jsonl").write_text(json.dumps({"id": "s0", **_messages(images, turns)}) + "\n")
    (root / "s0.json").write_text(json.dumps(_llava(images, llava_turns, path=False)))
    (root / "manifest.jsonl").write_text(json.dumps({"key": "s0", "media": images if len(images) > 1 else images[0],
                                                     "annotation": "s0.json"}) + "\n")
    for name in ("llava.json", "llava.jsonl", "messages.jsonl", "manifest.jsonl"):
        sources[name] = root / name
    return sources


def _batch(source, tokenizer, layout):
    cfg = DataConfig(source=str(source), tokenizer_path=str(tokenizer), seq_length=96, image_seq_length=256,
                     num_workers=0, pack_buffer=1, shuffle=False, log_interval=0, text_layout=layout,
                     qa_windows="per_sample")
    it = make_train_iterator(cfg, 1, 0, 1, seed=0)
    batch = next(it)
    assert it.skip_counts() == {}, it.skip_counts()
    it.close()
    return batch


def _assert_same(batches):
    (ref_name, ref), *others = batches.items()
    for name, batch in others:
        for f in FIELDS:
            assert torch.equal(getattr(batch, f), getattr(ref, f)), f"{name} vs {ref_name}: {f}"


@pytest.fixture(params=["chat_template", "layout_tokens"])
def tokenizer_and_layout(request, qwen_tokenizer, tokenizer_dir):
    return (qwen_tokenizer if request.param == "chat_template" else tokenizer_dir), request.param


def test_single_image_conversation_in_every_format(tmp_path, tokenizer_and_layout):
    tokenizer, layout = tokenizer_and_layout
    ours = {"conversation": [{"question": Q1, "answer": A1}, {"question": Q2, "answer": A2}]}
    sources = _write_all(tmp_path, ["a.png"], [solid_png(60, 90)], [(Q1, A1), (Q2, A2)], ours)
    batches = {name: _batch(path, tokenizer, layout) for name, path in sources.items()}
    _assert_same(batches)
    batch = batches["tar_ours"]
    assert batch.image_positions.numel() == 1
    trained = load_tokenizer(tokenizer).decode(batch.labels[batch.loss_mask > 0].tolist())
    assert trained == {"chat_template": "red<|im_end|>one<|im_end|>", "layout_tokens": "red <eot> one <eot>"}[layout]


def test_two_image_conversation_in_every_format(tmp_path, tokenizer_and_layout):
    tokenizer, layout = tokenizer_and_layout
    pngs = [solid_png(60, 90, (200, 0, 0)), solid_png(90, 60, (0, 0, 200))]
    sources = _write_all(tmp_path, ["a.png", "b.png"], pngs, [(MULTI_Q, MULTI_A)])
    batches = {name: _batch(path, tokenizer, layout) for name, path in sources.items()}
    _assert_same(batches)
    batch = batches["tar_llava"]
    # consecutive images: one window, both inserted where it opens
    assert batch.image_positions.tolist()[0] == batch.image_positions.tolist()[1]
    assert int(batch.window_starts[0].sum()) == 3  # sample start, the images' window, trailing padding
    assert not torch.equal(batch.pixel_patches[:4], batch.pixel_patches[-4:])  # both images, in order


def test_video_qa_and_captions_in_our_format_and_llava(tmp_path, tokenizer_and_layout):
    tokenizer, layout = tokenizer_and_layout
    mp4 = encode_video(colour_clip(20, 64, 96), fps=10, codec="h264")
    (tmp_path / "v.mp4").write_bytes(mp4)
    ours = {"conversation": [{"question": Q1, "answer": A1}]}
    write_shard_dir(tmp_path / "tar_ours", {"v": {"mp4": mp4, "json": json.dumps(ours).encode()}})
    (tmp_path / "video.jsonl").write_text(json.dumps({"id": "v", "video": "v.mp4", "conversations": [
        {"from": "human", "value": "<image>\n" + Q1}, {"from": "gpt", "value": A1}]}) + "\n")
    (tmp_path / "messages.jsonl").write_text(json.dumps({"id": "v", "messages": [
        {"role": "user", "content": [{"type": "video", "path": "v.mp4"}, {"type": "text", "text": Q1}]},
        {"role": "assistant", "content": A1}]}) + "\n")
    _assert_same({p: _batch(tmp_path / p, tokenizer, layout) for p in ("tar_ours", "video.jsonl", "messages.jsonl")})
    captions = {"captions": [{"t": 0.0, "text": "the red circle"}, {"t": 1.0, "text": "moves right"}]}
    write_shard_dir(tmp_path / "tar_captions", {"v": {"mp4": mp4, "json": json.dumps(captions).encode()}})
    (tmp_path / "captions.jsonl").write_text(json.dumps({"id": "v", "video": "v.mp4", **captions}) + "\n")
    batches = {p: _batch(tmp_path / p, tokenizer, layout) for p in ("tar_captions", "captions.jsonl")}
    _assert_same(batches)
    assert batches["tar_captions"].image_positions.unique().numel() == 4  # 2 s at 2 fps: a window per frame


def test_llava_json_resolves_media_root(tmp_path, qwen_tokenizer):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(solid_png())
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "data.json").write_text(json.dumps([_llava(["a.png"], [("<image>\n" + Q1, A1)])]))
    cfg = DataConfig(sources=[{"path": str(tmp_path / "ann" / "data.json"), "media_root": str(tmp_path / "images")}],
                     tokenizer_path=str(qwen_tokenizer), seq_length=96, image_seq_length=256, num_workers=0,
                     pack_buffer=1, log_interval=0)
    it = make_train_iterator(cfg, 1, 0, 1, seed=0)
    next(it)
    assert it.last_batch_samples[0].key == "data.json:1" and it.skip_counts() == {}


def test_detection_and_unknown_format_errors(tmp_path, qwen_tokenizer):
    assert detect_format({"messages": []}) == "messages" and detect_format({"conversations": []}) == "llava"
    assert detect_format({"captions": []}) == "ours" and detect_format({"description": "x"}) is None
    with pytest.raises(SampleError) as info:
        parse_conversation({"description": "x"}, "k")
    assert info.value.reason == "unknown_format"
    (tmp_path / "odd.jsonl").write_text(json.dumps({"image": "a.png", "description": "x"}) + "\n")
    write_shard_dir(tmp_path / "odd_tar", {"s0": {"png": solid_png(), "json": b'{"description": "x"}'}})
    for path, name in ((tmp_path / "odd.jsonl", "odd.jsonl"), (tmp_path / "odd_tar", "shard-000000.tar")):
        cfg = DataConfig(source=str(path), tokenizer_path=str(qwen_tokenizer), log_interval=0)
        with pytest.raises(ShardError, match=f"{name}.*unknown annotation format"):
            make_train_iterator(cfg, 1, 0, 1, seed=0)


def _livecc_line(video, words, start=None, end=None, query="commentate the video"):
    part = {"type": "video", "video": video}
    if start is not None:
        part["video_start"] = start
    if end is not None:
        part["video_end"] = end
    return [{"role": "user", "content": [part, {"type": "text", "text": query}]},
            {"role": "assistant", "content": [{"type": "text_stream", "text_stream": words}]}]


def test_livecc_text_stream_equals_our_captions_at_the_frame_that_heard_them(tmp_path, tokenizer_and_layout):
    """A LiveCC JSONL line (a bare message list; the assistant's ASR words as [start, end, word];
    the file's last line LiveCC's seek index) gives the batch of our caption format with each word
    at the first sampled frame at or after the word's end (2 fps: frames at 0, 0.5, 1.0, 1.5 s)."""
    tokenizer, layout = tokenizer_and_layout
    mp4 = encode_video(colour_clip(20, 64, 96), fps=10, codec="h264")
    (tmp_path / "v.mp4").write_bytes(mp4)
    words = [[0.1, 0.4, " the"], [0.45, 0.5, "red"], [0.6, 0.9, "circle"], [1.2, 1.5, "moves"], [1.6, 1.9, "right"]]
    line = json.dumps(_livecc_line("v.mp4", words))
    (tmp_path / "livecc.jsonl").write_text(line + "\n" + json.dumps([0]) + "\n")
    ours = {"video": "v.mp4", "prompt": "commentate the video", "captions": [
        {"t": 0.5, "text": "the"}, {"t": 0.5, "text": "red"}, {"t": 1.0, "text": "circle"},
        {"t": 1.5, "text": "moves"}]}  # "right" ends at 1.9 s: after the last frame (1.5 s), not heard in the clip
    (tmp_path / "ours.jsonl").write_text(json.dumps(ours) + "\n")
    batches = {p: _batch(tmp_path / p, tokenizer, layout) for p in ("ours.jsonl", "livecc.jsonl")}
    _assert_same(batches)
    trained = load_tokenizer(tokenizer).decode(batches["livecc.jsonl"].labels[batches["livecc.jsonl"].loss_mask > 0].tolist())
    assert "the red" in trained and "circle" in trained and "moves" in trained and "right" not in trained


def test_livecc_clip_bounds_sample_the_clip_on_the_video_time_grid(tmp_path, qwen_tokenizer):
    """video_start / video_end: only frames of [start, end) are decoded (at video times 0.5, 1.0,
    1.5 s for [0.5, 2.0)), each a window; words heard before the clip's first frame open it."""
    mp4 = encode_video(colour_clip(30, 64, 96), fps=10, codec="h264")
    (tmp_path / "v.mp4").write_bytes(mp4)
    words = [[0.2, 0.3, "early"], [0.8, 1.0, "red"], [1.1, 1.4, "circle"]]
    (tmp_path / "clip.jsonl").write_text(json.dumps(_livecc_line("v.mp4", words, start=0.5, end=2.0)) + "\n")
    (tmp_path / "whole.jsonl").write_text(json.dumps(_livecc_line("v.mp4", words)) + "\n")
    clip, whole = (_batch(tmp_path / p, qwen_tokenizer, "chat_template") for p in ("clip.jsonl", "whole.jsonl"))
    assert clip.image_positions.unique().numel() == 3 and whole.image_positions.unique().numel() == 6
    # the clip's frames are the whole video's frames 1..3 (video times 0.5, 1.0, 1.5), pixel for pixel
    per_frame = clip.pixel_patches.shape[0] // 3
    torch.testing.assert_close(clip.pixel_patches, whole.pixel_patches[per_frame:4 * per_frame])


@pytest.mark.parametrize("line, reason", [
    (_livecc_line("v.mp4", [[0.5, 0.2, "x"]]), "bad_annotation"),  # end before start
    (_livecc_line("v.mp4", []), "empty_turn"),
    (_livecc_line("v.mp4", [[0.1, 0.2, "x"]], start=2.0, end=1.0), "bad_annotation"),
    (_livecc_line("v.mp4", [[0.1, 0.2, "x"]], start="soon"), "bad_annotation"),
])
def test_livecc_bad_lines_are_named(line, reason):
    assert detect_format(line) == "messages"
    with pytest.raises(SampleError) as err:
        parse_conversation(line, "k")
    assert err.value.reason == reason and "k:" in str(err.value)


def test_image_text_pairs_train_as_the_llava_caption_sample(tmp_path, tokenizer_and_layout):
    """img2dataset's shards (LAION / CC3M: .jpg + .txt + a .json of crawl metadata, with or
    without the caption in it; or .jpg + .txt alone) and {"image", "caption"} lines give the
    batch of the LLaVA sample whose human turn is the image and whose answer is the caption."""
    tokenizer, layout = tokenizer_and_layout
    png = solid_png(60, 90)
    caption = "the red circle moves right"  # words the generated word-level tokenizer knows
    crawl = {"url": "http://x/a.jpg", "key": "000000001", "status": "success", "width": 90, "height": 60}
    (tmp_path / "a.png").write_bytes(png)
    samples = {
        "img2dataset": {"png": png, "txt": caption.encode(), "json": json.dumps({**crawl, "caption": caption}).encode()},
        "txt_and_metadata": {"png": png, "txt": caption.encode(), "json": json.dumps(crawl).encode()},
        "txt_alone": {"png": png, "txt": caption.encode()},
    }
    sources = {name: write_shard_dir(tmp_path / name, {"000000001": parts}) for name, parts in samples.items()}
    sources["llava_tar"] = write_shard_dir(tmp_path / "llava_tar", {"000000001": {"png": png, "json": json.dumps(
        {"conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption}]}).encode()}})
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"id": "p", "image": "a.png", "caption": [caption, "other"]}) + "\n")
    sources["jsonl"] = tmp_path / "pairs.jsonl"
    batches = {name: _batch(path, tokenizer, layout) for name, path in sources.items()}
    _assert_same(batches)
    batch = batches["txt_alone"]
    trained = load_tokenizer(tokenizer).decode(batch.labels[batch.loss_mask > 0].tolist())
    assert trained.replace(" ", "").startswith(caption.replace(" ", ""))  # the caption is what is learnt
    assert detect_format({"caption": "x"}) == "caption"
    with pytest.raises(SampleError, match="'caption' must be a non-empty string"):
        parse_conversation({"caption": " "}, "k")
