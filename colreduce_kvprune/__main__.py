"""`python -m colreduce_kvprune run …` — the same as the `colreduce-kvprune` command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
