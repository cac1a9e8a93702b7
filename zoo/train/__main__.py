"""``python -m zoo.train ...`` and ``torchrun --nproc-per-node N -m zoo.train ...``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
