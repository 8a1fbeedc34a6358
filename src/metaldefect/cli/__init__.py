"""The ``metaldefect`` command: argument parsing only; the work happens in the library.

Each command group lives in its own module exposing ``register(subparsers)``; a
command's handler takes the parsed arguments and returns an exit status.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from metaldefect.errors import MetalDefectError

# Command-group modules under metaldefect.cli, each with register(subparsers).
COMMAND_MODULES = ["data", "train", "ensemble", "refine", "evaluate", "predict", "export", "demo", "serve", "weights",
                   "features"]


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser for ``argv``: only the named command's module is imported.

    Some command modules pull in torch and timm (seconds to import); `metaldefect data stats`
    should not pay for them. Without a known command (``--help``, a typo) every module is
    registered, so the listing and argparse's error name them all.
    """
    parser = argparse.ArgumentParser(
        prog="metaldefect",
        description="Find defects on metal surface images: dataset tools, training, evaluation, inference.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    for name in [chosen] if chosen in COMMAND_MODULES else COMMAND_MODULES:
        importlib.import_module(f"metaldefect.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except MetalDefectError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `metaldefect ... | head` closed the pipe: stop quietly, as Unix tools do.
        sys.stderr.close()
        return 141


if __name__ == "__main__":
    sys.exit(main())
