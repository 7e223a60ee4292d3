"""Errors a user can act on: each message says what was wrong and what to do instead."""

from __future__ import annotations


class DreamboothError(Exception):
    """A problem with the user's input or environment, explained in one paragraph."""


class ConfigError(DreamboothError):
    """One or more options are invalid; lists every bad field with its value."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"The configuration has {len(self.problems)} invalid field(s):\n{lines}")


class MissingFeatureError(DreamboothError):
    """An option needs a package or device that is not available here."""


class CancelledError(DreamboothError):
    """The run was cancelled by the user; its state was saved and it can be resumed."""
