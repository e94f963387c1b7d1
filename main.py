"""Entry point with the specification's flags: ``python main.py --model ... --prune_method ...``."""

import sys

from grail.cli import main

if __name__ == "__main__":
    sys.exit(main())
