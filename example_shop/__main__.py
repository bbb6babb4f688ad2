"""`python -m example_shop [load] [--real] [--port N]`: the same as `msa shop`."""

import sys

from framework.cli import main

if __name__ == "__main__":
    sys.exit(main(["shop", *sys.argv[1:]]))
