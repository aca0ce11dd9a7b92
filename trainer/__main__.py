"""`python -m trainer MANIFEST [overrides] [--resume latest]`, e.g. under `accelerate launch -m trainer ...`."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
