"""The `qdq` command: parse, delegate, print one-line errors (exit code 2 on bad input)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from qdq.errors import QdqError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qdq", description="Quantize networks to integers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="calibrate every observer on real digit images")
    demo.add_argument("--data", help="an .npz with an 'images' array (default: bundled digits)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        if args.command == "demo":
            from qdq.demo import run_demo

            print(run_demo(args.data))
    except (QdqError, OSError) as error:
        print(f"qdq: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
