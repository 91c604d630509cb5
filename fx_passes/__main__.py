"""``python -m fx_passes <command>``: ``demo`` (the main job), ``dump`` (a debugging folder of graphs + report)."""
from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fx_passes", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="DEBUG logging of the fx_passes logger")
    commands = parser.add_subparsers(dest="command", required=True)

    from fx_passes import demo, dump

    demo.add_arguments(commands.add_parser("demo", help="compile a tiny Qwen3.5 + LoRA with and without the pass"))
    dump.add_arguments(commands.add_parser(
        "dump", help="compile the tiny Qwen3.5 + LoRA with the pass and write one folder: depyf's decompiled "
                     "code, the graph before/after the pass per graph, report.txt + report.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s: %(message)s")
    logging.getLogger("fx_passes").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if args.command == "demo":
        return demo.run(args)
    if args.command == "dump":
        return dump.run(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
