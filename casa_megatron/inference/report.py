"""Streaming results on disk: a JSON file and a PNG plot, both written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

from casa_megatron.runtime.atomic import atomic_write


def plot_series(path: Path, series: Dict[str, List[Dict]], title: str) -> None:
    """One row per metric, one line per named run: TTFT / turn latency, decode tokens/s, cache
    bytes and memory against the frame index."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: Sequence = (("ttft_s", "time to first token (ms)", 1e3), ("turn_s", "turn latency (ms)", 1e3),
                        ("turn_cpu_s", "turn CPU time (ms)", 1e3),
                        ("decode_tokens_per_s", "decode tokens/s", 1.0), ("cache_total", "cache (MiB)", 2 ** -20),
                        ("memory_bytes", "memory (MiB)", 2 ** -20))
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.2 * len(panels)), sharex=True)
    for ax, (key, label, scale) in zip(axes, panels):
        for name, frames in series.items():
            values = [(sum(f["cache_bytes"].values()) if key == "cache_total" else f[key]) * scale for f in frames]
            ax.plot([f["index"] for f in frames], values, label=name, lw=1)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[0].set_title(title, fontsize=9)
    axes[-1].set_xlabel("frame")
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
