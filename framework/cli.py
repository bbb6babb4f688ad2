"""The `msa` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from framework import __version__

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msa",
        description="msa-framework: run and inspect event-driven microservices.",
    )
    parser.add_argument("--version", action="version", version=f"msa-framework {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
