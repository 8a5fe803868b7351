#!/usr/bin/env python
"""``casa-train`` from the code snapshot this file sits in (used by ``slurm.sbatch``).

``python -m casa_megatron.train`` would import the package from the current directory first,
i.e. from the live checkout when the job runs in its submit directory; running this file puts
the snapshot first instead, and leaves the current directory (where relative config paths
resolve) alone.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from casa_megatron.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
