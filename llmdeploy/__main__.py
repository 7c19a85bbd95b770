"""``python -m llmdeploy``: the same command line as the ``llmdeploy`` script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
