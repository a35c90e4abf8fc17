"""Every subcommand, given missing or invalid arguments or paths, exits 2 with one line on stderr.

Subcommands (and nested ones such as `zoo bench NAME`) are discovered from the parser, so a
command added later is covered without touching this file. Each case must fail fast: the
arguments are invalid by construction, so no command may start real work.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import signal
from pathlib import Path

import pytest

from zoo.cli import main, make_parser

OUTPUT_METAVARS = {"OUT", "PNG"}  # where a command writes; these get a fresh path, never the only bad argument
FAIL_FAST_S = 60  # generous on a contended machine; a command that starts training takes far longer


def leaf_parsers() -> list[tuple[list[str], argparse.ArgumentParser]]:
    """(argv prefix, parser) for every runnable (sub)command, nested ones included."""
    out = []

    def walk(prefix: list[str], parser: argparse.ArgumentParser) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if prefix:
            out.append((prefix, parser))
        for action in subs:
            for name, child in action.choices.items():
                walk([*prefix, name], child)

    walk([], make_parser())
    return out


def _user_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    skip = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)
    return [a for a in parser._actions if not isinstance(a, skip)]


def _is_output(action: argparse.Action) -> bool:
    return (action.metavar or "").upper() in OUTPUT_METAVARS or action.dest in ("out", "plot")


def _takes_path(action: argparse.Action) -> bool:
    """A string-valued argument without choices: a path, a recipe, a name, a pattern."""
    return action.nargs != 0 and action.type is None and not action.choices


@pytest.fixture(scope="module")
def junk(tmp_path_factory) -> dict[str, str]:
    """Bad inputs on disk: missing, folder, binary, malformed TOML, empty, half a checkpoint."""
    d = tmp_path_factory.mktemp("junk")
    (d / "empty_dir").mkdir()
    (d / "binary.toml").write_bytes(b"\x00\xff\xfe\x81" * 64)
    (d / "malformed.toml").write_text("[model\nd_model = = 3\n")
    (d / "empty.toml").write_text("")
    (d / "wrong.toml").write_text("[model]\nd_modle = 64\n")
    ckpt = d / "half_checkpoint"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    return {
        "missing": str(d / "missing"),
        "folder": str(d / "empty_dir"),
        "binary": str(d / "binary.toml"),
        "malformed": str(d / "malformed.toml"),
        "wrong key": str(d / "wrong.toml"),
        "half checkpoint": str(ckpt),
        "unicode": str(d / "ünï\u200bcødé☃"),
        "too long": str(d / ("x" * 400)),
        "dash": "-",
    }


class _TooSlow(Exception):
    pass


def run_cli(argv: list[str]) -> tuple[int, str]:
    """Run `zoo argv` in-process; (exit code, stderr). A command that does not fail fast fails the test."""
    err = io.StringIO()

    def alarm(signum, frame):
        raise _TooSlow

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(FAIL_FAST_S)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv)
            except SystemExit as exit_:  # argparse's --help/--version paths; never expected here
                code = exit_.code
    except _TooSlow:
        pytest.fail(f"zoo {' '.join(argv)} did not fail within {FAIL_FAST_S}s: invalid input started work")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return code, err.getvalue()


def assert_one_line_error(argv: list[str]) -> None:
    code, err = run_cli(argv)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("zoo: warning:")]
    shown = f"zoo {' '.join(argv)!r} -> exit {code}, stderr:\n{err}"
    assert code == 2, shown
    assert len(lines) == 1 and lines[0].startswith("zoo"), shown
    assert "Traceback" not in err, shown


def argv_with(prefix: list[str], required: list[argparse.Action], bad: argparse.Action | None, value: str,
              junk: dict[str, str], tmp: Path) -> list[str]:
    """All required arguments, each input a bad path (so the command cannot start), and `bad` = value."""
    argv = list(prefix)
    for a in required + ([bad] if bad is not None and bad not in required else []):
        v = value if a is bad else str(tmp / "fresh") if _is_output(a) else junk["missing"]
        if a.choices and a is not bad:
            v = str(next(iter(a.choices)))
        argv += ([a.option_strings[0]] if a.option_strings else []) + [v]
    return argv


def cases(junk: dict[str, str], tmp: Path) -> list[list[str]]:
    """argv lists that are invalid by construction, for every (sub)command."""
    out = []
    for prefix, parser in leaf_parsers():
        actions = _user_actions(parser)
        required = [a for a in actions if a.required or (not a.option_strings and a.nargs not in ("?", "*"))]
        if required:
            out.append(prefix)  # nothing given

        def fill(bad: argparse.Action | None, value: str, prefix=prefix, required=required) -> list[str]:
            return argv_with(prefix, required, bad, value, junk, tmp)

        inputs = [a for a in actions if _takes_path(a) and not _is_output(a)]
        if required and not any(a in inputs for a in required):
            continue  # only outputs are required: a fresh output path would be valid and start work
        for a in inputs:
            out += [fill(a, v) for k, v in junk.items() if a.required or not a.option_strings or k != "dash"]
        if not inputs and not required:
            continue  # nothing can be made invalid but the unknown option below
        for a in actions:
            if a.type in (int, float):
                out += [fill(a, "not-a-number"), fill(a, "")]
            if a.choices and a.option_strings:
                out.append(fill(a, "no-such-choice"))
        out.append([*fill(None, ""), "--no-such-option"])
    for prefix, parser in leaf_parsers():
        if not any(a.required or not a.option_strings for a in _user_actions(parser)):
            out.append([*prefix, "--no-such-option", "1"])
    out += [["no-such-command"], ["trian"]]
    return out


def test_cli_discovers_every_subcommand():
    names = {tuple(p) for p, _ in leaf_parsers()}
    for cmd in ("train", "build", "show", "eval"):
        assert (cmd,) in names


def test_invalid_arguments_exit_2_with_one_line(junk, tmp_path):
    argvs = cases(junk, tmp_path)
    assert len(argvs) > 100
    for argv in argvs:
        assert_one_line_error(argv)
