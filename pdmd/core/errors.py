"""Errors in what a user gave (a recipe, an override, a path, a run directory): the commands print the
message, which says what is wrong and what to do, and exit 2 (Slurm's scripts do not retry those)."""

from __future__ import annotations


class UserError(ValueError):
    """A deterministic error in the user's input; retrying the same command cannot help."""


class ConfigError(UserError):
    """A configuration value that cannot work; the message names the key."""


class ExportError(UserError):
    """A run, checkpoint or schedule that cannot be exported as asked; the message says what to do."""


def last_line(exc: BaseException, limit: int = 300) -> str:
    """An error's last non-empty line: torch's CheckpointException carries every rank's whole traceback."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1][:limit] if lines else type(exc).__name__
