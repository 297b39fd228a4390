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
    from grad_jax import train

    errors += [train.NonFiniteLossError, train.ConfigError]
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
