"""Our Qwen2.5-VL vision encoder vs transformers' at the real width, on one process.

Builds transformers' vision tower with Qwen2.5-VL-3B's vision config (random weights; ``--layers``
blocks instead of 32 to fit a CPU budget: the cost per block is the same), loads it into our
encoder + projector through the conversion table, and times both on the same micro-batch (two
images and a 4-frame clip): output difference, seconds per forward, peak RSS. Writes JSON.

    python benchmarks/vision_encoder.py --layers 8 --json benchmarks/results/vision_encoder_cpu.json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # support.qwen_vision

from casa_megatron.runtime.atomic import atomic_write_json  # noqa: E402

# Qwen/Qwen2.5-VL-3B-Instruct vision_config (hub config.json); depth comes from --layers.
QWEN25VL_3B_VISION = dict(hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=2048,
                          window_size=112, patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
                          tokens_per_second=2, in_channels=3, hidden_act="silu")
# (t, h, w) in patches: a 448x448 image, a 224x336 image, a 4-frame 224x224 clip.
GRID = torch.tensor([[1, 32, 32], [1, 16, 24], [2, 16, 16]])


def _run(rank, world, layers: int, repeats: int, dtype: str, threads: int):
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    from casa_megatron.config import LanguageModelConfig, ModelConfig, VisionConfig
    from casa_megatron.conversion.hf_configs.vision import vision_config_from_hf
    from casa_megatron.parallel import initialize_parallel
    from casa_megatron.parallel.tp_layout import load_full_state
    from support.qwen_vision import VisionStack, hf_to_megatron

    torch.set_num_threads(threads)
    full = list(range(layers // 4 - 1, layers, layers // 4)) if layers >= 4 else [layers - 1]
    hf_cfg = Qwen2_5_VLVisionConfig(depth=layers, fullatt_block_indexes=full, **QWEN25VL_3B_VISION)
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    hf = Qwen2_5_VisionTransformerPretrainedModel(hf_cfg).to(dt).eval()
    vision = VisionConfig(**vision_config_from_hf(hf_cfg.to_dict()))
    cfg = ModelConfig(lm=LanguageModelConfig(vocab_size=64, num_layers=1, hidden_size=2048, num_attention_heads=16,
                                             num_query_groups=2, ffn_hidden_size=64),
                      vision=vision, transformer_impl="local")
    initialize_parallel(1, 1, seed=0)
    ours = VisionStack(cfg, tp=1, params_dtype=dt).eval()
    names = [n for n, _ in ours.named_parameters()]
    load_full_state(ours, hf_to_megatron(names, cfg, {f"visual.{k}": v for k, v in hf.state_dict().items()}), 0, 1)
    pixels = torch.randn(int(GRID.prod(1).sum()), vision.patch_dim, generator=torch.Generator().manual_seed(1)).to(dt)

    def timed(fn):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            with torch.no_grad():
                out = fn()
            times.append(time.perf_counter() - start)
        return out, min(times)

    ref, t_hf = timed(lambda: hf(pixels, grid_thw=GRID).pooler_output)
    got, t_ours = timed(lambda: ours(pixels, GRID))
    extra = {}
    if dt != torch.float32:  # how far each low-precision run is from the fp32 result
        with torch.no_grad():
            exact = hf.float()(pixels.float(), grid_thw=GRID).pooler_output
        extra = {"transformers_vs_fp32": (ref.float() - exact).abs().max().item(),
                 "ours_vs_fp32": (got.float() - exact).abs().max().item()}
    return {"layers": layers, "dtype": dtype, "patches": int(GRID.prod(1).sum()), "tokens": got.shape[0],
            "max_abs_diff": (got.float() - ref.float()).abs().max().item(), **extra,
            "ref_abs_max": ref.float().abs().max().item(),
            "seconds_transformers": t_hf, "seconds_ours": t_ours, "threads": torch.get_num_threads(),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main(argv=None) -> int:
    from support.dist import run_distributed

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    result = run_distributed(_run, world_size=1, layers=args.layers, repeats=args.repeats, dtype=args.dtype,
                             threads=args.threads)[0]
    print(json.dumps(result, indent=1))
    if args.json:
        atomic_write_json(args.json, result, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
