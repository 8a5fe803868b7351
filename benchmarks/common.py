"""Shared pieces of the fusion benchmarks: config schema, fair model building, image-heavy
packed batches, one training step, memory probes and table printing.

Every benchmark builds the *same* backbone (``model`` section) once per fusion mechanism, with
the same seed, so all fusions share embedding, encoder, projector and LM weights at init and
differ only in how vision enters the LM.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import platform
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from casa_megatron.config.schema import ConfigError, ModelConfig
from casa_megatron.model.batch import VLMBatch

FUSIONS = ("casa", "cross_attention", "insertion")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
VISION_MODES = ("encoder", "frozen_stub")


@dataclass
class ImageHeavyData:
    """Packed rows of ``samples_per_row`` samples; each sample is ``seq_length // samples_per_row``
    text tokens with ``images_per_sample`` images (grid ``image_grid`` patches each, a quarter of
    that in LM tokens) inserted after its first token. Rows are full: ``image_seq_length`` is
    exactly the image tokens of a row, so insertion and CASA see the same tokens, no padding."""

    micro_batch_size: int = 1
    num_microbatches: int = 1
    seq_length: int = 64
    samples_per_row: int = 8
    images_per_sample: int = 1
    image_grid: List[int] = field(default_factory=lambda: [16, 16])

    @property
    def tokens_per_image(self) -> int:
        return self.image_grid[0] * self.image_grid[1] // 4

    @property
    def image_seq_length(self) -> int:
        return self.samples_per_row * self.images_per_sample * self.tokens_per_image

    def validate(self) -> None:
        for name in ("micro_batch_size", "num_microbatches", "seq_length", "samples_per_row", "images_per_sample"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name}={getattr(self, name)}: must be >= 1")
        if self.seq_length // self.samples_per_row < 2:
            raise ConfigError(f"data.seq_length={self.seq_length} leaves fewer than 2 text tokens per "
                              f"sample with data.samples_per_row={self.samples_per_row}")
        if len(self.image_grid) != 2 or any(g % 2 for g in self.image_grid):
            raise ConfigError(f"data.image_grid={self.image_grid} must be two even patch counts")


@dataclass
class BenchConfig:
    """A benchmark run: one backbone, the fusions to compare, the data shape and the step count.

    ``vision``: ``encoder`` runs (and trains) the model's ViT; ``frozen_stub`` replaces it by a
    fixed random linear map from pixels to features (a frozen, cached encoder), so only the
    projector and the LM side are compared -- needed at paper scale, where the tiny ViT's dense
    block-diagonal mask over ~80k patches would not fit.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: ImageHeavyData = field(default_factory=ImageHeavyData)
    fusions: List[str] = field(default_factory=lambda: list(FUSIONS))
    dtype: str = "float32"
    vision: str = "encoder"
    warmup_steps: int = 1
    steps: int = 3
    lr: float = 1e-5
    seed: int = 1234
    threads: int = 0  # torch CPU threads in the measuring process; 0 = torch's default

    def validate(self) -> None:
        self.data.validate()
        bad = [f for f in self.fusions if f not in FUSIONS]
        if bad or not self.fusions:
            raise ConfigError(f"fusions={self.fusions}: each must be one of {FUSIONS}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} not in {tuple(DTYPES)}")
        if self.vision not in VISION_MODES:
            raise ConfigError(f"vision={self.vision!r} not in {VISION_MODES}")
        if self.steps < 1 or self.warmup_steps < 0:
            raise ConfigError("steps must be >= 1 and warmup_steps >= 0")
        for fusion in self.fusions:
            fusion_model_config(self.model, fusion).validate()


def fusion_model_config(model: ModelConfig, mechanism: str) -> ModelConfig:
    """The same backbone with ``mechanism`` as its fusion (the gate only for cross-attention)."""
    fusion = dataclasses.replace(
        model.fusion, mechanism=mechanism,
        cross_attention_gate=model.fusion.cross_attention_gate and mechanism == "cross_attention")
    return dataclasses.replace(model, fusion=fusion)


