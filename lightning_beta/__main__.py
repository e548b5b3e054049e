"""``python -m lightning_beta``: the same command line as ``lightning-beta``."""

import sys

from lightning_beta.cli import main

if __name__ == "__main__":
    sys.exit(main())
