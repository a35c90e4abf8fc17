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
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

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
    if os.environ.get("RANK", "0") == "0":  # launched on several processes: rank 0's warnings stand for all
        print(f"zoo: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the `zoo` command line; returns the exit code."""
    with warnings.catch_warnings():  # restores the warning printer when main returns (tests call it in-process)
        return guarded(lambda: _command(argv))


def _command(argv: list[str] | None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


def guarded(command: Callable[[], int], launched: bool = False) -> int:
    """Run `command()` and turn what it raises into zoo's exit codes and error lines (module docstring).

    `launched`: one rank of `zoo train --nproc-per-node`, which prints nothing about an error (the launcher
    reports the failed rank's, see `report`)."""
    debug = os.environ.get("ZOO_DEBUG", "") not in ("", "0")
    if not debug:
        warnings.showwarning = _warning_line
    try:
        return command()
    except ZooError as err:
        return report(2, f"zoo: error: {err}", debug, launched)
    except KeyboardInterrupt:
        return report(130, "zoo: interrupted", False, launched)
    except BrokenPipeError:  # `zoo list | head`: stop quietly, and keep Python's exit flush from complaining
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:  # the environment, not a bug: a path the OS rejects, a full disk, no permission
        where = f": {err.filename}" if err.filename else ""
        return report(2, f"zoo: error: {err.strerror or err}{where}", debug, launched)
    except Exception:  # a bug in zoo or a plugin, not the user's mistake: show everything
        return report(1, "zoo: internal error (the traceback above is a bug; please report it)", True, launched)


def report(code: int, line: str, with_traceback: bool, launched: bool) -> int:
    """Say why the command failed (`line`, after the traceback being handled when asked); return `code`.

    On a rank of a launch on several processes (torchrun, `zoo train --nproc-per-node`) the text also goes
    into the rank's torch.distributed.elastic error file, from which the launcher reports the failed rank.
    There rank 0 alone prints a user error (every rank usually makes the same one; torchrun's report shows
    another rank's own), and a rank of zoo's launcher prints nothing (zoo.train.launch prints it, once)."""
    text = (traceback.format_exc() if with_traceback else "") + line
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):  # torchelastic's format, and zoo's fields for zoo.train.launch
        now = time.time()
        record = {"message": {"message": line, "extraInfo": {"py_callstack": text, "timestamp": str(int(now))}},
                  "zoo": {"text": text, "exitcode": code, "time": now}}
        Path(os.environ["TORCHELASTIC_ERROR_FILE"]).write_text(json.dumps(record))
    if not launched and (code == 1 or os.environ.get("RANK", "0") == "0"):
        print(text, file=sys.stderr)
    return code


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
