"""``python -m fastmask`` is ``python -m fastmask.train``."""
import sys

from .train import main

if __name__ == "__main__":
    sys.exit(main())
