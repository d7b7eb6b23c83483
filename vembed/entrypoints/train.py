"""Target of `accelerate launch vembed/entrypoints/train.py CONFIG [--config_override ...]`."""

import sys

from vembed.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
