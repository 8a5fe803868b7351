"""``casa-train CONFIG [key=value ...]`` (also ``python -m casa_megatron.train``).

Runs as one process, or under ``torchrun`` on one or many nodes.
"""

from __future__ import annotations

import sys
from typing import List, Optional

from casa_megatron.config import load_config
from casa_megatron.config.schema import ConfigError, TrainConfig


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    try:
        cfg = load_config(TrainConfig, argv[0], argv[1:])
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    from casa_megatron.training.loop import train

    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
