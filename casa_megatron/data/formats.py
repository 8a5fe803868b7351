"""Annotation formats, detected per sample from their keys, parsed into a ``Conversation``.

    ours      {"conversation": [{"question", "answer"}...]} | {"captions": [{"t", "text"}...]}
              (+ optional "image" / "video" path in JSON datasets, "prompt" for captions)
    llava     {"image": "a.jpg" | ["a.jpg", ...], "video"?: "v.mp4",
               "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}]}
    messages  {"messages": [{"role": "user", "content": [{"type": "image", "path": ...},
                                                          {"type": "text", "text": ...}]}, ...],
               "images"?: [...], "videos"?: [...]}   (Hugging Face / TRL chat messages)
              or the list of messages alone (a LiveCC line), where a video part may carry
              "video_start" / "video_end" (seconds: a clip of the file) and the assistant's
              content may be {"type": "text_stream", "text_stream": [[start, end, word], ...]}:
              ASR words of the clip, read as captions heard at each word's end (LiveCC)
    caption   {"image": "a.jpg", "caption": "..." | [...]} or, in a tar, a ``.txt`` part beside the
              media (img2dataset's LAION / CC3M shards; ``sample_annotation``): an image-text pair

Media without a path (``{"type": "image"}``, a LLaVA sample without ``image`` / ``video``
fields, or any reference inside a tar shard) are the sample's media parts in index order. LLaVA-Video's ``<image>`` placeholder for its video is
accepted as well as ``<video>``. The newline LLaVA puts after a placeholder belongs to the
placeholder (``"<image>\\nWhat?"`` is the same sample as ``[image, "What?"]``).
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Dict, List, Optional

from casa_megatron.data.annotations import Caption, parse_annotation
from casa_megatron.data.conversation import ROLES, Conversation, Media, Message, Part
from casa_megatron.data.records import SampleError

FORMATS = ("ours", "llava", "messages", "caption")
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
               "system": "system"}
_PLACEHOLDER = re.compile(r"(<image>|<video>)")


def detect_format(obj: Any) -> Optional[str]:
    """``ours`` / ``llava`` / ``messages`` / ``caption``, or None when no format's key is present."""
    if _is_message_list(obj):
        return "messages"
    if not isinstance(obj, dict):
        return None
    if "messages" in obj:
        return "messages"
    if "conversations" in obj:
        return "llava"
    if "conversation" in obj or "captions" in obj:
        return "ours"
    if "caption" in obj:
        return "caption"
    return None


def _is_message_list(obj: Any) -> bool:
    """A bare list of chat messages (how LiveCC writes a JSONL line)."""
    return isinstance(obj, list) and bool(obj) and all(isinstance(m, dict) and "role" in m for m in obj)


def describe_unknown(obj: Any) -> str:
    keys = sorted(obj)[:12] if isinstance(obj, dict) else type(obj).__name__
    return ("none of 'messages' (Hugging Face chat), 'conversations' (LLaVA), 'caption' (image-text pair), "
            "'conversation' / "
            f"'captions' (ours) is present (found {keys})")


def parse_conversation(obj: Any, key: str = "?", qa_windows: str = "per_turn") -> Conversation:
    """Any supported annotation -> Conversation; ``SampleError`` names what is wrong."""
    fmt = detect_format(obj)
    if fmt is None:
        raise SampleError("unknown_format", f"{key}: {describe_unknown(obj)}")
    if _is_message_list(obj):
        obj = {"messages": obj}
    conv = _PARSERS[fmt](obj, key, qa_windows)
    conv.format = fmt
    _check_targets(conv, key)
    return conv


def sample_annotation(raw) -> Any:
    """A sample's annotation: its ``.json`` part; a ``.txt`` part is the caption of an image-text
    pair (img2dataset's shards: ``.jpg`` + ``.txt`` + a ``.json`` of crawl metadata), which
    the JSON's own fields join (its ``caption``, when it has one, wins)."""
    meta = next((raw.parts[p] for p in raw.parts if p.lower() == "json"), None)
    text = next((raw.parts[p] for p in raw.parts if p.lower() == "txt"), None)
    if meta is None and text is None:
        raise SampleError("missing_annotation", f"{raw.key} in {raw.source}: no .json or .txt part "
                          f"(found {sorted(raw.parts)})")
    try:
        obj = json.loads(meta) if meta is not None else {}
        caption = text.decode("utf-8") if text is not None else None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SampleError("bad_annotation", f"{raw.key}: annotation is not valid JSON / UTF-8 ({e})") from e
    if caption is not None and isinstance(obj, dict) and detect_format(obj) is None:
        obj = {**obj, "caption": caption}
    return obj


