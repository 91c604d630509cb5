"""``python -m fx_passes <command>``: ``demo`` (the main job)."""
from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fx_passes", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="DEBUG logging of the fx_passes logger")
    commands = parser.add_subparsers(dest="command", required=True)

    from fx_passes import demo

    demo.add_arguments(commands.add_parser("demo", help="compile a tiny Qwen3.5 + LoRA with and without the pass"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s: %(message)s")
    logging.getLogger("fx_passes").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if args.command == "demo":
        return demo.run(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
