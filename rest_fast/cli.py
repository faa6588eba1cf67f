"""The ``rest-fast`` command line.

Each subcommand is a function ``_cmd_<name>(args)`` registered in :func:`build_parser`; the heavy
imports happen inside the command so ``rest-fast --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    from rest_fast.info import collect, format_info

    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from rest_fast.train.command import run_train

    return run_train(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rest-fast",
        description="REST: label-free self-training of a generative action recognizer (BLIP + temporal adapters).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p_info = sub.add_parser("info", help="versions, native extension, Triton, CUDA devices, DALI")
    p_info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p_info.set_defaults(func=_cmd_info)

    from rest_fast.train.command import add_train_arguments

    p_train = sub.add_parser("train", help="REST self-training (Algorithm 1); the CPU demo without --data")
    add_train_arguments(p_train)
    p_train.set_defaults(func=_cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `train` takes key=value overrides anywhere among its flags: argparse alone accepts positionals
    # only in one run, so the ones it leaves over are handed to the command (which validates them).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(args, "command", None) != "train" or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*(args.overrides or []), *extra]
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
