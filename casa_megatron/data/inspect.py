"""Look at a data set as the training run will see it, before asking for GPUs.

For each source of a run's data config (recipes expanded), the first ``samples`` samples are read,
parsed, decoded and laid out by the training pipeline's own code (``SampleProcessor`` with the
run's tokenizer, chat template, pixel budgets and fusion): how many are usable and why the others
are skipped, which annotation formats they are in, their text, image and trained (loss) token
counts as percentiles, and how many do not fit one row (``data.seq_length`` /
``data.image_seq_length``: truncated at a turn boundary, or refused). A few samples are rendered as
the model reads them, the tokens it learns to predict in ``[[ ]]``: the check that a chat template
and its loss mask are what was meant (a wrong one trains on the prompt, or on nothing, silently).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from casa_megatron.data.formats import detect_format, parse_conversation, sample_annotation
from casa_megatron.data.interleave import fit_to_budget
from casa_megatron.data.records import SampleError, TokenizedSample

TRAINED_OPEN, TRAINED_CLOSE = "[[", "]]"


@dataclass
class SourceReport:
    path: str
    size: int
    read: int = 0
    used: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_skipped: List[str] = field(default_factory=list)
    formats: Counter = field(default_factory=Counter)
    text_tokens: List[int] = field(default_factory=list)
    image_tokens: List[int] = field(default_factory=list)
    trained_tokens: List[int] = field(default_factory=list)
    shown: List[str] = field(default_factory=list)

    def summary(self) -> Dict:
        def pct(values: List[int], q: float) -> Optional[int]:
            ordered = sorted(values)
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None

        return {"source": self.path, "samples": self.size, "read": self.read, "used": self.used,
                "truncated": self.truncated, "skipped": dict(self.skipped), "first_skipped": self.first_skipped,
                "formats": dict(self.formats),
                **{f"{name}_{label}": pct(values, q) for name, values in (
                    ("text_tokens", self.text_tokens), ("image_tokens", self.image_tokens),
                    ("trained_tokens", self.trained_tokens))
                   for label, q in (("p50", 0.5), ("p90", 0.9), ("max", 1.0))}}


def render(sample: TokenizedSample, tokenizer) -> str:
    """The sample's text as the model reads it; the tokens it is trained to predict in [[ ]]."""
    trained = [False] + [bool(m) for m in sample.loss_mask[:-1]]  # loss at t predicts token t + 1
    pieces, start = [], 0
    for t in range(1, len(sample.input_ids) + 1):
        if t == len(sample.input_ids) or trained[t] != trained[start]:
            text = tokenizer.decode(sample.input_ids[start:t])
            pieces.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if trained[start] else text)
            start = t
    images = ", ".join(f"{'x'.join(map(str, im.grid_hw))} patches at token {im.position}" for im in sample.images)
    return "".join(pieces) + (f"\n  (images: {images})" if images else "")


def inspect_sources(specs: Sequence, processor, samples: int, show: int, index_dir: str = "") -> List[SourceReport]:
    """A ``SourceReport`` per source of ``specs`` (``SourceSpec``s; recipes are expanded;
    ``index_dir``: ``data.index_dir``)."""
    from casa_megatron.data.sources import open_sources

    specs, sources = open_sources(specs, index_dir)
    s = processor.settings
    reports = []
    for spec, source in zip(specs, sources):
        report = SourceReport(spec.path + (f" ({spec.subset})" if spec.subset != "all" else ""), len(source))
        for i in range(min(samples, len(source))):
            report.read += 1
            try:
                raw = source.read(i)
                obj = sample_annotation(raw)
                report.formats[detect_format(obj) or "unknown"] += 1
                conv = parse_conversation(obj, raw.key, s.qa_windows)
                sample = processor.layout.build(raw.key, conv, processor.decode_media(raw, conv))
                report.text_tokens.append(len(sample))
                report.image_tokens.append(sample.num_image_tokens)
                report.trained_tokens.append(int(sum(sample.loss_mask)))
                fitted = fit_to_budget(sample, s.seq_length, s.image_seq_length, s.truncate)
            except SampleError as e:
                report.skipped[e.reason] += 1
                if len(report.first_skipped) < 5:
                    report.first_skipped.append(str(e)[:300])
                continue
            report.used += 1
            report.truncated += len(fitted) < len(sample)
            if len(report.shown) < show:
                report.shown.append(f"{raw.key}:\n{render(fitted, processor.layout.tokenizer)}")
        reports.append(report)
    return reports
