import sys

from casa_megatron.conversion.cli import main

sys.exit(main())
