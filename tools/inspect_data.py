#!/usr/bin/env python
"""Look at a run's data as training will see it: usable samples, skip reasons, formats, token
counts, what does not fit a row, and a few samples rendered with the trained tokens in [[ ]].

    python tools/inspect_data.py CONFIG [--samples 200] [--show 2] [--json OUT.json] [key=value ...]

CONFIG is a training config (configs/*.yaml); overrides as for casa-train (e.g.
data.source=my_recipe.yaml). The first --samples samples of each training source (data recipes
expanded) and of data.valid (--valid) are read, decoded and laid out by the training pipeline
itself (casa_megatron/data/inspect.py). Nothing is trained; no GPU is needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as for casa-train")
    p.add_argument("--samples", type=int, default=200, help="samples read per source (from its start)")
    p.add_argument("--show", type=int, default=2, help="samples rendered per source")
    p.add_argument("--valid", action="store_true", help="inspect data.valid instead of the training sources")
    p.add_argument("--json", help="write the per-source summaries here")
    args = p.parse_args(argv)

    from casa_megatron.config import load_config
    from casa_megatron.config.schema import ConfigError, TrainConfig
    from casa_megatron.data.inspect import inspect_sources
    from casa_megatron.data.processor import ProcessorSettings, SampleProcessor
    from casa_megatron.data.video import resolve_decoder
    from casa_megatron.runtime.atomic import atomic_write_json

    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
        data = cfg.data
        if data.is_synthetic:
            raise ConfigError("data.source is the in-memory synthetic task: nothing to inspect on disk")
        data.validate()
        specs = data.valid_specs() if args.valid else data.source_specs()
        if not specs:
            raise ConfigError("data.valid is empty")
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    settings = ProcessorSettings.from_config(data, resolve_decoder(data.decoder), cfg.model.fusion.mechanism)
    reports = inspect_sources(specs, SampleProcessor(settings), args.samples, args.show, data.index_dir)
    print(f"row budget: {data.seq_length} text / {data.image_seq_length} image tokens; layout {data.text_layout}; "
          f"fusion {cfg.model.fusion.mechanism}\n")
    for report in reports:
        s = report.summary()
        reasons = f" {s['skipped']}" if s["skipped"] else ""
        print(f"{s['source']}: {s['samples']} samples; read {s['read']}, used {s['used']}, skipped "
              f"{sum(report.skipped.values())}{reasons}, truncated to fit {s['truncated']}")
        print(f"  formats {s['formats']}")
        for name in ("text_tokens", "image_tokens", "trained_tokens"):
            print(f"  {name.replace('_', ' ')}: p50 {s[name + '_p50']}, p90 {s[name + '_p90']}, max {s[name + '_max']}")
        for line in report.first_skipped:
            print(f"  skipped: {line}")
        for shown in report.shown:
            print("  ---\n  " + shown.replace("\n", "\n  "))
        print()
    if args.json:
        atomic_write_json(args.json, {"config": args.config, "overrides": args.overrides,
                                      "sources": [r.summary() for r in reports]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