# --- ours --------------------------------------------------------------------------------------
def _ours(obj: dict, key: str, qa_windows: str) -> Conversation:
    ann = parse_annotation(obj, key)
    kind = "video" if ("video" in obj or ann.captions) else ("image" if "image" in obj else None)
    source = obj.get("video") or obj.get("image") or obj.get("media")
    if source is not None and not isinstance(source, str):
        raise SampleError("bad_annotation", f"{key}: 'image' / 'video' must be one path")
    media = Media(kind, source)
    if ann.captions:
        prompt = obj.get("prompt")
        content: List[Part] = [media] + ([prompt] if isinstance(prompt, str) and prompt.strip() else [])
        return Conversation([Message("user", content)], ann.captions, ann.qtype, ann.meta)
    messages = []
    for i, turn in enumerate(ann.turns):
        # per_turn: the image opens a window again before every question (a video never repeats)
        repeat = i == 0 or (qa_windows == "per_turn" and kind != "video")
        messages.append(Message("user", ([media] if repeat else []) + [turn.question]))  # one media, shown again
        messages.append(Message("assistant", [turn.answer]))
    return Conversation(messages, [], ann.qtype, ann.meta)


# --- LLaVA -------------------------------------------------------------------------------------
def _as_list(value: Any, name: str, key: str) -> List[str]:
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise SampleError("bad_annotation", f"{key}: '{name}' must be a path or a list of paths")
    return list(values)


def _llava(obj: dict, key: str, _qa_windows: str) -> Conversation:
    images = _as_list(obj.get("image"), "image", key)
    videos = _as_list(obj.get("video"), "video", key)
    positional = "image" not in obj and "video" not in obj  # a tar sample: the media parts are the images
    turns = obj["conversations"]
    if not isinstance(turns, list) or not turns:
        raise SampleError("bad_annotation", f"{key}: 'conversations' must be a non-empty list")
    queue = {"image": list(images), "video": list(videos)}
    found = {"<image>": 0, "<video>": 0}
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) \
                or str(turn.get("from", "")).lower() not in LLAVA_ROLES:
            raise SampleError("bad_annotation", f"{key}: conversations[{i}] needs 'from' (one of "
                              f"{sorted(LLAVA_ROLES)}) and a string 'value'")
        content: List[Part] = []
        pieces = _PLACEHOLDER.split(turn["value"])
        for j, piece in enumerate(pieces):
            if piece in found:
                found[piece] += 1
                content.append(Media("video" if piece == "<video>" else None) if positional
                               else _take_media(piece, queue, images, videos, found, key))
                continue
            if j > 0:  # the newline after a placeholder belongs to it (LLaVA's "<image>\n")
                piece = piece.lstrip("\n")
            if j + 1 < len(pieces):
                piece = piece.rstrip("\n")
            if piece:
                content.append(piece)
        messages.append(Message(LLAVA_ROLES[str(turn["from"]).lower()], content))
    if queue["image"] or queue["video"]:
        raise SampleError("image_count_mismatch", f"{key}: {found['<image>']} <image> / {found['<video>']} "
                          f"<video> placeholders for {len(images)} images / {len(videos)} videos")
    return Conversation(messages, [], obj.get("type"), _meta(obj, ("conversations",)))


def _take_media(placeholder: str, queue: Dict[str, List[str]], images, videos, found, key) -> Media:
    kind = "video" if placeholder == "<video>" else "image"
    if kind == "image" and not images and queue["video"]:
        kind = "video"  # LLaVA-Video marks its clip with <image>
    if not queue[kind]:
        raise SampleError("image_count_mismatch", f"{key}: more placeholders than media: {found['<image>']} "
                          f"<image> / {found['<video>']} <video> for {len(images)} images / {len(videos)} videos")
    return Media(kind, queue[kind].pop(0))


# --- Hugging Face chat messages ----------------------------------------------------------------
_SOURCE_FIELDS = {"image": ("image", "path", "url", "image_url"), "video": ("video", "path", "url")}


def _messages(obj: dict, key: str, _qa_windows: str) -> Conversation:
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise SampleError("bad_annotation", f"{key}: 'messages' must be a non-empty list")
    listed = {"image": _as_list(obj.get("images"), "images", key),
              "video": _as_list(obj.get("videos"), "videos", key)}
    used = {"image": 0, "video": 0}
    messages, heard = [], []
    for i, msg in enumerate(msgs):
        if not isinstance(msg, dict) or msg.get("role") not in ROLES:
            raise SampleError("bad_annotation", f"{key}: messages[{i}] needs a 'role' in {ROLES}")
        raw = msg.get("content")
        parts = [{"type": "text", "text": raw}] if isinstance(raw, str) else raw
        if not isinstance(parts, list):
            raise SampleError("bad_annotation", f"{key}: messages[{i}].content must be a string or a list")
        content: List[Part] = []
        for j, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                content.append(part["text"])
            elif isinstance(part, dict) and "text_stream" in part and msg["role"] == "assistant":
                heard += _text_stream(part["text_stream"], f"{key}: messages[{i}].content[{j}]")
            elif kind in ("image", "video"):
                source = _part_source(part, kind)
                if source is None and listed[kind]:
                    if used[kind] >= len(listed[kind]):
                        raise SampleError("image_count_mismatch", f"{key}: more {kind} parts than "
                                          f"'{kind}s' ({len(listed[kind])})")
                    source = listed[kind][used[kind]]
                used[kind] += 1
                content.append(Media(kind, source, *_clip_bounds(part, kind, f"{key}: messages[{i}].content[{j}]")))
            else:
                raise SampleError("bad_annotation", f"{key}: messages[{i}].content[{j}] must be "
                                  "{'type': 'text', 'text': str} or {'type': 'image' | 'video', ...}")
        if content or msg["role"] != "assistant":
            messages.append(Message(msg["role"], content))
    for kind, paths in listed.items():
        if paths and used[kind] != len(paths):
            raise SampleError("image_count_mismatch", f"{key}: {used[kind]} {kind} parts for "
                              f"{len(paths)} '{kind}s'")
    if heard:  # streamed speech: the sample is the video with its captions (one user turn)
        if [m.role for m in messages] != ["user"]:
            raise SampleError("bad_annotation", f"{key}: a text_stream sample has one user message (the video "
                              f"and an optional query) and one assistant text_stream, got {len(msgs)} messages")
        heard.sort(key=lambda c: c.t)
    return Conversation(messages, heard, obj.get("type"), _meta(obj, ("messages", "images", "videos")))


