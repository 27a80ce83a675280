"""``python -m fxqat`` = the ``fxqat`` command (also ``torchrun -m fxqat train ...``)."""

import sys

from fxqat.cli import main

__all__: list = []

if __name__ == "__main__":
    sys.exit(main())
