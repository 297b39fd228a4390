"""Shared command-line behaviour: quiet library logs, and errors a user can fix printed as one
clear line on stderr instead of a traceback."""

from __future__ import annotations

import contextlib
import logging
import sys

from absl import flags
from absl import logging as absl_logging

from grad_jax.config import load_config_file, resolve_config_path
from grad_jax.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def configure_logging(verbose: bool = False) -> None:
    """grad_jax's own messages at INFO; Orbax, TFDS and absl chatter only from WARNING up."""
    absl_logging.set_verbosity(absl_logging.DEBUG if verbose else absl_logging.WARNING)
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    root.setLevel(logging.WARNING)
    logging.getLogger("grad_jax").setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("tfds_mvtec").setLevel(logging.INFO)


@contextlib.contextmanager
def friendly_errors():
    """User-fixable errors (`grad_jax.errors.UserError`) exit with status 2 and their message;
    Ctrl-C (and a training run stopped by a signal) with 130."""
    try:
        yield
    except KeyboardInterrupt as err:
        msg = str(err) or "interrupted"
        print(f"grad_jax: {msg}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except UserError as err:
        logging.debug("details", exc_info=True)
        print(f"grad_jax: error: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with one-line errors for config overrides (app.run's flags_parser).

    ml_collections reports an unknown `--config.a.b` key as a bare AttributeError traceback;
    this names the key, its section's valid keys, and exits with status 2.
    """
    argv = [_resolved(a) for a in argv]
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        print(f"grad_jax: error: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        bad = next((a for a in argv[1:] if a.startswith("--config.") and "=" in a), None)
        detail = str(err).strip("\"'")
        if bad is not None:
            key = bad.split("=", 1)[0][len("--config.") :]
            if isinstance(err, AttributeError | KeyError):
                detail = f"the config has no key '{key}'"
            hint = _valid_keys_hint(argv, key)
            print(
                f"grad_jax: error: cannot apply {bad}: {detail}. {hint}".rstrip(), file=sys.stderr
            )
        else:
            print(f"grad_jax: error: {type(err).__name__}: {detail}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


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


def _resolved(arg: str) -> str:
    """`--config=configs/x.py` names the shipped config when no such file is here."""
    if arg.startswith("--config="):
        return "--config=" + resolve_config_path(arg[len("--config=") :])
    return arg