def _text_stream(stream: Any, where: str) -> List[Caption]:
    """LiveCC's ``[[start, end, word], ...]`` -> one caption per word, heard at its end."""
    if not isinstance(stream, list) or not stream:
        raise SampleError("empty_turn", f"{where}: text_stream must be a non-empty list of [start, end, word]")
    out = []
    for n, item in enumerate(stream):
        ok = isinstance(item, (list, tuple)) and len(item) == 3 and isinstance(item[2], str) \
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in item[:2]) and 0 <= item[0] <= item[1]
        if not ok:
            raise SampleError("bad_annotation", f"{where}: text_stream[{n}] must be [start, end, word] with "
                              f"0 <= start <= end, got {item!r}"[:300])
        if item[2].strip():
            out.append(Caption(float(item[1]), item[2].strip(), heard=True))
    return out


def _clip_bounds(part: dict, kind: str, where: str):
    """(start, end) seconds of a video part that is a clip of its file (LiveCC), else (None, None)."""
    start, end = part.get("video_start"), part.get("video_end")
    if kind != "video" or (start is None and end is None):
        return None, None
    for name, value in (("video_start", start), ("video_end", end)):
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0):
            raise SampleError("bad_annotation", f"{where}: {name} must be a number of seconds >= 0, got {value!r}")
    if start is not None and end is not None and end <= start:
        raise SampleError("bad_annotation", f"{where}: video_end {end} must be after video_start {start}")
    return (float(start) if start is not None else None), (float(end) if end is not None else None)


def _part_source(part: dict, kind: str) -> Optional[str]:
    for name in _SOURCE_FIELDS[kind]:
        value = part.get(name)
        if isinstance(value, dict):  # OpenAI style {"image_url": {"url": ...}}
            value = value.get("url")
        if isinstance(value, str) and value:
            return value
    return None


def _meta(obj: dict, skip) -> Dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in skip}


def _check_targets(conv: Conversation, key: str) -> None:
    """Every assistant turn has something to learn; a sample without any has nothing to train."""
    if conv.captions:
        return
    assistant = [m for m in conv.messages if m.role == "assistant"]
    if not assistant:
        raise SampleError("no_targets", f"{key}: no assistant turn (nothing to train on)")
    for i, m in enumerate(conv.messages):
        if m.role == "assistant" and not m.text().strip():
            raise SampleError("empty_turn", f"{key}: assistant turn (message {i}) is empty")


# --- image-text pairs -------------------------------------------------------------------------
def _caption(obj: dict, key: str, _qa_windows: str) -> Conversation:
    """A captioned image or clip (img2dataset's webdataset shards for LAION / CC3M / CC12M /
    COYO, WebVid; ``{"image": path, "caption": ...}`` lines): the media, then the caption as the
    answer. ``caption`` may be a list (COCO's five): the first is trained. An optional
    ``prompt`` goes after the media in the user turn (none: the image alone, as pretraining
    on pairs usually does)."""
    caption = obj["caption"]
    if isinstance(caption, list):
        caption = caption[0] if caption else None
    if not isinstance(caption, str) or not caption.strip():
        raise SampleError("empty_turn", f"{key}: 'caption' must be a non-empty string (or a list of them)")
    source = obj.get("video") or obj.get("image")
    if source is not None and not isinstance(source, str):
        raise SampleError("bad_annotation", f"{key}: 'image' / 'video' must be one path")
    prompt = obj.get("prompt")
    content: List[Part] = [Media("video" if obj.get("video") else None, source)]
    if isinstance(prompt, str) and prompt.strip():
        content.append(prompt)
    meta = _meta(obj, ("caption", "image", "video", "prompt"))
    return Conversation([Message("user", content), Message("assistant", [caption.strip()])], [], obj.get("type"), meta)


_PARSERS: Dict[str, Callable[[dict, str, str], Conversation]] = {
    "ours": _ours, "llava": _llava, "messages": _messages, "caption": _caption}
