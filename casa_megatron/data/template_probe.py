"""What a chat template writes for media and at the end of a turn, found by rendering probes.

Nothing about a template's conventions is hard-coded beyond a list of well-known placeholder
names: the placeholder of an image / video part is the tokenizer's own ``image_token`` /
``video_token`` attribute or the first known name a probe rendering contains (or what the
config sets); the markup around it (Qwen2.5: ``<|vision_start|>`` ... ``<|vision_end|>``) is
the difference between a message rendered with and without the part; the end-of-turn token is
the first token the template writes after an assistant's text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

IMAGE_CANDIDATES = ("<|image_pad|>", "<image>", "<|image|>", "<start_of_image>")
VIDEO_CANDIDATES = ("<|video_pad|>", "<video>")


@dataclass
class TemplateInfo:
    image_placeholder: str
    video_placeholder: Optional[str]  # None: videos are rendered as image parts
    end_of_turn: str  # e.g. <|im_end|> (Qwen2.5), </s> (Helium)
    markup: Dict[str, Tuple[str, str]] = field(default_factory=dict)  # placeholder -> (before, after)


def _render(tok, messages, **kw) -> str:
    return tok.apply_chat_template(messages, tokenize=False, **kw)


def _media_probe(tok, kind: str) -> Tuple[str, str, Optional[Exception]]:
    """(rendering with a ``kind`` part, what that part added to the text-only rendering, error)."""
    try:
        with_part = _render(tok, [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": "x"}]}])
        without = _render(tok, [{"role": "user", "content": [{"type": "text", "text": "x"}]}])
    except Exception as e:  # noqa: BLE001 - a template that cannot render media parts
        return "", "", e
    p = 0
    while p < min(len(with_part), len(without)) and with_part[p] == without[p]:
        p += 1
    q = 0
    while q < min(len(with_part), len(without)) - p and with_part[-1 - q] == without[-1 - q]:
        q += 1
    return with_part, with_part[p:len(with_part) - q], None


def _placeholder(tok, path: str, kind: str, configured: str, candidates: Sequence[str], required: bool,
                 info: TemplateInfo) -> Optional[str]:
    probe, added, error = _media_probe(tok, kind)
    names = [configured] if configured else [getattr(tok, f"{kind}_token", None), *candidates]
    for name in names:
        if name and name in probe and len(tok.encode(name, add_special_tokens=False)) == 1:
            if name in added:
                before, _, after = added.partition(name)
                info.markup[name] = (before, after)
            return name
    if not required and not configured:
        return None
    raise ValueError(f"tokenizer at {path}: cannot find the chat template's {kind} placeholder "
                     f"(tried {[n for n in names if n]}; a {kind} part renders as {probe!r}"
                     f"{f', error {error}' if error else ''}); set data.{kind}_placeholder to a token that "
                     "the template emits once per part, or give data.chat_template a template that renders media "
                     "parts (a text-only LM's own template may drop them: Qwen3's renders a list content as '')")


def _end_of_turn(tok, path: str) -> str:
    text = _render(tok, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "yz"}])
    rest = text[text.rindex("yz") + 2:]
    ids = tok(rest, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"tokenizer at {path}: the chat template writes nothing after an assistant turn, "
                         "so there is no end-of-turn token to train")
    return tok.convert_ids_to_tokens(ids[0])


def probe_template(tok, path: str, image_placeholder: str = "", video_placeholder: str = "") -> TemplateInfo:
    info = TemplateInfo("", None, _end_of_turn(tok, path))
    info.image_placeholder = _placeholder(tok, path, "image", image_placeholder, IMAGE_CANDIDATES, True, info)
    info.video_placeholder = _placeholder(tok, path, "video", video_placeholder, VIDEO_CANDIDATES, False, info)
    return info
