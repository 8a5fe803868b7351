"""Part (a): every available window-attention kernel against the float32 torch reference.

Three window patterns, each forward and backward (dq, dk, dv of a random upstream gradient):
``casa`` (more keys than queries, causal aligned bottom-right: images first, then causal text),
``cross_attention`` (no causal mask, some windows without keys: their queries must give exact
zeros) and ``self_attention`` (queries == keys per packed sample, causal). The reference is the
padded torch backend in float32 on the same inputs upcast; every kernel runs in bf16 on the GPU
(the torch backend runs in bf16 too, on whatever device there is). Error: ||out - ref|| / ||ref||;
bf16 passes at <= 2e-2 (bf16 operands land between 1e-3 and 1e-2). A kernel that is not
installed, or needs CUDA where there is none, is listed as not available with the reason.
"""

from __future__ import annotations

import torch

from benchmarks.gpu_parts.common import PartResult, median, rel_err, time_it

BF16_TOL = 2e-2
KERNELS = ("torch", "flash", "te", "torch_varlen")


def _shape(on_gpu: bool) -> dict:
    if on_gpu:  # a paper-like CASA window: 128 text tokens after a 1280-token image, GQA 16/8, d=128
        return dict(windows=16, text=128, image=1280, hq=16, hkv=8, d=128, repeats=10)
    return dict(windows=4, text=12, image=20, hq=4, hkv=2, d=32, repeats=3)


def _patterns(shape: dict, g: torch.Generator):
    """pattern -> (q_lens, kv_lens, causal): lengths vary per window, some windows keyless."""
    w, t, i = shape["windows"], shape["text"], shape["image"]
    q_lens = [max(1, t - 3 * k) for k in range(w)]
    img = [i if k % 3 else i // 2 for k in range(w)]
    return {
        "casa": (q_lens, [q + m for q, m in zip(q_lens, img)], True),
        "cross_attention": (q_lens, [0 if k % 4 == 1 else m for k, m in enumerate(img)], False),
        "self_attention": (q_lens, list(q_lens), True),
    }


def _availability(name: str, device: torch.device) -> str:
    """'' when the kernel can run here, else the reason."""
    from casa_megatron.model.kernels import flash_available, te_available, torch_varlen_available

    if name == "torch":
        return ""
    if device.type != "cuda":
        return "needs a CUDA GPU"
    installed = {"flash": flash_available, "te": te_available, "torch_varlen": torch_varlen_available}[name]()
    if not installed:
        return {"flash": "flash-attn is not installed", "te": "Transformer Engine is not installed",
                "torch_varlen": f"torch {torch.__version__} has no torch.nn.attention.varlen"}[name]
    return ""


def run() -> PartResult:
    from casa_megatron.model.kernels import window_attention

    result = PartResult("a", "Window-attention kernels vs the float32 torch reference")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    shape = _shape(device.type == "cuda")
    g = torch.Generator().manual_seed(0)
    rows, unavailable = [], {}
    for pattern, (q_lens, kv_lens, causal) in _patterns(shape, g).items():
        cu_q = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
        cu_k = torch.tensor([0] + torch.tensor(kv_lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
        if pattern == "self_attention":
            cu_k = cu_q  # the same tensor, as packed self-attention passes it
        args = (cu_q, cu_k, max(q_lens), max(kv_lens))
        q = torch.randn(sum(q_lens), shape["hq"], shape["d"], generator=g)
        k = torch.randn(sum(kv_lens), shape["hkv"], shape["d"], generator=g)
        v = torch.randn(sum(kv_lens), shape["hkv"], shape["d"], generator=g)
        grad = torch.randn(q.shape, generator=g)
        ref, ref_grads = _run(window_attention, "torch", q, k, v, grad, args, causal, torch.float32, device)
        for name in KERNELS:
            why = _availability(name, device)
            if why:
                unavailable[name] = why
                continue
            out, grads = _run(window_attention, name, q, k, v, grad, args, causal, torch.bfloat16, device)
            errors = {"out": rel_err(out, ref), **{f"d{x}": rel_err(a, b) for x, a, b in zip("qkv", grads, ref_grads)}}
            timing = time_it(lambda: _run(window_attention, name, q, k, v, grad, args, causal,
                                          torch.bfloat16, device, keep=False), shape["repeats"])
            rows.append({"kernel": name, "pattern": pattern, **errors, "max_err": max(errors.values()),
                         "fwd_bwd_ms": 1e3 * median(timing), "within_bf16_tol": max(errors.values()) <= BF16_TOL})
    result.data = {"shape": shape, "device": str(device), "rows": rows, "not_available": unavailable,
                   "tolerance": BF16_TOL}
    ok = all(r["within_bf16_tol"] for r in rows)
    result.targets = {"every kernel within bf16 tolerance": {"value": ok, "target": f"rel err <= {BF16_TOL}",
                                                             "met": ok}}
    result.markdown = _markdown(result.data)
    if not ok:
        result.status, result.reason = "failed", "a kernel is outside the bf16 tolerance"
    return result


def _run(window_attention, backend, q, k, v, grad, args, causal, dtype, device, keep=True):
    qq, kk, vv = (x.detach().to(device=device, dtype=dtype, copy=True).requires_grad_() for x in (q, k, v))
    out = window_attention(qq, kk, vv, *args, causal_bottom_right=causal, backend=backend)
    out.backward(grad.to(device, dtype))
    if not keep:
        return None
    return out.float().cpu(), [x.grad.float().cpu() for x in (qq, kk, vv)]


def _markdown(data: dict) -> str:
    s = data["shape"]
    lines = [f"Device: {data['device']}. Shape: {s['windows']} windows, {s['text']} text queries "
             f"(fewer in later windows), {s['image']} image keys per CASA window, {s['hq']} query / "
             f"{s['hkv']} KV heads, head_dim {s['d']}; bf16 vs the float32 torch reference "
             f"(rel. error, tolerance {data['tolerance']}); time = forward + backward, median.", "",
             "| kernel | pattern | out | dq | dk | dv | fwd+bwd (ms) | ok |", "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['kernel']} | {r['pattern']} | {r['out']:.2e} | {r['dq']:.2e} | {r['dk']:.2e} | "
                     f"{r['dv']:.2e} | {r['fwd_bwd_ms']:.2f} | {'yes' if r['within_bf16_tol'] else '**no**'} |")
    for name, why in data["not_available"].items():
        lines.append(f"\n- `{name}`: not available ({why})")
    return "\n".join(lines)
