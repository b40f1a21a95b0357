"""Errors that are the user's to fix, and how the command line reports them.

A `UserError` says what was wrong with what the user typed or fed in (a config value, a
flag, a path, a data record, a checkpoint that does not fit) and what to do about it.
`mmelectra` prints it as one line and exits with status 2; any other exception is a bug
(or an environment failure) and keeps its traceback.

Each class also derives from the builtin a caller would catch (ValueError,
FileNotFoundError, ...), so library callers keep working with plain `except ValueError`.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(Exception):
  """Something the user gave is wrong; the message says what and how to fix it."""


class InvalidInput(UserError, ValueError):
  """A config value, flag, file or record that is not valid."""


class NotFound(UserError, FileNotFoundError):
  """A path the user named (workdir, checkpoint, data file) does not exist or holds nothing usable."""


class TrainingDiverged(UserError, FloatingPointError):
  """Training stopped after too many non-finite steps in a row."""


class StorageError(UserError, OSError):
  """Writing a run's files failed (a full disk, a lost bucket); nothing committed is lost."""


class MissingEntry(UserError, KeyError):
  """A name the user gave (a split, a special token) is not among those available."""

  def __str__(self) -> str:  # KeyError's own str() wraps the message in quotes
    return str(self.args[0]) if self.args else ""
