"""Pack samples into micro-batches under two budgets per row, and collate them into a VLMBatch.

Each row holds at most ``seq_length`` text tokens and ``image_seq_length`` image tokens (the
model's per-row image slots; the paper uses 2048 / 20480 per GPU). Packing is first-fit over a
buffer of samples in arrival order: the oldest sample goes first (into row 0 when the batch is
empty), so no sample waits forever, and the result depends only on the buffer's content and
order (deterministic, hence resumable). Samples keep their sample-relative layout; collation
shifts positions by the row offset, restarts ``position_ids`` per sample, marks sample and window
starts, and turns images into normalised pixel patches (``(x / 255 - mean) / std`` per channel,
CLIP's statistics by default) in stream order (sorted by row, then position), with
``temporal_patch_size`` frames per patch for the Qwen2.5-VL encoder (``media_groups``).
Padding at the end of a row is its own block (its own sample start) with no targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
import torch

from casa_megatron.data.image_processing import CLIP_MEAN, CLIP_STD
from casa_megatron.data.patches import frames_to_patches, image_to_patches
from casa_megatron.data.records import ImageItem, SampleInfo, TokenizedSample
from casa_megatron.model.batch import VLMBatch

PATCH_DIM = 3 * 14 * 14


@dataclass
class PackStats:
    """Slot utilisation over every batch packed so far."""

    batches: int = 0
    rows: int = 0
    samples: int = 0
    text_tokens: int = 0
    text_slots: int = 0
    image_tokens: int = 0
    image_slots: int = 0
    loss_tokens: int = 0

    @property
    def text_utilization(self) -> float:
        return self.text_tokens / self.text_slots if self.text_slots else 0.0

    @property
    def image_utilization(self) -> float:
        return self.image_tokens / self.image_slots if self.image_slots else 0.0

    def as_dict(self) -> dict:
        return {"batches": self.batches, "packed_samples": self.samples, "text_tokens": self.text_tokens,
                "image_tokens": self.image_tokens, "loss_tokens": self.loss_tokens,
                "text_utilization": self.text_utilization, "image_utilization": self.image_utilization,
                "samples_per_row": self.samples / max(1, self.rows)}


def media_groups(sample: TokenizedSample, temporal: int) -> List[Tuple[int, List[ImageItem]]]:
    """(position, frames) per encoder input, in stream order.

    With ``temporal > 1`` (Qwen2.5-VL) the frames of a video that share a window (same
    position, same size) become one clip, embedded ``temporal`` frames per patch; every other
    image stays alone (its frame repeated). With ``temporal == 1`` every item is its own image.
    """
    groups: List[Tuple[int, List[ImageItem]]] = []
    for im in sample.images:
        last = groups[-1] if groups else None
        if (temporal > 1 and sample.kind == "video" and last is not None and last[0] == im.position
                and last[1][-1].pixels.shape == im.pixels.shape):
            last[1].append(im)
        else:
            groups.append((im.position, [im]))
    return groups


class PatchNormalizer:
    """uint8 patch rows -> normalised float patches, all images of a batch in one tensor.

    Equal to cutting ``normalize_pixels(px, mean, std)`` into patches (tested), but cheaper,
    because this runs on the training process's own thread for every image: the image is cut
    into patches while still uint8 (a quarter of the bytes of float pixels), then each patch
    dimension is scaled and shifted by its channel's statistics (``x / (255 std_c) - mean_c /
    std_c``) straight into the batch tensor, in numpy's single-threaded loops. The direct formula
    allocates ~6 float temporaries per 896 px image and runs in torch's two intra-op threads; on a
    loaded 2-core machine that was the loader's bottleneck (docs/data.md, measured). The channel
    of each patch dimension is read off ``to_patches`` itself (applied to a 28x28 image whose
    pixels hold their channel index), so any patch layout that rearranges pixels (temporal
    patches included: pass e.g. ``lambda im: frames_to_patches(im[None].expand(T, ...), T)``) is
    followed.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], to_patches=image_to_patches):
        channels = torch.arange(3, dtype=torch.uint8)[:, None, None].expand(3, 28, 28).contiguous()
        dim_channel = to_patches(channels)[0][0].long()  # [D]: channel of each patch dimension
        mean_t = torch.as_tensor(mean, dtype=torch.float32)
        std_t = torch.as_tensor(std, dtype=torch.float32)
        self.scale = (1.0 / (255.0 * std_t))[dim_channel].numpy()  # [D]
        self.offset = (-mean_t / std_t)[dim_channel].numpy()  # [D]

    @property
    def dim(self) -> int:
        return len(self.scale)

    def __call__(self, rows: Sequence[torch.Tensor]) -> torch.Tensor:
        """uint8 patch rows of each image ([n_i, D]) -> [sum n_i, D] float32, normalised."""
        out = torch.empty(sum(r.shape[0] for r in rows), self.dim)
        flat, start = out.numpy(), 0
        for r in rows:
            part = flat[start:start + r.shape[0]]
            np.multiply(r.numpy(), self.scale, out=part)  # uint8 -> float32 in the same pass
            np.add(part, self.offset, out=part)
            start += r.shape[0]
        return out


