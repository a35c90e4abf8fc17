"""The errors a user can cause. Each carries one line that names the place and what is valid."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ZooError(Exception):
    """A user mistake: the CLI prints its message on one line and exits 2."""


class RecipeError(ZooError):
    """A recipe that cannot be read or does not validate.

    `file` is the TOML file (or "<overrides>"), `path` the dotted key path.
    """

    def __init__(self, message: str, *, file: str | None = None, path: str | None = None):
        self.file, self.path, self.reason = file, path, message
        where = ":".join(p for p in (file, path) if p)
        super().__init__(f"{where}: {message}" if where else message)


class CheckpointError(ZooError):
    """A checkpoint folder that is missing, corrupt, or does not match its recipe."""


class PluginError(ZooError):
    """A plugin that cannot be loaded or registers something invalid."""


class PluginCollisionError(PluginError):
    """Two plugins registered the same slot.kind: never resolved silently, the message names both."""


class UnknownNameError(ZooError):
    """A registry look-up of a slot or kind that does not exist."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' (did you mean "x"?)' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


def one_of(choices: Iterable[str]) -> str:
    """'one of: a, b, c' for an error message."""
    return "one of: " + ", ".join(sorted(str(c) for c in choices))
