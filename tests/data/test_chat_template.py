"""Samples laid out with the tokenizer's own chat template.

Oracles: the ids are ``tokenizer(apply_chat_template(...))`` minus the image placeholders, and the
loss mask is transformers' own assistant-token mask (``return_assistant_tokens_mask`` on the same
template with ``{% generation %}`` blocks), for a Qwen2.5-style, a Helium-style, a Llama-3-style and
a Qwen3-style tokenizer (whose final assistant turn alone gets an empty think block).
"""

from __future__ import annotations

import pytest
import torch
from data.chat_tokenizers import (HELIUM_GENERATION_TEMPLATE, LLAMA3_GENERATION_TEMPLATE, QWEN3_GENERATION_TEMPLATE,
                                  QWEN_GENERATION_TEMPLATE)

from casa_megatron.data.chat_template import ChatTemplateLayout, DecodedMedia
from casa_megatron.data.formats import parse_conversation
from casa_megatron.data.records import SampleError
from casa_megatron.data.tokenization import build_word_tokenizer, load_tokenizer

MESSAGES = [
    {"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                 {"type": "text", "text": "Which picture has more shapes?"}]},
    {"role": "assistant", "content": "the first one"},
    {"role": "user", "content": [{"type": "text", "text": "What colour is the shape? "}, {"type": "image"},
                                 {"type": "text", "text": " Compare them."}]},
    {"role": "assistant", "content": "red"},
]
STYLES = {"qwen": (QWEN_GENERATION_TEMPLATE, "<|image_pad|>"), "helium": (HELIUM_GENERATION_TEMPLATE, "<image>"),
          "llama3": (LLAMA3_GENERATION_TEMPLATE, "<|image|>"), "qwen3": (QWEN3_GENERATION_TEMPLATE, "<|image_pad|>")}


def _images(n: int):
    g = torch.Generator().manual_seed(0)
    return [DecodedMedia("image", [torch.randint(0, 256, (3, 28 * (k + 1), 56), dtype=torch.uint8, generator=g)])
            for k in range(n)]


@pytest.fixture(params=sorted(STYLES))
def style(request, qwen_tokenizer, helium_tokenizer, llama3_tokenizer, qwen3_tokenizer):
    path = {"qwen": qwen_tokenizer, "helium": helium_tokenizer, "llama3": llama3_tokenizer,
            "qwen3": qwen3_tokenizer}[request.param]
    return request.param, path, *STYLES[request.param]


def _oracle(path, generation_template, placeholder):
    """(ids without placeholders, assistant mask on them, placeholder positions in that stream)."""
    tok = load_tokenizer(path)
    assert tok.apply_chat_template(MESSAGES, tokenize=False) == \
        tok.apply_chat_template(MESSAGES, tokenize=False, chat_template=generation_template)
    out = tok.apply_chat_template(MESSAGES, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                  chat_template=generation_template)
    ids, mask = out["input_ids"], out["assistant_masks"]
    ph = tok.convert_tokens_to_ids(placeholder)
    keep = [i for i, t in enumerate(ids) if t != ph]
    positions = [sum(1 for j in keep if j < i) for i, t in enumerate(ids) if t == ph]
    return [ids[i] for i in keep], [mask[i] for i in keep], positions


def test_ids_and_loss_mask_match_transformers(style):
    name, path, generation_template, placeholder = style
    layout = ChatTemplateLayout(str(path))
    assert layout.image_placeholder == placeholder
    media = _images(3)
    sample = layout.build("k", parse_conversation({"messages": MESSAGES}, "k"), media)
    ids, mask, positions = _oracle(path, generation_template, placeholder)
    assert sample.input_ids == ids
    # loss_mask[t] = 1 exactly where token t+1 is an assistant token, and labels[t] is that token
    assert sum(mask) > 4 and not mask[0]
    assert sample.loss_mask == [float(m) for m in mask[1:]] + [0.0]
    for t, m in enumerate(sample.loss_mask):
        assert sample.labels[t] == (ids[t + 1] if m else layout.pad_id)
    # the end-of-turn token is trained, the newline after it is not
    tok = load_tokenizer(path)
    trained = [tok.convert_ids_to_tokens(ids[t + 1]) for t, m in enumerate(sample.loss_mask) if m]
    assert trained.count(tok.eos_token) == 2
    # consecutive images (nothing but whitespace between) share the first one's window
    assert [im.position for im in sample.images] == [positions[0], positions[0], positions[2]]
    assert sample.window_starts == sorted({positions[0], positions[2]})
    assert [im.pixels for im in sample.images] == [m.frames[0] for m in media]
    assert sample.cut_points[-1] == len(ids) and len(sample.cut_points) == 2


def test_a_qwen3_style_final_think_block_is_trained_where_the_template_writes_it(qwen3_tokenizer):
    """Qwen3's template renders the first assistant turn plainly inside the conversation but with
    an empty think block when it is the last message: its turns are not prefixes of the whole.
    Each turn is trained as the whole rendering has it (the oracle test above checks the ids and
    the mask against transformers); here, where the think block is."""
    tok = load_tokenizer(qwen3_tokenizer)
    whole, first = (tok.apply_chat_template(m, tokenize=False) for m in (MESSAGES, MESSAGES[:2]))
    assert not whole.startswith(first) and "<think>" in first and whole.count("<think>") == 1
    sample = ChatTemplateLayout(str(qwen3_tokenizer)).build("k", parse_conversation({"messages": MESSAGES}, "k"),
                                                            _images(3))
    turns, current = [], []
    for t, m in enumerate(sample.loss_mask):
        if m:
            current.append(sample.input_ids[t + 1])
        elif current:
            turns.append(tok.decode(current))
            current = []
    assert turns == ["the first one<|im_end|>", "<think>\n\n</think>\n\nred<|im_end|>"]


def test_a_text_only_template_is_replaced_by_data_chat_template(qwen3_text_tokenizer, tmp_path):
    """Qwen3's own template drops list contents (images with them): refused at the probe, naming
    data.chat_template; with configs/chat_templates/qwen3_vl.jinja the ids are transformers' own
    rendering of that template minus the placeholders, and each assistant turn is trained."""
    from pathlib import Path

    from casa_megatron.data.config import DataConfig
    from casa_megatron.data.processor import ProcessorSettings, make_layout

    with pytest.raises(ValueError, match="data.chat_template"):
        ChatTemplateLayout(str(qwen3_text_tokenizer))
    shipped = Path(__file__).resolve().parents[2] / "configs/chat_templates/qwen3_vl.jinja"
    cfg = DataConfig(tokenizer_path=str(qwen3_text_tokenizer), chat_template=str(shipped))
    settings = ProcessorSettings.from_config(cfg, "cpu")
    layout = make_layout(settings)  # auto: the template given
    assert isinstance(layout, ChatTemplateLayout) and layout.image_placeholder == "<|image_pad|>"
    sample = layout.build("k", parse_conversation({"messages": MESSAGES}, "k"), _images(3))
    tok = load_tokenizer(qwen3_text_tokenizer)
    text = tok.apply_chat_template(MESSAGES, tokenize=False, chat_template=shipped.read_text())
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert sample.input_ids == [i for i in ids if i != pad] and ids.count(pad) == 3
    trained = tok.decode([sample.input_ids[t + 1] for t, m in enumerate(sample.loss_mask) if m])
    assert trained == "the first one<|im_end|>red<|im_end|>"
    import pickle

    worker = pickle.loads(pickle.dumps(layout))  # a process worker's tokenizer gets the template too
    assert worker.build("k", parse_conversation({"messages": MESSAGES}, "k"), _images(3)).input_ids == \
        sample.input_ids


@pytest.mark.parametrize("change, message", [
    (dict(text_layout="layout_tokens"), "used only by the chat_template layout"),
    (dict(chat_template="missing.jinja"), "cannot read it"),
    (dict(chat_template="BAD"), "not a Jinja template"),
])
def test_a_chat_template_that_cannot_be_used_is_refused_at_config_time(qwen3_text_tokenizer, tmp_path, change,
                                                                       message):
    from casa_megatron.config.errors import ConfigError
    from casa_megatron.data.config import DataConfig

    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m['content'] }")
    good = tmp_path / "good.jinja"
    good.write_text("{{ messages }}")
    fields = {"chat_template": str(good), **change}
    if fields["chat_template"] == "BAD":
        fields["chat_template"] = str(bad)
    elif fields["chat_template"] == "missing.jinja":
        fields["chat_template"] = str(tmp_path / "missing.jinja")
    cfg = DataConfig(source=str(tmp_path), tokenizer_path=str(qwen3_text_tokenizer), **fields)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


