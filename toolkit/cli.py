"""The ``toolkit`` command.

Sub-commands (``toolkit COMMAND --help`` for each):

* ``reproduce``: execute the course's notebooks and save them with their figures.
"""
from __future__ import annotations

import argparse
import sys


def _reproduce(args: argparse.Namespace) -> int:
    from toolkit.reproduce import reproduce

    reproduce(args.out, args.notebooks or None, timeout=args.timeout)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="toolkit",
        description="PatternNet and PatternAttribution: fit patterns, explain, measure, reproduce the course.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    rep = commands.add_parser("reproduce", help="execute the course's notebooks headless and save their figures",
                              description="Execute the notebooks in order; write the executed notebooks and "
                                          "every figure as PNG into --out.")
    rep.add_argument("--out", default="results", help="output folder (default: results)")
    rep.add_argument("--notebooks", nargs="*", help="notebooks to run (default: all of notebooks/)")
    rep.add_argument("--timeout", type=int, default=900, help="seconds allowed per cell (default: 900)")
    rep.set_defaults(run=_reproduce)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"toolkit {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
