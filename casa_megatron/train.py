"""``casa-train CONFIG [key=value ...]`` (also ``python -m casa_megatron.train``).

Runs as one process, or under ``torchrun`` on one or many nodes. Ctrl-C or SIGTERM: the step in
flight finishes and a checkpoint is written (Ctrl-C twice: exit at once). Run it again to
resume. ``skip_train=true``: score the checkpoint it would resume from (or
``checkpoint.pretrained``) on ``data.valid`` / ``eval_generation.data`` without a step.
``CASA_LOG_LEVEL=DEBUG`` for more detail. See docs/training.md.
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional

from casa_megatron.config import load_config
from casa_megatron.config.schema import ConfigError, TrainConfig
from casa_megatron.runtime import RunDirBusy, filter_startup_warnings, setup_logging

EXIT_CONFIG, EXIT_REFUSED, EXIT_FAILED, EXIT_INTERRUPTED = 2, 3, 4, 130


def _say(message: str) -> None:
    """One line on stderr, from global rank 0 only (every rank raises the same refusal)."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    try:
        cfg = load_config(TrainConfig, argv[0], argv[1:])
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    filter_startup_warnings()
    setup_logging(int(os.environ.get("RANK", "0")))
    from casa_megatron.data.records import ShardError
    from casa_megatron.training import loop
    from casa_megatron.training.checkpoint import CheckpointError
    from casa_megatron.training.failures import RunFailed

    try:
        loop.train(cfg)
    except ConfigError as exc:  # includes a checkpoint written by another model (ResumeMismatch)
        _say(f"config error: {exc}")
        return EXIT_CONFIG
    except (RunDirBusy, CheckpointError) as exc:
        _say(f"error: {exc}")
        return EXIT_REFUSED
    except ShardError as exc:  # the dataset itself is unusable (named in the message)
        _say(f"data error: {exc}")
        return EXIT_REFUSED
    except RunFailed as exc:  # diverged, or a background checkpoint write failed: checkpoints intact
        print(f"error: {exc}", file=sys.stderr, flush=True)  # every failing rank: the cause may be one rank's
        return EXIT_FAILED
    except KeyboardInterrupt:
        _say("interrupted: exited at once, without a checkpoint; the last complete one is the resume point")
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
