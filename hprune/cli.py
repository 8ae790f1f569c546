"""The `hprune` command: a thin shell over the library. Each subcommand lives in
hprune/commands/<name>.py with HELP, add_arguments(parser) and run(args) -> int."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys

COMMANDS = ["info", "calib", "probe", "plan", "prune", "distill", "quantize", "compress", "obs", "eval", "demo",
            "generate", "selftest"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the commands' descriptions as written and shows every option's default in --help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (action.option_strings and default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text
                and "default" not in text):
            text += (" " if text else "") + "(default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    from hprune._version import __version__

    parser = argparse.ArgumentParser(
        prog="hprune",
        description="Compress large text-to-image diffusion transformers (SD3/SD3.5, FLUX.1): "
                    "sensitivity probing, hierarchical position pruning, distillation, INT4 quantisation.")
    parser.add_argument("--version", action="version", version=f"hprune {__version__}")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for torch (default: OMP_NUM_THREADS if set, else the usable CPUs less "
                             "the machine's current load; `hprune info` shows the choice)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        mod = importlib.import_module(f"hprune.commands.{name}")
        p = sub.add_parser(name, help=mod.HELP, description=(mod.__doc__ or mod.HELP).strip(),
                           formatter_class=HelpFormatter)
        mod.add_arguments(p)
        # also after the command (`hprune demo --threads 1`); SUPPRESS keeps a value given before it
        p.add_argument("--threads", type=int, default=argparse.SUPPRESS, metavar="N",
                       help="CPU threads for torch (a global option; see `hprune --help`)")
        for action in p._actions:  # noqa: SLF001 - an option without help text still shows its default
            if action.help is None and action.option_strings and action.default not in (None, False):
                action.help = "(default: %(default)s)"
        p.set_defaults(_run=mod.run)
    return parser


def _quiet_third_party() -> None:
    """Optional-backend notices from transformers/bitsandbytes imports are noise for CLI users."""
    import logging
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    from hprune.env import check_environment
    from hprune.errors import HpruneError

    _quiet_third_party()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        from hprune.threads import apply_threads

        apply_threads(args.threads)
        check_environment()
        if getattr(args, "dry_run", False):  # every verb with --device: the memory / time plan instead
            from hprune.commands.plan_memory import print_plan

            return print_plan(args, args.command)
        out = getattr(args, "out", None)
        if out and os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 writes, and locks
            from hprune.owned import output_lock

            with output_lock(out):  # a second run on the same --out stops here, before any work
                return int(args._run(args) or 0)
        return int(args._run(args) or 0)
    except BrokenPipeError:
        # the reader went away (`hprune selftest --json | head`): stop quietly, as other tools do
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 141
    except HpruneError as exc:
        print(f"hprune: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # on a terminal a progress bar may hold the current line: start a fresh one
        print(("\n" if sys.stderr.isatty() else "") + "hprune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