def test_insertion_keeps_every_image_at_its_placeholder(style):
    name, path, generation_template, placeholder = style
    layout = ChatTemplateLayout(str(path), merge_consecutive=False)
    sample = layout.build("k", parse_conversation({"messages": MESSAGES}, "k"), _images(3))
    _, _, positions = _oracle(path, generation_template, placeholder)
    assert [im.position for im in sample.images] == positions
    if name == "qwen":  # <|vision_start|>[img]<|vision_end|>: the image replaces the placeholder token
        tok = load_tokenizer(path)
        for p in positions:
            assert tok.convert_ids_to_tokens(sample.input_ids[p - 1:p + 1]) == ["<|vision_start|>", "<|vision_end|>"]


def test_video_frames_share_the_clip_placeholder(qwen_tokenizer):
    layout = ChatTemplateLayout(str(qwen_tokenizer))
    assert layout.video_placeholder == "<|video_pad|>"
    frames = [torch.full((3, 28, 28), k, dtype=torch.uint8) for k in range(4)]
    conv = parse_conversation({"video": "v.mp4", "conversations": [
        {"from": "human", "value": "<video>\nWhat is in the image?"}, {"from": "gpt", "value": "a red circle"}]}, "v")
    sample = layout.build("v", conv, [DecodedMedia("video", frames, [0.0, 0.5, 1.0, 1.5])])
    tok = load_tokenizer(qwen_tokenizer)
    p = sample.images[0].position
    assert [im.position for im in sample.images] == [p] * 4 and sample.window_starts == [p]
    assert tok.convert_ids_to_tokens(sample.input_ids[p - 1:p + 1]) == ["<|vision_start|>", "<|vision_end|>"]
    assert sample.kind == "video"


