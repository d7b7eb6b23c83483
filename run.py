"""`python run.py CONFIG [--config_override k=v ...]` is `vembed train CONFIG ...`."""

import sys

from vembed.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