class Packer:
    def __init__(self, micro_batch_size: int, seq_length: int, image_seq_length: int, pad_id: int,
                 image_mean: Sequence[float] = CLIP_MEAN, image_std: Sequence[float] = CLIP_STD,
                 temporal_patch_size: int = 1, fps: float = 2.0):
        self.b, self.s, self.si, self.pad_id = micro_batch_size, seq_length, image_seq_length, pad_id
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.temporal, self.fps = temporal_patch_size, fps
        self.normalizer = PatchNormalizer(self.image_mean, self.image_std,
                                          lambda im: image_to_patches(im, temporal=temporal_patch_size))
        self.stats = PackStats()

    def fits_one_row(self, sample: TokenizedSample) -> bool:
        return len(sample) <= self.s and sample.num_image_tokens <= self.si

    def assign(self, buffer: Sequence[TokenizedSample]) -> Tuple[List[List[TokenizedSample]], List[int]]:
        """First-fit: rows of samples, and the buffer indices that were placed (in buffer order)."""
        rows: List[List[TokenizedSample]] = [[] for _ in range(self.b)]
        text = [0] * self.b
        image = [0] * self.b
        placed = []
        for j, sample in enumerate(buffer):
            n_text, n_img = len(sample), sample.num_image_tokens
            for r in range(self.b):
                if text[r] + n_text <= self.s and image[r] + n_img <= self.si:
                    rows[r].append(sample)
                    text[r] += n_text
                    image[r] += n_img
                    placed.append(j)
                    break
            if min(text) == self.s:
                break
        return rows, placed

    def next_batch(self, buffer: Sequence[TokenizedSample]
                   ) -> Tuple[VLMBatch, List[SampleInfo], List[TokenizedSample]]:
        """Pack from ``buffer``: (batch, where each sample went, the samples left for later)."""
        rows, placed = self.assign(buffer)
        taken = set(placed)
        batch, infos = self.collate(rows)
        return batch, infos, [s for j, s in enumerate(buffer) if j not in taken]

    def collate(self, rows: Sequence[Sequence[TokenizedSample]]) -> Tuple[VLMBatch, List[SampleInfo]]:
        b, s = len(rows), self.s
        ids = torch.full((b, s), self.pad_id, dtype=torch.long)
        labels = torch.full((b, s), self.pad_id, dtype=torch.long)
        loss_mask = torch.zeros(b, s)
        position_ids = torch.zeros(b, s, dtype=torch.long)
        sample_starts = torch.zeros(b, s, dtype=torch.bool)
        window_starts = torch.zeros(b, s, dtype=torch.bool)
        clips, grids, image_rows, image_positions, infos = [], [], [], [], []
        grid_t, seconds = [], []
        n_text = n_img = 0
        for r, row in enumerate(rows):
            off = 0
            for sample in row:
                n = len(sample)
                ids[r, off:off + n] = torch.tensor(sample.input_ids)
                labels[r, off:off + n] = torch.tensor(sample.labels)
                loss_mask[r, off:off + n] = torch.tensor(sample.loss_mask)
                position_ids[r, off:off + n] = torch.arange(n)
                sample_starts[r, off] = window_starts[r, off] = True
                window_starts[r, [off + w for w in sample.window_starts]] = True
                for position, frames in media_groups(sample, self.temporal):  # stream order
                    clip = torch.stack([im.pixels for im in frames])  # [n, 3, H, W] uint8
                    if len(frames) == 1:  # a still image (or one frame): repeated to T frames
                        clip = clip.expand(self.temporal, -1, -1, -1)
                    clips.append(clip)
                    t = -(-clip.shape[0] // self.temporal)
                    h, w = clip.shape[2] // 14, clip.shape[3] // 14
                    n_img += t * h * w // 4  # frame pairs: half the per-frame budget
                    seconds.append(self.temporal / self.fps if len(frames) > 1 else 0.0)
                    image_rows.append(r)
                    image_positions.append(off + position)
                infos.append(SampleInfo(sample.key, r, off, n, len(sample.images), sample.kind,
                                        sample.qtype, sample.ref))
                n_text += n
                off += n
            if off < s:  # trailing padding: a block of its own, no targets
                sample_starts[r, off] = window_starts[r, off] = True
                position_ids[r, off:] = torch.arange(s - off)
        cut = [frames_to_patches(clip, temporal=self.temporal) for clip in clips]  # ([t*h*w, D] uint8, (t, h, w))
        patches = self.normalizer([rows for rows, _ in cut])  # [n_patches, D] float32
        grids = [(h, w) for _, (_, h, w) in cut]
        grid_t = [t for _, (t, _, _) in cut]
        batch = VLMBatch(
            input_ids=ids, position_ids=position_ids,
            pixel_patches=patches,  # [n_patches, D]
            image_grid_hw=torch.tensor(grids, dtype=torch.long).reshape(-1, 2),
            image_grid_t=torch.tensor(grid_t, dtype=torch.long) if self.temporal > 1 else None,
            image_second_per_grid=torch.tensor(seconds) if self.temporal > 1 else None,
            image_rows=torch.tensor(image_rows, dtype=torch.long),
            image_positions=torch.tensor(image_positions, dtype=torch.long),
            labels=labels, loss_mask=loss_mask, sample_starts=sample_starts, window_starts=window_starts,
        )
        st = self.stats
        st.batches += 1
        st.rows += b
        st.samples += sum(len(row) for row in rows)
        st.text_tokens += n_text
        st.text_slots += b * s
        st.image_tokens += n_img
        st.image_slots += b * self.si
        st.loss_tokens += int(loss_mask.sum())
        return batch, infos


def question_type_ids(infos: Sequence[SampleInfo], shape: Tuple[int, int], names: Sequence[str]) -> torch.Tensor:
    """[b, s] long: for benchmarks reporting accuracy per question type (``coarse`` / ``fine``...).

    Each packed sample's positions get the index of its ``qtype`` in ``names`` (-1 elsewhere and
    for types not listed); combine with ``loss_mask`` to score answers only. ``infos`` is the
    iterator's ``last_batch_samples``.
    """
    out = torch.full(shape, -1, dtype=torch.long)
    for info in infos:
        if info.qtype in names:
            out[info.row, info.start:info.start + info.length] = list(names).index(info.qtype)
    return out