def counted_model_config(cfg: BenchConfig, mechanism: str) -> ModelConfig:
    """The config whose model FLOPs (``casa_megatron/training/flops.py``) are those of
    ``build_model``'s model: with ``vision: frozen_stub`` the encoder is one frozen linear map of
    the patches and no blocks, i.e. a frozen patch embedding over zero blocks."""
    model = fusion_model_config(cfg.model, mechanism)
    if cfg.vision == "frozen_stub":
        model = dataclasses.replace(model, vision=dataclasses.replace(model.vision, num_layers=0, trainable_blocks=0))
    return model


def build_model(cfg: BenchConfig, mechanism: str, image_seq_length: int, precision=None):
    """One process, TP=PP=1; the model for ``mechanism`` on the current device (``precision``: a
    PrecisionConfig, for FP8 through Transformer Engine)."""
    from casa_megatron.config import ParallelConfig
    from casa_megatron.model.build import build_vlm
    from casa_megatron.parallel import initialize_parallel

    initialize_parallel(1, 1, seed=cfg.seed)
    model = build_vlm(fusion_model_config(cfg.model, mechanism), ParallelConfig(), image_seq_length,
                      params_dtype=DTYPES[cfg.dtype], precision=precision)
    if cfg.vision == "frozen_stub":
        model.vision = FrozenStubEncoder(cfg.model.vision, DTYPES[cfg.dtype]).to(model.projector.norm.weight.device)
    return model


class FrozenStubEncoder(torch.nn.Module):
    """pixel patches [n, C*p*p] -> features [n, hv] by a fixed random map (no parameters), with
    the pipeline-part interface of ``VisionEncoder`` (one part: embed = the map, no blocks)."""

    block_offset, first_part, last_part = 0, True, True

    def __init__(self, vision, dtype: torch.dtype):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        dim = self.patch_dim = vision.patch_dim  # C * T * p * p
        self.merge = vision.spatial_merge_size
        self.register_buffer("proj", (torch.randn(dim, vision.hidden_size, generator=g) / dim ** 0.5).to(dtype))
        self.blocks = torch.nn.ModuleList()

    def forward(self, pixel_patches, grid_hw):
        return pixel_patches.to(self.proj.dtype) @ self.proj  # [n, hv]

    def normalized_grid(self, grid_thw):
        return grid_thw

    def blank_input(self, device):
        from casa_megatron.model.vision.interface import VisionEncoder  # megatron: only once a model is built

        return VisionEncoder.blank_input(self, device)

    def plan(self, grid_thw, device):
        return None

    def embed(self, pixel_patches, plan):
        return self(pixel_patches, None)

    def run_blocks(self, x, plan):
        return x

    def finish(self, x, plan):
        return x