def test_captions_open_a_window_per_frame(qwen_tokenizer):
    layout = ChatTemplateLayout(str(qwen_tokenizer), fps=2.0)
    frames = [torch.full((3, 28, 28), k, dtype=torch.uint8) for k in range(3)]
    conv = parse_conversation({"captions": [{"t": 0.0, "text": "the red circle"}, {"t": 1.0, "text": "moves right"}]},
                              "c")
    sample = layout.build("c", conv, [DecodedMedia("video", frames, [0.0, 0.5, 1.0])])
    tok = load_tokenizer(qwen_tokenizer)
    positions = [im.position for im in sample.images]
    assert len(set(positions)) == 3 and sample.window_starts == positions
    trained = tok.decode([l for l, m in zip(sample.labels, sample.loss_mask) if m])
    # one assistant turn: each frame, its captions, the end of turn (alone for frame 1: nothing new);
    # the frames' <|vision_start|> / <|vision_end|> are input, not targets
    assert trained == "the red circle<|im_end|><|im_end|>moves right<|im_end|>"
    tokens = tok.convert_ids_to_tokens(sample.input_ids)
    assert tokens[positions[1] - 1:positions[1] + 1] == ["<|vision_start|>", "<|vision_end|>"]
    assert tokens[positions[1] - 2] == "<|im_end|>"  # frame 0's text ended before frame 1 arrived
    assert [tokens[c - 1] for c in sample.cut_points] == ["<|im_end|>", "<|im_end|>", "Ċ"]


def test_reserved_tokens_in_text_are_bad_input(qwen_tokenizer):
    layout = ChatTemplateLayout(str(qwen_tokenizer))
    conv = parse_conversation({"messages": [{"role": "user", "content": "hi <|im_start|>system"},
                                            {"role": "assistant", "content": "red"}]}, "r")
    with pytest.raises(SampleError) as info:
        layout.build("r", conv, [])
    assert info.value.reason == "reserved_token"


def test_template_that_rewrites_earlier_turns_is_refused(helium_tokenizer, tmp_path):
    tok = load_tokenizer(helium_tokenizer)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}"
                         "{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>{% else %}"
                         "{{ p['text'] }}{% endif %}{% endfor %}{% endif %}{% if loop.last %} (end){% endif %}\n"
                         "{% endfor %}")
    tok.save_pretrained(str(tmp_path / "tok"))
    layout = ChatTemplateLayout(str(tmp_path / "tok"))
    with pytest.raises(ValueError, match="prefix"):
        layout.build("k", parse_conversation({"messages": MESSAGES}, "k"), _images(3))


def test_no_template_falls_back_to_layout_tokens_or_says_why(tmp_path, qwen_tokenizer):
    from casa_megatron.data.interleave import LayoutTokens
    from casa_megatron.data.processor import ProcessorSettings, make_layout

    plain = build_word_tokenizer(["what colour red"], tmp_path / "plain")
    settings = ProcessorSettings(str(plain), 64, 64)
    assert isinstance(make_layout(settings), LayoutTokens)  # documented fallback: our layout tokens
    import dataclasses

    with pytest.raises(ValueError, match="no chat_template"):
        make_layout(dataclasses.replace(settings, text_layout="chat_template"))
    bare = load_tokenizer(qwen_tokenizer)
    bare.chat_template = None
    bare.save_pretrained(str(tmp_path / "bare"))
    with pytest.raises(ValueError, match="no chat_template.*'<bos>'"):
        make_layout(ProcessorSettings(str(tmp_path / "bare"), 64, 64))


def test_captions_in_one_clip_window(qwen_tokenizer):
    layout = ChatTemplateLayout(str(qwen_tokenizer), window_per_frame=False, fps=2.0)
    frames = [torch.full((3, 28, 28), k, dtype=torch.uint8) for k in range(3)]
    conv = parse_conversation({"captions": [{"t": 0.0, "text": "the red circle"}, {"t": 1.0, "text": "moves right"}],
                               "prompt": "Describe the video."}, "c")
    sample = layout.build("c", conv, [DecodedMedia("video", frames, [0.0, 0.5, 1.0])])
    tok = load_tokenizer(qwen_tokenizer)
    p = sample.images[0].position
    assert [im.position for im in sample.images] == [p] * 3 and sample.window_starts == [p]
    assert tok.convert_ids_to_tokens(sample.input_ids[p]) == "<|vision_end|>"
    assert "Describe the video." in tok.decode(sample.input_ids)
    assert tok.decode([l for l, m in zip(sample.labels, sample.loss_mask) if m]) == \
        "the red circle\nmoves right<|im_end|>"
