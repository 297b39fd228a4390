"""The errors a user can fix, at the bottom of the package: every module may raise them.

Each subclasses `UserError` (so does `input_pipeline.DataLayoutError`, which is also the dataset
builder's `tfds_mvtec.DatasetLayoutError`). The command lines (`cli.friendly_errors`) catch that
one base, print the message as one line (`grad_jax: error: ...`) and exit with status 2. Each
also subclasses the built-in error a caller would expect (ValueError, FileNotFoundError, ...),
so `except ValueError` keeps working in Python code. Messages name the file or key and the fix.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (a file, a flag, a config value); the message says how."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message names the key and the fix."""


class MissingFileError(UserError, FileNotFoundError):
    """A file the user named (config, weights, checkpoint) is not there."""


class DataNotFoundError(UserError, FileNotFoundError):
    """The configured data is not there; the message says what to download and where."""


class ConversionError(UserError, ValueError):
    """A weights file does not hold what the conversion expects; names the file and fix."""


class TorchFileError(UserError, ValueError):
    """A .pth file that is not a readable PyTorch checkpoint (see `torch_pickle`)."""


class RunFolderError(UserError, FileNotFoundError):
    """A folder that is not a grad_jax run, or holds no (such) checkpoint."""


class CheckpointMismatchError(UserError, ValueError):
    """The checkpoint was written by a run with another model configuration."""


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss became NaN or Inf; the message names the step and the batch's files."""


class SelectionError(UserError, ValueError):
    """Recipe selection cannot run with this config or data."""


class UsageError(UserError, ValueError):
    """A command-line or API argument that cannot work; the message says why."""


class ModelFileError(UserError, ValueError):
    """An exported model folder that is missing, damaged or for another jax version."""


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT/SIGTERM after saving a checkpoint (exit status 130)."""
