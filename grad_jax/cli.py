"""The one command-line style of grad_jax: absl flags, `ml_collections` configs, quiet library
logs, and errors a user can fix printed as one line on stderr instead of a traceback.

Every command (`main`, `predict`, `convert`, `export`, `serve`, `benchmark`) is::

    def define_flags(values: flags.FlagValues) -> None: ...   # its flags
    def body(values: flags.FlagValues, args: list[str]) -> int: ...  # checks flags, does the work
    def main(argv) -> int:
        return cli.run_command(argv, __doc__, define_flags, body)

`run_command` builds fresh flags on every call (so a command runs in-process again and again,
and all of them import side by side), answers -h/--help with the usage text (exit 0), and
turns flag errors, `grad_jax.errors.UserError` and usage errors into `grad_jax: error: <one
line>` with exit status 2; Ctrl-C (and a training run stopped by a signal) exits with 130.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Sequence

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from grad_jax.config import load_config_file, resolve_config_flags, resolve_config_path
from grad_jax.errors import UsageError, UserError

EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
HELP_FLAGS = ("-h", "--help", "-help", "--helpfull")
#: `run_command(config=...)` for a command whose --config has no default (it is required).
REQUIRED = ""


def configure_logging(verbose: bool = False) -> None:
    """grad_jax's own messages at INFO (on stderr, `LEVEL logger: message`); what Orbax and
    TFDS log through absl only from ERROR up (their warnings are routine: a read-only checkpoint
    folder, a custom dataset configuration), other libraries from WARNING up."""
    absl_logging.set_verbosity(absl_logging.DEBUG if verbose else absl_logging.ERROR)
    root = logging.getLogger()
    # Orbax and grain add a default stderr handler to the root logger when they are imported;
    # ours replaces it (handlers of other types, e.g. pytest's or a notebook's, stay).
    for handler in list(root.handlers):
        if type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
    ours = logging.StreamHandler()
    ours.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(ours)
    root.setLevel(logging.WARNING)
    logging.getLogger("grad_jax").setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("tfds_mvtec").setLevel(logging.INFO)


def report_error(err: BaseException) -> int:
    """Print a user error or an interruption as one line on stderr; its exit status."""
    if isinstance(err, KeyboardInterrupt):
        print(f"grad_jax: {str(err) or 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    logging.debug("details", exc_info=err)
    print(f"grad_jax: error: {err}", file=sys.stderr)
    return EXIT_USER_ERROR


@contextlib.contextmanager
def friendly_errors():
    """User-fixable errors (`grad_jax.errors.UserError`) exit with status 2 and their message;
    Ctrl-C (and a training run stopped by a signal) with 130."""
    try:
        yield
    except (KeyboardInterrupt, UserError) as err:
        sys.exit(report_error(err))


def run_command(
    argv: Sequence[str],
    usage: str | None,
    define_flags: Callable[[flags.FlagValues], None],
    body: Callable[[flags.FlagValues, list[str]], int],
    config: str | None = None,
    positional_args: bool = False,
) -> int:
    """Run one command line (`argv[0]` is the program name); returns the exit status.

    `usage`: the help text (the module docstring); the flags' help is appended to it.
    `define_flags(values)` defines the command's flags on a fresh `FlagValues`; `body(values,
    args)` does the work (`args`: the arguments left after the flags, which only a command
    with `positional_args` may have) and returns the exit status.
    `config`: give the command `--config` (an `ml_collections` config file, with overrides such
    as `--config.train.epochs=3`) defaulting to this file; `REQUIRED` for no default.
    """
    argv = resolve_config_flags(list(argv))
    values = flags.FlagValues()
    if config is not None:
        config_flags.DEFINE_config_file(
            "config",
            resolve_config_path(config) if config else None,
            "Config file, e.g. configs/unified.py (overrides: --config.train.epochs=3).",
            flag_values=values,
            lock_config=True,
            sys_argv=argv,
        )
    define_flags(values)
    if any(a in HELP_FLAGS for a in argv[1:]):
        help_text = values.get_help(include_special_flags=False)
        print((usage or "").strip() + "\n\nflags:\n" + help_text)
        return EXIT_OK
    try:
        configure_logging()
        if config is not None:
            _check_config_file(argv)
        args = parse_flags(values, argv)[1:]
        if args and not positional_args:
            raise UsageError(f"unexpected arguments: {' '.join(args)}")
        return body(values, args)
    except (KeyboardInterrupt, UserError) as err:
        return report_error(err)


def parse_flags(values: flags.FlagValues, argv: list[str]) -> list[str]:
    """`values(argv)` (the arguments left after the flags), its errors as `UsageError`.

    ml_collections reports an unknown `--config.a.b` key as a bare AttributeError; this names
    the key and its section's valid keys.
    """
    try:
        return values(argv)
    except flags.Error as err:
        raise UsageError(str(err)) from err
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        bad = next((a for a in argv[1:] if a.startswith("--config.") and "=" in a), None)
        detail = str(err).strip("\"'")
        if bad is None:
            raise UsageError(f"{type(err).__name__}: {detail}") from err
        key = bad.split("=", 1)[0][len("--config.") :]
        if isinstance(err, AttributeError | KeyError):
            detail = f"the config has no key '{key}'"
        hint = _valid_keys_hint(argv, key)
        raise UsageError(f"cannot apply {bad}: {detail}. {hint}".rstrip()) from err


def _valid_keys_hint(argv: list[str], key: str) -> str:
    """'valid keys in model: a, b, ...' for the section of `key`, from the config file."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if not spec:
        return ""
    try:
        node = load_config_file(spec)
        parts = key.split(".")
        for part in parts[:-1]:
            node = node[part]
        section = ".".join(parts[:-1]) or "config"
        return f"Valid keys in {section}: {', '.join(sorted(node.keys()))}."
    except Exception:  # noqa: BLE001 - the hint is best effort
        return ""


def _check_config_file(argv: list[str]) -> None:
    """Load --config once with `grad_jax.config.load_config_file` before the flags do: a missing
    file is then one line naming the shipped configs (ml_collections would raise a traceback
    when the config is first used), and a user's config may import its own `configs` package."""
    spec = next((a.split("=", 1)[1] for a in reversed(argv) if a.startswith("--config=")), "")
    if spec:
        load_config_file(spec)