def image_heavy_batch(data: ImageHeavyData, vocab_size: int, seed: int) -> VLMBatch:
    """One packed micro-batch with ~``tokens_per_image * images_per_sample / text_per_sample``
    image tokens per text token; loss on the second half of every sample (its "answer")."""
    g = torch.Generator().manual_seed(seed)
    b, s = data.micro_batch_size, data.seq_length
    per = s // data.samples_per_row
    starts = torch.zeros(b, s, dtype=torch.bool)
    positions = torch.zeros(b, s, dtype=torch.long)
    loss_mask = torch.zeros(b, s)
    cols = []
    for k in range(data.samples_per_row):
        o = k * per
        end = s if k == data.samples_per_row - 1 else o + per
        starts[:, o] = True
        positions[:, o:end] = torch.arange(end - o)
        loss_mask[:, o + (end - o) // 2:end] = 1.0
        cols.append(o + 1)
    rows, image_positions = [], []  # stream order: by row, then position
    for r in range(b):
        for c in cols:
            rows += [r] * data.images_per_sample
            image_positions += [c] * data.images_per_sample
    n_img = len(rows)
    grid = torch.tensor([data.image_grid] * n_img)
    patch_dim = 3 * 14 * 14
    return VLMBatch(
        input_ids=torch.randint(0, vocab_size, (b, s), generator=g),
        position_ids=positions,
        pixel_patches=torch.randn(int(grid.prod(1).sum()), patch_dim, generator=g),
        image_grid_hw=grid,
        image_rows=torch.tensor(rows),
        image_positions=torch.tensor(image_positions),
        labels=torch.randint(0, vocab_size, (b, s), generator=g),
        loss_mask=loss_mask,
        sample_starts=starts,
    )


def train_step(model, optimizer, batches: Sequence[VLMBatch], seq_length: int, micro_batch_size: int,
               clip_grad: float = 0.0):
    """megatron's forward-backward over the micro-batches, optional clipping, then the optimizer
    step; returns the mean loss."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from casa_megatron.training.step import forward_step

    optimizer.zero_grad(set_to_none=True)
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
        num_microbatches=len(batches), seq_length=seq_length, micro_batch_size=micro_batch_size)
    if clip_grad > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip_grad)
    optimizer.step()
    return float(torch.stack([l["loss"] for l in losses]).mean())


# --- memory --------------------------------------------------------------------------------------
def _proc_status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class CpuPeakRss:
    """Peak RSS during a block minus the RSS right before it (Linux).

    Before the block: ``malloc_trim(0)`` hands freed heap pages back to the OS (otherwise memory
    freed by earlier steps would be reused without showing up), then writing ``5`` to
    ``/proc/self/clear_refs`` resets the high-water mark ``VmHWM`` to the current RSS.
    """

    method = ("cpu: peak RSS (VmHWM) during one training step minus RSS right before it, after "
              "malloc_trim; weights and optimizer states exist before the step and are excluded")

    def __enter__(self):
        import gc

        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.before = _proc_status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.reset = True
        except OSError:
            self.reset = False
        return self

    def __exit__(self, *exc):
        self.peak = _proc_status_kib("VmHWM")
        return False

    @property
    def bytes(self) -> Optional[int]:
        if not self.reset or self.before is None or self.peak is None:
            return None
        return (self.peak - self.before) * 1024


def state_bytes(model, optimizer) -> int:
    """Bytes of parameters and optimizer states (what exists before a step)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for state in optimizer.state.values():
        total += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
    return total


def machine_info() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "gpu": None}
    try:
        import megatron.core

        info["megatron_core"] = megatron.core.__version__
    except Exception:  # noqa: BLE001 - informational only
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# --- printing ------------------------------------------------------------------------------------
def format_table(rows: List[dict], columns: List[tuple]) -> str:
    """Markdown table; ``columns`` = [(header, key, format spec)]."""
    head = "| " + " | ".join(h for h, _, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(r.get(k), spec) for _, k, spec in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def _fmt(value, spec: str) -> str:
    if value is None:
        return "n/a"
    return format(value, spec) if spec else str(value)


def _forked_child(queue, fn, args):
    import os
    import traceback

    try:
        queue.put(("ok", fn(*args)))
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put(("error", traceback.format_exc()))
    finally:
        os._exit(0)  # no atexit handlers of the parent's libraries in the child


def run_in_child(fn, *args, what: str = "benchmark", method: Optional[str] = None):
    """fn(*args) in a child process, its (picklable) result returned: each measurement gets a fresh
    process (peak memory, allocator state). ``method`` None: ``spawn`` where CUDA is available (a
    forked child cannot use CUDA once the parent's ``torch.cuda.is_available()`` has initialised the
    driver; ``fn`` must then be importable), else ``fork``, which inherits the parent's slow imports."""
    import multiprocessing as mp

    ctx = mp.get_context(method or ("spawn" if torch.cuda.is_available() else "fork"))
    queue = ctx.SimpleQueue()
    proc = ctx.Process(target=_forked_child, args=(queue, fn, args))
    proc.start()
    status, payload = queue.get()
    proc.join()
    if status != "ok":
        raise RuntimeError(f"{what} process failed:\n{payload}")
    return payload

