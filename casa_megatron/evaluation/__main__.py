import sys

from casa_megatron.evaluation.cli import main

sys.exit(main())
