"""tools/make_synthetic_data.py: files, question types, and answers that match the pixels."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from PIL import Image

from casa_megatron.data.synthetic_media import BACKGROUND, COLOURS, REGIONS, render_clip
from casa_megatron.data.video.cpu import PyAVDecoder


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("make_synthetic_data", "tools/make_synthetic_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path_factory.mktemp("gen")
    assert tool.main(["--out", str(out), "--num-images", "12", "--num-videos", "2", "--seed", "3",
                      "--samples-per-shard", "5", "--num-multi", "6", "--valid-fraction", "0.25"]) == 0
    return out


def test_layout_and_types(generated):
    raw = generated / "raw"
    assert len(list(raw.glob("img_*.png"))) == 12 and len(list(raw.glob("vid_*.mp4"))) == 2
    assert len(list((generated / "shards").glob("*.tar"))) == 3
    assert len((generated / "manifest.jsonl").read_text().splitlines()) == 14
    assert (generated / "tokenizer" / "tokenizer.json").exists()
    metas = [json.loads(p.read_text()) for p in sorted(raw.glob("img_*.json"))]
    assert {m["type"] for m in metas} == {"coarse", "fine"}
    assert {m["task"] for m in metas} == {"shape", "colour", "count", "number", "word", "chart"}
    assert all(turn["type"] == m["type"] for m in metas for turn in m["conversation"])


def test_colour_answers_match_the_pixels(generated):
    checked = 0
    for meta_path in sorted((generated / "raw").glob("img_*.json")):
        meta = json.loads(meta_path.read_text())
        for turn in meta["conversation"]:
            if turn["task"] != "colour":
                continue
            pixels = np.asarray(Image.open(meta_path.with_suffix(".png"))).reshape(-1, 3).astype(int)
            shape = pixels[np.abs(pixels - np.array(BACKGROUND)).max(1) > 40]  # not the noisy grey
            assert np.abs(np.median(shape, 0) - np.array(COLOURS[turn["answer"]])).max() < 5
            checked += 1
    assert checked >= 2


def test_clip_captions_match_where_the_shape_is():
    frames, captions = render_clip(np.random.default_rng(7), fps=10, seconds=3.0)
    for cap in captions:
        frame = frames[int(round(cap["t"] * 10))].astype(int)
        ys, xs = np.nonzero(np.abs(frame - np.array(BACKGROUND)).max(2) > 40)
        words = cap["text"].split()
        region, direction = words[-1], words[3]
        coords, axis, extent = (xs, "x", frame.shape[1]) if direction in ("left", "right") else \
            (ys, "y", frame.shape[0])
        centre = (coords.min() + coords.max() + 1) / 2  # bounding-box centre of the drawn shape
        assert REGIONS[axis].index(region) == min(2, int(3 * centre / extent)), cap


def test_generated_clip_decodes(generated):
    clip = PyAVDecoder().decode((generated / "raw" / "vid_000000.mp4").read_bytes(), 2.0, 32, 224 * 224, 56 * 56)
    assert clip.indices == [0, 5, 10, 15, 20, 25] and clip.info.codec == "h264"


def test_if_stale_keeps_an_up_to_date_dataset_and_rebuilds_a_stale_one(tmp_path):
    spec = importlib.util.spec_from_file_location("make_synthetic_data", "tools/make_synthetic_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "data"
    args = ["--out", str(out), "--num-images", "6", "--num-videos", "0", "--num-multi", "2", "--if-stale"]
    assert tool.main(args) == 0
    first = (out / "raw" / "img_000000.png").read_bytes()
    marker = out / "raw" / "user_note.txt"  # would vanish on a rebuild
    marker.write_text("x")
    assert tool.main(args) == 0 and marker.exists()  # same version and arguments: untouched
    stamp = json.loads((out / tool.STAMP).read_text())
    stamp["generator_version"] -= 1  # as if made by an older generator
    (out / tool.STAMP).write_text(json.dumps(stamp))
    assert tool.main(args) == 0
    assert not marker.exists() and (out / "raw" / "img_000000.png").read_bytes() == first  # same seed
    assert tool.main(args[:-1] + ["--seed", "5", "--if-stale"]) == 0  # other arguments: rebuilt
    assert (out / "raw" / "img_000000.png").read_bytes() != first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left over


def test_two_image_samples_and_validation_split(generated):
    from casa_megatron.data.synthetic_media import MULTI_QUESTIONS

    records = [json.loads(line) for line in (generated / "llava_multi.jsonl").read_text().splitlines()]
    assert len(records) == 6 and len(list((generated / "raw_multi").glob("*.png"))) == 12
    assert {r["task"] for r in records} == set(MULTI_QUESTIONS)
    for r in records:  # LLaVA: one <image> per listed image, files next to the raw JSON
        assert r["conversations"][0]["value"].count("<image>") == len(r["image"]) == 2
        assert all((generated / "raw_multi" / name).exists() for name in r["image"])
        if r["task"] == "same_colour":  # the answer matches the pixels
            colours = []
            for name in r["image"]:
                px = np.asarray(Image.open(generated / "raw_multi" / name)).reshape(-1, 3).astype(int)
                colours.append(np.median(px[np.abs(px - np.array(BACKGROUND)).max(1) > 40], 0))
            same = np.abs(colours[0] - colours[1]).max() < 5
            assert r["conversations"][1]["value"] == ("yes" if same else "no")
    assert list((generated / "multi").glob("*.tar")) and list((generated / "valid").glob("*.tar"))
    valid_keys = {p.name.split(".")[0] for p in (generated / "valid_raw").glob("*.json")}
    assert len(valid_keys) == 3 + 1 + 2  # a quarter of each kind (at least one)


def test_generated_tokenizer_has_a_chat_template(generated):
    from casa_megatron.data.chat_template import ChatTemplateLayout

    layout = ChatTemplateLayout(str(generated / "tokenizer"))
    assert (layout.image_placeholder, layout.video_placeholder) == ("<|image_pad|>", "<|video_pad|>")
