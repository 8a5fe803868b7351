"""The evaluation report: agreement between the two sides, and the table (markdown)."""

from __future__ import annotations

import math
from typing import Dict, List


def agreement(megatron: Dict, hf: Dict) -> Dict:
    """Same generated tokens on the same items? Lists the items that differ."""
    q_diff = [a["id"] for a, b in zip(megatron["questions"], hf["questions"]) if a["tokens"] != b["tokens"]]
    f_diff, frames = [], 0
    for a, b in zip(megatron["captions"], hf["captions"]):
        for k, (fa, fb) in enumerate(zip(a["frames"], b["frames"])):
            frames += 1
            if fa["tokens"] != fb["tokens"]:
                f_diff.append(f"{a['id']}@{k}")
    n_q = len(megatron["questions"])
    return {"questions": n_q, "questions_differ": len(q_diff), "frames": frames, "frames_differ": len(f_diff),
            "question_agreement": 1 - len(q_diff) / n_q if n_q else float("nan"),
            "frame_agreement": 1 - len(f_diff) / frames if frames else float("nan"),
            "all_equal": not q_diff and not f_diff, "differ": (q_diff + f_diff)[:50]}


def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def table(result: Dict) -> str:
    sides = list(result["sides"])
    head = "| group | n | " + " | ".join(sides) + " |\n|---|---|" + "---|" * len(sides) + "\n"
    groups: List[str] = sorted({g for s in sides for g in result["sides"][s]["scores"] if g != "caption"},
                               key=lambda g: (g != "all", g.startswith("task:"), g))
    rows = []
    for g in groups:
        n = next(result["sides"][s]["scores"][g]["n"] for s in sides if g in result["sides"][s]["scores"])
        label = "score" if g.startswith("metric:") else "accuracy"  # ANLS and VQA accuracy are scores in [0, 1]
        rows.append(f"| {g} {label} | {n} | " + " | ".join(
            _fmt(result["sides"][s]["scores"].get(g, {}).get("accuracy")) for s in sides) + " |")
    caps = [result["sides"][s]["scores"].get("caption") for s in sides]
    if any(caps):
        first = next(c for c in caps if c)
        for key, n_key in (("caption_f1", "frames_with_reference"), ("caption_exact", "frames_with_reference"),
                           ("silence_accuracy", "frames_without_reference")):
            rows.append(f"| {key} | {first[n_key]} | " + " | ".join(_fmt(c and c[key]) for c in caps) + " |")
    rows.append("| seconds | | " + " | ".join(f"{result['sides'][s]['seconds']:.1f}" for s in sides) + " |")
    text = head + "\n".join(rows) + "\n"
    agree = result.get("agreement")
    if agree:
        text += (f"\nmegatron vs HF: {agree['questions'] - agree['questions_differ']}/{agree['questions']} answers "
                 f"and {agree['frames'] - agree['frames_differ']}/{agree['frames']} caption frames identical "
                 "(same tokens)\n")
    if result.get("skipped"):
        text += f"\nskipped samples: {result['skipped']}\n"
    return text
