"""Bad samples are skipped, counted and named; one never stops a run; nothing readable does."""

from __future__ import annotations

import json
import logging

import pytest
from data.helpers import captions_json, colour_clip, png_bytes, qa_json, solid_png, write_shard_dir

from casa_megatron.data.config import DataConfig
from casa_megatron.data.loader import make_train_iterator
from casa_megatron.data.records import SampleError, ShardError
from casa_megatron.data.video.encode import encode_video
from casa_megatron.data.video.sampling import VideoInfo, plan_frames


def _bad_dataset(tmp_path):
    mp4 = encode_video(colour_clip(30, 64, 96), fps=10, codec="h264")
    webm = encode_video(colour_clip(30, 64, 96), fps=10, codec="vp9")
    import numpy as np

    noisy_png = png_bytes(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    good = {f"good_img{i}": {"png": solid_png(colour=(20 * i, 0, 0)), "json": qa_json(answer="red")}
            for i in range(5)}
    good["good_vid"] = {"mp4": mp4, "json": captions_json()}
    bad = {  # key -> (parts, expected skip reason)
        "corrupt_video": ({"mp4": bytes(range(256)) * 8, "json": captions_json()}, "corrupt_video"),
        "truncated_mp4": ({"mp4": mp4[: len(mp4) // 2], "json": captions_json()}, "corrupt_video"),
        "truncated_webm": ({"webm": webm[: len(webm) // 3], "json": captions_json()}, "truncated_video"),
        "empty_clip": ({"mp4": b"", "json": captions_json()}, "empty_file"),
        "unknown_codec": ({"mp4": mp4.replace(b"avc1", b"zzzz"), "json": captions_json()}, "unsupported_codec"),
        "corrupt_image": ({"png": noisy_png[:300], "json": qa_json()}, "corrupt_image"),
        "no_json": ({"png": solid_png()}, "missing_annotation"),
        "no_media": ({"json": qa_json()}, "missing_media"),
        "bad_json": ({"png": solid_png(), "json": b"{not json"}, "bad_annotation"),
        "reserved": ({"png": solid_png(), "json": qa_json(question="what is <image> ?")}, "reserved_token"),
        "too_long": ({"png": solid_png(), "json": qa_json(answer=" ".join(["red"] * 300))}, "too_long"),
    }
    samples = dict(good)
    samples.update({k: parts for k, (parts, _) in bad.items()})
    write_shard_dir(tmp_path / "shards", samples, per_shard=5)
    return good, {k: reason for k, (_, reason) in bad.items()}


def _config(source, tokenizer_dir, **kw) -> DataConfig:
    """In storage order, one sample per pack: an epoch's skips are counted exactly once."""
    base = dict(source=str(source), tokenizer_path=str(tokenizer_dir), seq_length=128, image_seq_length=256,
                num_workers=2, pack_buffer=1, shuffle=False, log_interval=0)
    base.update(kw)
    return DataConfig(**base)


def _run_one_epoch(it, num_samples):
    """Batches until every sample was seen once (the last batch wraps to the next epoch's first
    good sample, which comes first in storage order)."""
    delivered = []
    while it.stats()["samples_seen"] < num_samples:
        next(it)
        delivered += [info.key for info in it.last_batch_samples]
    return delivered


def test_every_bad_case_is_skipped_counted_and_logged(tmp_path, tokenizer_dir, caplog):
    good, bad = _bad_dataset(tmp_path)
    it = make_train_iterator(_config(tmp_path / "shards", tokenizer_dir), 2, 0, 1, seed=0)
    with caplog.at_level(logging.WARNING, logger="casa_megatron.data"):
        delivered = _run_one_epoch(it, len(good) + len(bad))
    stats = it.stats()
    it.close()
    expected = {}
    for reason in bad.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert stats["skipped_by_reason"] == expected
    assert stats["samples_skipped"] == len(bad)
    assert delivered == sorted(good) + ["good_img0"]  # every good sample once, then epoch 2 begins
    for key in bad:  # each skip is logged with the sample's name and its shard
        assert any(f"'{key}'" in r.message and "shard-" in r.message for r in caplog.records), key


def test_manifest_missing_file_and_bad_line(tmp_path, tokenizer_dir):
    (tmp_path / "a.png").write_bytes(solid_png())
    (tmp_path / "a.json").write_bytes(qa_json())
    lines = [{"key": "a", "media": "a.png", "annotation": "a.json"},
             {"key": "gone", "media": "gone.png", "annotation": "a.json"},
             {"key": "inline", "media": "a.png", "annotation": json.loads(qa_json(answer="blue"))}]
    text = "".join(json.dumps(line) + "\n" for line in lines) + "{broken\n"
    (tmp_path / "m.jsonl").write_text(text)
    it = make_train_iterator(_config(tmp_path / "m.jsonl", tokenizer_dir, num_workers=0), 1, 0, 1, seed=0)
    delivered = _run_one_epoch(it, 4)
    assert it.stats()["skipped_by_reason"] == {"missing_file": 1, "bad_manifest_line": 1}
    assert delivered == ["a", "inline", "a"]


def test_empty_clip_plan():
    with pytest.raises(SampleError, match="empty_clip"):
        plan_frames(VideoInfo("h264", 64, 64, 10.0, 0), 2.0, 8, 50176, 3136, key="c0")


def test_dataset_with_nothing_usable_stops_with_a_clear_error(tmp_path, tokenizer_dir):
    write_shard_dir(tmp_path / "shards", {f"x{i}": {"png": b"bad", "json": qa_json()} for i in range(3)})
    it = make_train_iterator(_config(tmp_path / "shards", tokenizer_dir, num_workers=0), 1, 0, 1, seed=0)
    with pytest.raises(ShardError, match="none of its 3 samples"):
        next(it)


def test_unreadable_shard_stops_at_start_naming_it(tmp_path, tokenizer_dir):
    write_shard_dir(tmp_path / "shards", {"ok": {"png": solid_png(), "json": qa_json()}})
    (tmp_path / "shards" / "shard-000001.tar").write_bytes(b"not a tar" * 50)
    with pytest.raises(ShardError, match="shard-000001.tar"):
        make_train_iterator(_config(tmp_path / "shards", tokenizer_dir), 1, 0, 1, seed=0)


def test_conversation_dataset_bad_inputs_are_skipped_and_counted_by_reason(tmp_path, qwen_tokenizer, caplog):
    """Each bad input of a LLaVA / chat-messages JSONL, one per reason, next to good samples."""
    from data.helpers import solid_png

    (tmp_path / "a.png").write_bytes(solid_png())
    (tmp_path / "b.png").write_bytes(solid_png(colour=(0, 0, 200)))
    import numpy as np

    noisy = png_bytes(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    (tmp_path / "broken.png").write_bytes(noisy[:300])

    def llava(i, image, human, gpt="red"):
        return {"id": i, "image": image, "conversations": [{"from": "human", "value": human},
                                                           {"from": "gpt", "value": gpt}]}

    good = [llava("good0", "a.png", "<image>\nwhat colour ?"), llava("good1", ["a.png", "b.png"], "<image><image>same ?"),
            {"id": "good2", "messages": [{"role": "user", "content": [{"type": "image", "path": "b.png"},
                                                                     {"type": "text", "text": "colour ?"}]},
                                         {"role": "assistant", "content": "blue"}]}]
    bad = {
        "fewer_placeholders": (llava("fewer_placeholders", ["a.png", "b.png"], "<image>\nsame ?"), "image_count_mismatch"),
        "more_placeholders": (llava("more_placeholders", "a.png", "<image><image>\nsame ?"), "image_count_mismatch"),
        "gone": (llava("gone", "missing.png", "<image>\nwhat ?"), "missing_media"),
        "unreadable": (llava("unreadable", "broken.png", "<image>\nwhat ?"), "corrupt_image"),
        "long": (llava("long", "a.png", "<image>\nwhat ?", gpt="red " * 400), "too_long"),
        "empty_gpt": (llava("empty_gpt", "a.png", "<image>\nwhat ?", gpt="  "), "empty_turn"),
        "empty_msg": ({"id": "empty_msg", "messages": [{"role": "user", "content": "hi"},
                                                       {"role": "assistant", "content": ""}]}, "empty_turn"),
        "no_answer": ({"id": "no_answer", "messages": [{"role": "user", "content": "hi"}]}, "no_targets"),
        "odd_format": ({"id": "odd_format", "image": "a.png", "description": "a red square"}, "unknown_format"),
    }
    lines = good[:1] + [rec for rec, _ in bad.values()] + good[1:]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    cfg = DataConfig(source=str(tmp_path / "data.jsonl"), tokenizer_path=str(qwen_tokenizer), seq_length=128,
                     image_seq_length=256, num_workers=2, pack_buffer=1, shuffle=False, log_interval=0)
    it = make_train_iterator(cfg, 1, 0, 1, seed=0)
    with caplog.at_level(logging.WARNING, logger="casa_megatron.data"):
        delivered = _run_one_epoch(it, len(lines))
    expected = {}
    for _, reason in bad.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert it.skip_counts() == expected == it.stats()["skipped_by_reason"]
    assert delivered[:3] == ["good0", "good1", "good2"]
    for key, (_, reason) in bad.items():  # logged with the sample's key, its file and the reason
        assert any(f"'{key}'" in r.message and "data.jsonl" in r.message and f"({reason})" in r.message
                   for r in caplog.records), key
    assert it.stats()["skipped_keys"]["empty_turn"] == ["empty_gpt", "empty_msg"]
    it.close()


def test_too_long_conversation_is_cut_at_a_turn_boundary(tmp_path, qwen_tokenizer):
    from data.helpers import solid_png

    (tmp_path / "a.png").write_bytes(solid_png())
    turns = [x for k in range(8) for x in ({"from": "human", "value": ("<image>\n" if k == 0 else "") + "what colour ?"},
                                           {"from": "gpt", "value": "red"})]
    (tmp_path / "d.jsonl").write_text(json.dumps({"id": "chat", "image": "a.png", "conversations": turns}) + "\n")
    cfg = DataConfig(source=str(tmp_path / "d.jsonl"), tokenizer_path=str(qwen_tokenizer), seq_length=64,
                     image_seq_length=64, num_workers=0, pack_buffer=1, log_interval=0)
    it = make_train_iterator(cfg, 1, 0, 1, seed=0)
    batch = next(it)
    from casa_megatron.data.tokenization import load_tokenizer

    tok = load_tokenizer(qwen_tokenizer)
    n = it.last_batch_samples[0].length
    assert n <= 64 and it.skip_counts() == {}
    assert tok.convert_ids_to_tokens(batch.input_ids[0, n - 2:n].tolist()) == ["<|im_end|>", "Ċ"]  # a whole turn
    it.close()


def test_a_bad_sample_is_named_once_but_counted_every_epoch(tmp_path, tokenizer_dir, caplog):
    samples = {f"ok{i}": {"png": solid_png(), "json": qa_json()} for i in range(2)}
    samples["broken"] = {"png": b"not a png", "json": qa_json()}
    write_shard_dir(tmp_path / "shards", samples)
    it = make_train_iterator(_config(tmp_path / "shards", tokenizer_dir, num_workers=0), 1, 0, 1, seed=0)
    with caplog.at_level(logging.WARNING, logger="casa_megatron.data"):
        while it.stats()["samples_seen"] < 9:  # three epochs
            next(it)
    assert it.skip_counts() == {"corrupt_image": 3}
    assert sum("'broken'" in r.message for r in caplog.records) == 1
    it.close()
