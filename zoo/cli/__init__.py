"""`zoo` command line. Each module in this package is one subcommand, found automatically:
it defines `add_parser(subparsers)` returning its parser, and `run(args) -> int`.

Exit codes: 0 success, 2 user error or an OS error such as a missing path or a full disk (one line on
stderr; ZOO_DEBUG=1 shows the traceback),
1 internal error.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import sys
import traceback
import warnings

from zoo._version import __version__
from zoo.console import print_table as print_table  # the commands import it from here
from zoo.errors import ZooError
from zoo.recipe.loader import add_set_argument


class UsageError(ZooError):
    """Bad command-line arguments."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage dump
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="zoo", description="Language models declared in TOML from registered blocks.")
    parser.add_argument("--version", action="version", version=f"zoo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run)
    return parser


def _warning_line(message, category, filename, lineno, file=None, line=None):
    print(f"zoo: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the `zoo` command line; returns the exit code."""
    with warnings.catch_warnings():  # restores the warning printer when main returns (tests call it in-process)
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    debug = os.environ.get("ZOO_DEBUG", "") not in ("", "0")
    if not debug:
        warnings.showwarning = _warning_line
    try:
        parser = make_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "_run", None):
            parser.print_help()
            return 2
        return int(args._run(args) or 0)
    except ZooError as err:
        if debug:
            traceback.print_exc()
        print(f"zoo: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("zoo: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `zoo list | head`: stop quietly, and keep Python's exit flush from complaining
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:  # the environment, not a bug: a path the OS rejects, a full disk, no permission
        if debug:
            traceback.print_exc()
        where = f": {err.filename}" if err.filename else ""
        print(f"zoo: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except Exception:  # a bug in zoo or a plugin, not the user's mistake: show everything
        traceback.print_exc()
        print("zoo: internal error (the traceback above is a bug; please report it)", file=sys.stderr)
        return 1


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    """RECIPE and repeated --set key.path=value, shared by commands that take a recipe."""
    p.add_argument("recipe", metavar="RECIPE", help="a .toml recipe file")
    add_set_argument(p)


def add_load_args(p: argparse.ArgumentParser) -> None:
    """NAME_OR_DIR and --set, shared by the commands that load a model (eval, generate, calibrate)."""
    p.add_argument("run", metavar="NAME_OR_DIR",
                   help="a catalogue model (zoo models), a run folder (its newest checkpoint) or a checkpoint folder")
    add_set_argument(p, "a key of the model's recipe at load (the tensors must still match), e.g. a training-free "
                        "--set 'model.sparsity={kind=\"topk\", keep=0.5}';")


def print_json(obj: object) -> None:
    """One JSON document on stdout (tuples as arrays; anything else non-JSON as its str)."""
    print(json.dumps(obj, indent=2, default=str))
