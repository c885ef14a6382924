"""The `channelscope` command, the top layer: its subcommands by group (compute, serve, reports).

Bad input ends with one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import sys

from channelscope.cli import compute, reports, serve
from channelscope.cli.common import CliError
from channelscope.core.config import config


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="channelscope",
        description="Browse the MLP neurons of a language model through their vocabulary channels (ROTATE).",
    )
    sub = top.add_subparsers(dest="command", required=True)
    for group in (compute, serve, reports):
        group.add_commands(sub)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "channels", 0) is None:
        args.channels = args.default_channels
    if getattr(args, "channels", None) is not None and args.channels < 1:
        print("error: --channels must be at least 1", file=sys.stderr)
        return 2
    if hasattr(args, "device") and args.device is None:
        args.device = config().device
    if getattr(args, "uses_torch", False):  # one thread per core unless told otherwise
        from channelscope.method.precision import set_threads

        set_threads(config().threads)
    try:
        args.run(args)
    except CliError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
