"""Shared command-line behaviour: quiet library logs, and errors a user can fix printed as one
clear line on stderr instead of a traceback."""

from __future__ import annotations

import contextlib
import logging
import sys

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def configure_logging(verbose: bool = False) -> None:
    """grad_jax's own messages at INFO; Orbax, TFDS and absl chatter only from WARNING up."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.DEBUG if verbose else absl_logging.WARNING)
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    root.setLevel(logging.WARNING)
    logging.getLogger("grad_jax").setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("tfds_mvtec").setLevel(logging.INFO)


def _user_errors() -> tuple[type[BaseException], ...]:
    from grad_jax import checkpointing, convert, input_pipeline, torch_pickle

    errors: list[type[BaseException]] = [
        input_pipeline.DataNotFoundError,
        convert.ConversionError,
        checkpointing.CheckpointMismatchError,
        torch_pickle.TorchFileError,
        FileNotFoundError,
    ]
    try:
        import tfds_mvtec

        errors.append(tfds_mvtec.DatasetLayoutError)
    except ImportError:  # pragma: no cover
        pass
    from grad_jax import synthetic_validation, train

    errors += [train.NonFiniteLossError, train.ConfigError, synthetic_validation.SelectionError]
    return tuple(errors)


@contextlib.contextmanager
def friendly_errors():
    """Known, user-fixable errors exit with status 2 and their message; Ctrl-C with 130."""
    try:
        yield
    except KeyboardInterrupt as err:
        msg = str(err) or "interrupted"
        print(f"grad_jax: {msg}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as err:
        if isinstance(err, _user_errors()):
            logging.debug("details", exc_info=True)
            print(f"grad_jax: error: {err}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        raise


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with one-line errors for config overrides (app.run's flags_parser).

    ml_collections reports an unknown `--config.a.b` key as a bare AttributeError traceback;
    this names the key, its section's valid keys, and exits with status 2.
    """
    from absl import flags

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
        from grad_jax.convert import load_config_file

        node = load_config_file(spec)
        parts = key.split(".")
        for part in parts[:-1]:
            node = node[part]
        section = ".".join(parts[:-1]) or "config"
        return f"Valid keys in {section}: {', '.join(sorted(node.keys()))}."
    except Exception:  # noqa: BLE001 - the hint is best effort
        return ""
