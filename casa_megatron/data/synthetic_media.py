"""Rendered images and clips whose answers can only come from looking at them.

Coarse questions need the global picture (shape, colour, count); fine ones need small details
(a 2-digit number or a short word in Pillow's default font, the tallest of three labelled bars:
DocVQA / ChartQA in miniature). Clips move one shape across the frame; their captions say where
it is at each timestamp, so a caption needs the frame it follows (and its direction, two frames).
Everything is drawn from a ``numpy.random.Generator``: same seed, same pixels.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220), "yellow": (240, 220, 20),
    "purple": (150, 40, 190), "orange": (250, 140, 0), "white": (250, 250, 250), "black": (10, 10, 10)}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = ("one", "two", "three", "four")
WORDS = ("cat", "dog", "sun", "tree", "book", "fish", "bird", "car", "moon", "star", "cup", "hat")
BARS = ("a", "b", "c")
BACKGROUND = (128, 128, 128)
# Bumped whenever the pixels or texts a seed produces change: caches of generated splits key on it.
# 4: H.264 clips encoded without x264's mbtree (byte-identical from one generation to the next).
GENERATOR_VERSION = 4
# Radius of the coarse-question shape, as a fraction of the image's short side: large enough that a
# shape still covers several 28x28-pixel LM tokens after the smart resize to a small pixel budget.
SHAPE_RADIUS = 0.3
QUESTIONS = {
    "shape": "what shape is in the image ?", "colour": "what colour is the shape ?",
    "count": "how many shapes are there ?", "number": "what number is written ?",
    "word": "what word is written ?", "chart": "which bar is the tallest ?",
}
TASK_TYPE = {"shape": "coarse", "colour": "coarse", "count": "coarse",
             "number": "fine", "word": "fine", "chart": "fine"}
# Two-image tasks (LLaVA multi-image samples): the answer needs both pictures.
MULTI_QUESTIONS = {"more": "which picture has more shapes ?", "same_colour": "are the shapes the same colour ?"}
MULTI_ANSWERS = {"more": ("the first", "the second"), "same_colour": ("yes", "no")}
CHAT_ROLES = ("system", "user", "assistant")  # role names the generated tokenizer's chat template writes
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}
REGIONS = {"x": ("left", "middle", "right"), "y": ("top", "middle", "bottom")}


def vocabulary() -> List[str]:
    """Every text the generator can produce, word by word (for the tokenizer)."""
    words = set(" ".join(QUESTIONS.values()).split()) | set(" ".join(MULTI_QUESTIONS.values()).split())
    words |= {w for answers in MULTI_ANSWERS.values() for a in answers for w in a.split()} | set(CHAT_ROLES)
    words |= set(COLOURS) | set(SHAPES) | set(COUNT_WORDS) | set(WORDS) | set(BARS)
    words |= {str(n) for n in range(10, 100)}
    words |= set(DIRECTIONS) | set(REGIONS["x"]) | set(REGIONS["y"])
    words |= set(caption_text("red", "circle", "right", "left").split())
    return sorted(words)


def caption_text(colour: str, shape: str, direction: str, region: str) -> str:
    return f"the {colour} {shape} moves {direction} and is at the {region}"


def _canvas(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    noise = rng.integers(-12, 13, size=(height, width, 1))
    base = np.clip(np.array(BACKGROUND)[None, None] + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(base, "RGB")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def _size(rng: np.random.Generator) -> Tuple[int, int]:
    """Varied, not patch-aligned sizes and aspects, to exercise the smart resize."""
    return int(rng.integers(96, 241)), int(rng.integers(80, 201))


def _font():
    return ImageFont.load_default()


def render_image_task(rng: np.random.Generator, task: str) -> Tuple[np.ndarray, List[Dict[str, str]]]:
    """One image and its QA pairs for ``task``: [H, W, 3] uint8 and [{question, answer}, ...]."""
    width, height = _size(rng)
    img = _canvas(rng, width, height)
    draw = ImageDraw.Draw(img)
    r = min(width, height) * SHAPE_RADIUS
    if task in ("shape", "colour"):
        shape, colour = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))]
        cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
        _draw_shape(draw, shape, cx, cy, r, COLOURS[colour])
        qa = [("shape", shape), ("colour", colour)]
        if rng.random() < 0.5:
            qa = qa[::-1]
        qa = qa[:1 + int(rng.integers(2))]  # one or two turns
    elif task == "count":
        n = int(rng.integers(1, 5))
        shape = SHAPES[rng.integers(len(SHAPES))]
        _draw_count(rng, draw, shape, n, width, height, r * 0.6)
        qa = [("count", COUNT_WORDS[n - 1])]
    elif task in ("number", "word"):
        text = str(int(rng.integers(10, 100))) if task == "number" else WORDS[rng.integers(len(WORDS))]
        x, y = int(rng.integers(4, width - 40)), int(rng.integers(4, height - 16))
        draw.rectangle([x - 2, y - 2, x + 34, y + 13], fill=(250, 250, 250))
        draw.text((x, y), text, fill=(0, 0, 0), font=_font())
        qa = [(task, text)]
    elif task == "chart":
        heights = rng.permutation([0.3, 0.55, 0.85])
        bar_w = width / 7
        for i, (label, h) in enumerate(zip(BARS, heights)):
            x0 = (2 * i + 1) * bar_w
            top = (height - 14) * (1 - h)
            draw.rectangle([x0, top, x0 + bar_w, height - 14], fill=(30, 60, 220))
            draw.text((x0 + bar_w / 2 - 3, height - 13), label, fill=(0, 0, 0), font=_font())
        qa = [("chart", BARS[int(np.argmax(heights))])]
    else:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(QUESTIONS)}")
    turns = [{"question": QUESTIONS[t], "answer": a, "type": TASK_TYPE[t], "task": t} for t, a in qa]
    return np.asarray(img), turns


def render_clip(rng: np.random.Generator, width: int = 112, height: int = 84, fps: int = 10,
                seconds: float = 3.0, caption_every: float = 1.0) -> Tuple[List[np.ndarray], List[Dict]]:
    """One shape crossing the frame: F frames [H, W, 3] uint8 and captions [{t, text}, ...]."""
    shape, colour = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))]
    direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    dx, dy = DIRECTIONS[direction]
    r = min(width, height) * 0.15
    n = int(round(seconds * fps))
    bg = np.asarray(_canvas(rng, width, height))
    fixed = (rng.uniform(r, height - r) if dx else rng.uniform(r, width - r))
    frames, captions = [], []
    for i in range(n):
        progress = i / max(1, n - 1)
        if dx:
            cx = r + (width - 2 * r) * (progress if dx > 0 else 1 - progress)
            cy = fixed
        else:
            cy = r + (height - 2 * r) * (progress if dy > 0 else 1 - progress)
            cx = fixed
        img = Image.fromarray(bg.copy())
        _draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, COLOURS[colour])
        frames.append(np.asarray(img))
        t = i / fps
        if abs(t / caption_every - round(t / caption_every)) < 1e-6:
            axis, pos, extent = ("x", cx, width) if dx else ("y", cy, height)
            region = REGIONS[axis][min(2, int(3 * pos / extent))]
            captions.append({"t": round(t, 3), "text": caption_text(colour, shape, direction, region)})
    return frames, captions


def render_multi_task(rng: np.random.Generator, task: str) -> Tuple[List[np.ndarray], str, str]:
    """Two images and a question about both: ([H, W, 3] uint8 x 2, question, answer).

    ``more``: two count pictures with different numbers of shapes; ``same_colour``: one shape
    each, the same colour half of the time."""
    if task == "more":
        counts = rng.choice(np.arange(1, 5), size=2, replace=False)
        images = [_count_image(rng, int(n)) for n in counts]
        answer = MULTI_ANSWERS[task][0 if counts[0] > counts[1] else 1]
    elif task == "same_colour":
        names = list(COLOURS)
        first = names[rng.integers(len(names))]
        same = bool(rng.random() < 0.5)
        second = first if same else [c for c in names if c != first][rng.integers(len(names) - 1)]
        images = [_shape_image(rng, colour) for colour in (first, second)]
        answer = MULTI_ANSWERS[task][0 if same else 1]
    else:
        raise ValueError(f"unknown multi-image task {task!r}; choose one of {sorted(MULTI_QUESTIONS)}")
    return images, MULTI_QUESTIONS[task], answer


def _shape_image(rng: np.random.Generator, colour: str) -> np.ndarray:
    width, height = _size(rng)
    img = _canvas(rng, width, height)
    r = min(width, height) * SHAPE_RADIUS
    shape = SHAPES[rng.integers(len(SHAPES))]
    _draw_shape(ImageDraw.Draw(img), shape, rng.uniform(r, width - r), rng.uniform(r, height - r), r,
                COLOURS[colour])
    return np.asarray(img)


def _count_image(rng: np.random.Generator, n: int) -> np.ndarray:
    width, height = _size(rng)
    img = _canvas(rng, width, height)
    shape = SHAPES[rng.integers(len(SHAPES))]
    _draw_count(rng, ImageDraw.Draw(img), shape, n, width, height, min(width, height) * SHAPE_RADIUS * 0.6)
    return np.asarray(img)


def _draw_count(rng: np.random.Generator, draw, shape: str, n: int, width: int, height: int, r: float) -> None:
    for c in rng.permutation(4)[:n]:  # one shape per quadrant: never overlapping
        cx = (c % 2 + 0.5) * width / 2 + rng.uniform(-3, 3)
        cy = (c // 2 + 0.5) * height / 2 + rng.uniform(-3, 3)
        _draw_shape(draw, shape, cx, cy, r, COLOURS[list(COLOURS)[rng.integers(len(COLOURS))]])
