"""Data configuration (owned by the data pipeline; embedded in the training config as ``data``).

``source`` picks the training data: ``"synthetic"`` is the in-memory generated colour/side task
(data/synthetic.py); anything else is a path to real data: a directory of ``*.tar`` shards, one
``.tar`` file, a ``.jsonl`` manifest of local files, or a LLaVA / chat-messages ``.json(l)``
dataset (see docs/data.md for the formats). ``sources`` blends several with weights and is used
when ``source`` is left empty; a set ``source`` wins, so ``data.source=...`` on the command line
switches any recipe, blended or not, to one source. Empty both: the synthetic task. ``valid``
lists the validation sources (the synthetic task validates on its own held-out stream).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from casa_megatron.data.image_processing import CLIP_MEAN, CLIP_STD


DECODERS = ("auto", "cpu", "dali")
WORKER_TYPES = ("thread", "process")
QA_WINDOWS = ("per_turn", "per_sample")
TEXT_LAYOUTS = ("auto", "chat_template", "layout_tokens")


@dataclass
class DataConfig:
    """Where samples come from and how they become packed ``VLMBatch`` micro-batches."""

    source: str = ""  # one source; "" = ``sources``, or the synthetic task when that is empty too
    # Weighted blend, used when ``source`` is empty: [{path, weight (default 1), media_root (JSON datasets)}]
    sources: List[Dict[str, Any]] = field(default_factory=list)
    valid: List[Dict[str, Any]] = field(default_factory=list)  # validation sources (same shape)
    seq_length: int = 32  # text tokens per row (text slots)
    image_seq_length: int = 24  # image tokens per row (image slots); the model pads to it
    image_size: int = 56  # synthetic task only: square image side in px
    seed: int = 0

    # --- real data -------------------------------------------------------------------------
    tokenizer_path: str = ""  # local HF tokenizer dir; "" = a ``tokenizer/`` dir next to source
    pixel_budget: int = 448 * 448  # max pixels of an image after smart resize
    min_pixels: int = 56 * 56  # min pixels of an image / frame after smart resize
    video_pixel_budget: int = 224 * 224  # max pixels of one video frame
    fps: float = 2.0  # video frames sampled per second of video
    max_frames: int = 32  # frames kept per clip (the first ones: fps is preserved)
    image_mean: List[float] = field(default_factory=lambda: list(CLIP_MEAN))  # pixel normalisation per
    image_std: List[float] = field(default_factory=lambda: list(CLIP_STD))  # RGB channel (real data only)
    window_per_frame: bool = True  # False: all frames of a clip open one window
    # Frames per pixel patch (Qwen2.5-VL: 2, a still image repeated; frames sharing a window are
    # grouped in pairs). None = the encoder's model.vision.temporal_patch_size (the training loop
    # fills it; 1 when the data pipeline is used alone).
    temporal_patch_size: Optional[int] = None
    qa_windows: str = "per_turn"  # per_turn: every QA pair its window (image repeated); per_sample
    decoder: str = "auto"  # video decoder: auto (DALI if importable and a GPU exists) | cpu | dali
    num_workers: int = 2  # background decode workers (0 = decode in the calling thread)
    worker_type: str = "thread"  # thread | process
    prefetch: int = 0  # samples decoded ahead; 0 = 4 * max(1, num_workers)
    pack_buffer: int = 64  # samples the first-fit packer chooses from
    shuffle: bool = True  # seeded permutation of the samples every epoch
    # permutation: numpy's, drawn whole each epoch (4 B/sample while drawn); stateless: a keyed
    # bijection per position, no array (billions of samples; sampler.py, index_shuffle.py)
    order: str = "permutation"
    truncate: bool = True  # cut over-long samples at a window boundary instead of skipping them
    image_token: str = "<image>"  # placeholder token, one per image, the image sits before it
    answer_token: str = "<answer>"  # ends a question; the answer follows
    end_of_turn_token: str = "<eot>"  # ends an answer or a frame caption (it is trained on)
    # auto: the tokenizer's chat template if it has one, else the layout tokens above
    text_layout: str = "auto"  # auto | chat_template | layout_tokens
    # A Jinja chat template file used instead of the tokenizer's own ("" = the tokenizer's): a
    # text-only LM's template (Qwen3's drops list contents, images included) made to render media
    # parts; the export writes it as the folder's template (configs/chat_templates/).
    chat_template: str = ""
    image_placeholder: str = ""  # the template's image token ("" = detect, e.g. <|image_pad|>)
    video_placeholder: str = ""  # the template's video token ("" = detect, e.g. <|video_pad|>)
    log_interval: int = 100  # batches between throughput log lines (0 = never)
    # Where data indexes are saved when not beside the data (a read-only dataset): Megatron-LM's
    # --data-cache-path. "" = beside the data only (``.casa_index/``), in memory where that
    # cannot be written. Indexes found beside the data are read first either way.
    index_dir: str = ""

    @property
    def is_synthetic(self) -> bool:
        return self.source == "synthetic" or (not self.source and not self.sources)

    def chat_template_text(self) -> str:
        """The ``chat_template`` file's text ("" when the tokenizer's own template is used)."""
        return Path(self.chat_template).read_text(encoding="utf-8") if self.chat_template else ""

    def source_specs(self):
        """The training sources as ``SourceSpec``s: the one ``source`` if set, else ``sources``;
        ValueError names a bad entry."""
        from casa_megatron.data.sources import SourceSpec

        if self.source or not self.sources:
            return [SourceSpec(self.source or "synthetic")]
        return [SourceSpec.parse(e, f"data.sources[{i}]") for i, e in enumerate(self.sources)]

    def valid_specs(self):
        from casa_megatron.data.sources import SourceSpec

        return [SourceSpec.parse(e, f"data.valid[{i}]") for i, e in enumerate(self.valid)]

    def resolved_tokenizer_path(self) -> Optional[Path]:
        """``tokenizer_path`` or a ``tokenizer/`` directory beside/inside the (first) source."""
        if self.tokenizer_path:
            return Path(self.tokenizer_path)
        src = Path(self.source_specs()[0].path)
        for candidate in (src / "tokenizer", src.parent / "tokenizer"):
            if (candidate / "tokenizer_config.json").exists():
                return candidate
        return None

    def validate(self) -> None:
        # Imported here: casa_megatron.config's package imports this module (schema embeds
        # DataConfig), so a top-level import would be circular when data is imported first.
        from casa_megatron.config.errors import ConfigError
        from casa_megatron.data.recipe import is_recipe, read_recipe

        if self.image_size % 28:
            raise ConfigError(f"data.image_size={self.image_size} must be a multiple of 28 (patch 14 x merge 2)")
        if self.seq_length < 2 or self.image_seq_length < 1:
            raise ConfigError(f"data.seq_length={self.seq_length} must be >= 2 and "
                              f"data.image_seq_length={self.image_seq_length} >= 1")
        try:
            specs, valid = self.source_specs(), self.valid_specs()
        except ValueError as e:
            raise ConfigError(str(e)) from e
        if self.is_synthetic:
            return  # the synthetic task validates on its own held-out stream, whatever data.valid names
        for name, spec in [(f"data.sources[{i}]", s) for i, s in enumerate(specs)] + \
                [(f"data.valid[{i}]", v) for i, v in enumerate(valid)]:
            where = "data.source" if self.source and name.startswith("data.sources") else name
            if not Path(spec.path).exists():
                raise ConfigError(f"{where}={spec.path!r}: no such shard directory, .tar, .jsonl manifest, "
                                  ".json(l) dataset or .yaml data recipe (use 'synthetic' for the generated task)")
            if is_recipe(spec.path):
                try:
                    read_recipe(spec.path)  # every dataset exists, every strategy parses: now, not at start-up
                except ValueError as e:
                    raise ConfigError(f"{where}: {e}") from e
        tok = self.resolved_tokenizer_path()
        if tok is None or not tok.exists():
            raise ConfigError(f"data.tokenizer_path={self.tokenizer_path!r}: no local tokenizer found "
                              f"(looked for a 'tokenizer' directory next to {self.source!r})")
        from casa_megatron.data.sampler import ORDERS

        for name, value, allowed in (("order", self.order, ORDERS), ("decoder", self.decoder, DECODERS),
                                     ("worker_type", self.worker_type, WORKER_TYPES),
                                     ("qa_windows", self.qa_windows, QA_WINDOWS),
                                     ("text_layout", self.text_layout, TEXT_LAYOUTS)):
            if value not in allowed:
                raise ConfigError(f"data.{name}={value!r} must be one of {allowed}")
        if self.chat_template:
            if self.text_layout == "layout_tokens":
                raise ConfigError(f"data.chat_template={self.chat_template!r} with data.text_layout=layout_tokens: "
                                  "a chat template is used only by the chat_template layout (or auto)")
            try:
                from jinja2 import Environment, TemplateSyntaxError

                Environment().parse(self.chat_template_text())
            except OSError as e:
                raise ConfigError(f"data.chat_template={self.chat_template!r}: cannot read it ({e})") from e
            except TemplateSyntaxError as e:
                raise ConfigError(f"data.chat_template={self.chat_template!r}: not a Jinja template (line {e.lineno}: "
                                  f"{e.message})") from e
        if self.index_dir and Path(self.index_dir).exists() and not Path(self.index_dir).is_dir():
            raise ConfigError(f"data.index_dir={self.index_dir!r} is a file; it names the folder data indexes "
                              "are saved in")
        if self.fps <= 0 or self.max_frames < 1:
            raise ConfigError(f"data.fps={self.fps} must be > 0 and data.max_frames={self.max_frames} >= 1")
        if min(self.pixel_budget, self.video_pixel_budget) < 28 * 28 or self.min_pixels < 1:
            raise ConfigError(f"data.pixel_budget={self.pixel_budget} and data.video_pixel_budget="
                              f"{self.video_pixel_budget} must be >= 784 (one 28x28 merge unit)")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ConfigError(f"data.image_mean={self.image_mean} and data.image_std={self.image_std} need "
                              "3 values (RGB), every std > 0")
        if self.num_workers < 0 or self.pack_buffer < 1 or self.prefetch < 0:
            raise ConfigError(f"data.num_workers={self.num_workers}, data.prefetch={self.prefetch} must be >= 0 "
                              f"and data.pack_buffer={self.pack_buffer} >= 1")
