"""The ``sparsetrain`` command. Each subcommand builds a config and calls one public function."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from ..errors import SparsetrainError
from ..run import Terminated
from ..threads import request_threads
from . import commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsetrain",
        description="Sparse neural networks from the start: SNIP pruning at initialization, "
        "masked training, recorded and resumable runs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_flags, _) in commands.COMMANDS.items():
        add_flags(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded beside results
    try:
        request_threads(getattr(args, "threads", None))  # --threads, where the command has it
        code = commands.COMMANDS[args.command][2](args) or 0
        sys.stdout.flush()  # a closed pipe fails here, inside the handler below, not at exit
        return code
    except SparsetrainError as err:
        print(f"sparsetrain {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print("\ninterrupted: the run is kept and resumes from its last checkpoint when started again",
              file=sys.stderr)
        # the shell's convention: 128 + the signal's number (SIGTERM 15, SIGINT 2)
        return 128 + (signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT)
    except BrokenPipeError:
        # the reader went away (`sparsetrain runs show KEY | head`): nothing is wrong with the
        # command; point stdout at /dev/null so that the interpreter's final flush stays silent
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
