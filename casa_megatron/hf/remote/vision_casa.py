"""Vision towers of the exported model: pixel patches -> image tokens at the LM width.

``tiny_vit`` re-implements casa_megatron's small megatron ViT and its 2x2 patch-merger projector
in plain torch (remote code cannot import the framework): linear patch embedding with bias over
flattened 14 px patches, fixed 2D sin-cos positions, bidirectional attention inside each image,
RMSNorm + SwiGLU blocks with biases, a final RMSNorm, then ``merger`` (``ln_q``, 4 consecutive
patches concatenated, GELU MLP). Patches arrive merge-group first, so the merge is a reshape.

``qwen2_5_vl`` is transformers' own Qwen2.5-VL vision tower (its merger included): the weights a
Qwen2.5-VL user knows, under the same ``visual.*`` names.

Both return one tensor ``[n_tokens, hidden]`` for all images, in input order.
"""

from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn


def sincos_2d(rows: torch.Tensor, cols: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed 2D sin-cos position features [n, dim] (the framework's TinyViT positions)."""
    quarter = dim // 4
    freq = torch.exp(-math.log(10000.0) * torch.arange(quarter, dtype=torch.float32) / quarter)
    parts = []
    for coord in (rows, cols):
        angle = coord.float()[:, None] * freq[None]
        parts += [angle.sin(), angle.cos()]
    out = torch.cat(parts, dim=-1)
    return F.pad(out, (0, dim - out.shape[-1]))


def patch_coords(grid_hw: torch.Tensor, merge: int):
    """Row and column of every patch in merge-group-first order, and the patches per image."""
    rows, cols, sizes = [], [], []
    for h, w in grid_hw.tolist():
        if h % merge or w % merge:
            raise ValueError(f"image patch grid {h}x{w} is not a multiple of the {merge}x{merge} merge")
        gi, gj, di, dj = torch.meshgrid(torch.arange(h // merge), torch.arange(w // merge),
                                        torch.arange(merge), torch.arange(merge), indexing="ij")
        rows.append((gi * merge + di).flatten())
        cols.append((gj * merge + dj).flatten())
        sizes.append(h * w)
    return torch.cat(rows), torch.cat(cols), sizes


class TinyVitAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=True)
        self.proj = nn.Linear(hidden, hidden, bias=True)

    def forward(self, x: torch.Tensor, sizes) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.heads, self.head_dim).permute(1, 2, 0, 3)  # 3 x [H, n, d]
        outs = []
        start = 0
        for size in sizes:  # attention stays inside each image
            sl = slice(start, start + size)
            outs.append(F.scaled_dot_product_attention(q[:, sl], k[:, sl], v[:, sl]))
            start += size
        out = torch.cat(outs, dim=1).transpose(0, 1).reshape(n, -1)  # [n, hidden]
        return self.proj(out)


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TinyVitBlock(nn.Module):
    def __init__(self, cfg: Dict):
        super().__init__()
        hidden = cfg["hidden_size"]
        self.norm1 = nn.RMSNorm(hidden, eps=cfg["rms_norm_eps"])
        self.attn = TinyVitAttention(hidden, cfg["num_heads"])
        self.norm2 = nn.RMSNorm(hidden, eps=cfg["rms_norm_eps"])
        self.mlp = GatedMLP(hidden, cfg["intermediate_size"], bias=True)

    def forward(self, x: torch.Tensor, sizes) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), sizes)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, hidden, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class PatchMerger(nn.Module):
    """ln_q, then every ``merge**2`` consecutive patches concatenated, then Linear-GELU-Linear."""

    def __init__(self, vision_hidden: int, out_hidden: int, merge: int, eps: float):
        super().__init__()
        self.group = merge * merge
        self.ln_q = nn.RMSNorm(vision_hidden, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(vision_hidden * self.group, out_hidden), nn.GELU(),
                                 nn.Linear(out_hidden, out_hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).reshape(-1, x.shape[-1] * self.group))


class TinyVit(nn.Module):
    """pixel patches [n, C*p*p] (merge-group first) + grid [n_img, 3] (t, h, w) -> [n/4, out]."""

    def __init__(self, cfg: Dict, out_hidden: int):
        super().__init__()
        hidden, self.merge = cfg["hidden_size"], cfg["spatial_merge_size"]
        self.patch_embed = PatchEmbed(cfg["in_channels"] * cfg["patch_size"] ** 2, hidden)
        self.blocks = nn.ModuleList([TinyVitBlock(cfg) for _ in range(cfg["depth"])])
        self.final_norm = nn.RMSNorm(hidden, eps=cfg["rms_norm_eps"])
        self.merger = PatchMerger(hidden, out_hidden, self.merge, cfg["rms_norm_eps"])

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        grid_hw = grid_thw[:, 1:] if grid_thw.shape[-1] == 3 else grid_thw
        if bool((grid_thw[:, 0] != 1).any()) and grid_thw.shape[-1] == 3:
            raise ValueError("tiny_vit encodes single frames: image_grid_thw[:, 0] must be 1")
        rows, cols, sizes = patch_coords(grid_hw.cpu(), self.merge)
        if pixel_values.shape[0] != sum(sizes):
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches but image_grid_thw "
                             f"describes {sum(sizes)}")
        x = self.patch_embed(pixel_values.to(self.patch_embed.proj.weight.dtype))  # [n, hv]
        x = x + sincos_2d(rows, cols, x.shape[-1]).to(device=x.device, dtype=x.dtype)
        for block in self.blocks:
            x = block(x, sizes)
        return self.merger(self.final_norm(x))  # [n/4, h]


QWEN_VISION_FIELDS = ("depth", "hidden_size", "hidden_act", "intermediate_size", "num_heads", "in_channels",
                      "patch_size", "spatial_merge_size", "temporal_patch_size", "tokens_per_second",
                      "window_size", "fullatt_block_indexes", "initializer_range", "rope_parameters")


def build_vision(cfg: Dict, out_hidden: int) -> nn.Module:
    """``tiny_vit``: our re-implementation. ``qwen2_5_vl``: transformers' own Qwen2.5-VL tower
    (its parameters keep the hub names ``visual.patch_embed / blocks / merger``)."""
    if cfg["encoder"] == "tiny_vit":
        return TinyVit(cfg, out_hidden)
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    fields = {k: v for k, v in cfg.items() if k in QWEN_VISION_FIELDS}
    # transformers types it int; the tower itself never reads it (the text side's mrope step does)
    fields.pop("tokens_per_second", None)
    return Qwen2_5_VisionTransformerPretrainedModel(Qwen2_5_VLVisionConfig(**fields, out_hidden_size=out_hidden))


def encode_images(visual: nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """All images -> image tokens [n_tokens, h] in input order, whichever the tower."""
    if isinstance(visual, TinyVit):
        return visual(pixel_values, grid_thw)
    out = visual(pixel_values.to(visual.dtype), grid_thw=grid_thw)
    return out.pooler_output if hasattr(out, "pooler_output") else out
