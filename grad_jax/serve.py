"""`python -m grad_jax.serve`: the inspection service and its web page.

Usage::

    python -m grad_jax.serve --model=MODEL_DIR  [--host=127.0.0.1 --port=8000]
    python -m grad_jax.serve --workdir=RUN_DIR  [--host=127.0.0.1 --port=8000]

--model serves an exported model (`python -m grad_jax.export`), --workdir a training run folder.
Open http://HOST:PORT/ for the page; the API is described in `grad_jax.serving.service`. The server
binds the loopback address by default: pass --host=0.0.0.0 to serve other machines (it has no
authentication; put it behind your own proxy for that, and name the host names it is reached by
with --allowed_hosts). Every bound on what a client may make it do is a flag below; the defaults
are in `grad_jax.serving.settings`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import flags

from grad_jax import cli
from grad_jax.errors import UsageError
from grad_jax.inference.loader import load_scorer
from grad_jax.serving import settings as settings_lib
from grad_jax.serving import uploads


def define_flags(v: flags.FlagValues) -> None:
    """The flags of `python -m grad_jax.serve`."""
    s, limits = settings_lib.Settings(), settings_lib.default_limits()
    flags.DEFINE_string("model", None, "Exported model folder (grad_jax.export).", flag_values=v)
    flags.DEFINE_string("workdir", None, "Training run folder (instead of --model).", flag_values=v)
    flags.DEFINE_string(
        "model_sha256",
        None,
        "Refuse --model unless its folder digest (printed by grad_jax.export) is this.",
        flag_values=v,
    )
    flags.DEFINE_integer(
        "step", None, "Checkpoint step of --workdir (default: latest).", flag_values=v
    )
    flags.DEFINE_string("host", "127.0.0.1", "Address to bind.", flag_values=v)
    flags.DEFINE_integer("port", 8000, "Port to bind (0: any free port).", flag_values=v)
    flags.DEFINE_integer("batch_size", 8, "Images per device call.", flag_values=v)
    flags.DEFINE_float(
        "max_wait_ms", s.max_wait_ms, "Longest wait for a batch to fill, in ms.", flag_values=v
    )
    flags.DEFINE_integer(
        "max_queue", None, "Images that may wait (default: 4 batches); more get 503.", flag_values=v
    )
    flags.DEFINE_integer("max_files", limits.max_files, "Images per request.", flag_values=v)
    flags.DEFINE_integer(
        "max_file_bytes", limits.max_file_bytes, "Encoded size of one image.", flag_values=v
    )
    flags.DEFINE_integer(
        "max_pixels",
        limits.max_pixels,
        "Width x height of one image (default: 40 MP, more than a camera gives; a 16-bit "
        "image takes about 15 bytes a pixel to decode).",
        flag_values=v,
    )
    flags.DEFINE_integer(
        "max_request_pixels",
        s.max_request_pixels,
        "Pixels of all images of one request together (read from their headers).",
        flag_values=v,
    )
    flags.DEFINE_integer(
        "max_decodes", s.max_decodes, "Images decoded (or overlays drawn) at once.", flag_values=v
    )
    flags.DEFINE_float(
        "receive_timeout_s",
        s.receive_timeout_s,
        "Seconds a client has to send a request's headers, and then its body (408 after).",
        flag_values=v,
    )
    flags.DEFINE_float(
        "deadline_s",
        s.deadline_s,
        "Seconds from the decoding of a request's images to their scores (504 after); a device "
        "call that runs longer makes the service unhealthy.",
        flag_values=v,
    )
    flags.DEFINE_integer(
        "max_connections",
        s.max_connections,
        "Connections and requests at once (uvicorn's limit_concurrency); more get 503.",
        flag_values=v,
    )
    flags.DEFINE_float(
        "shutdown_timeout_s",
        s.shutdown_timeout_s,
        "On SIGTERM or Ctrl-C, seconds that requests in flight have to finish.",
        flag_values=v,
    )
    flags.DEFINE_list(
        "allowed_hosts",
        list(s.allowed_hosts),
        "Host names the service is reached by, besides its address and localhost ('*': any, "
        "behind a proxy that checks them).",
        flag_values=v,
    )
    flags.DEFINE_list(
        "allow_formats",
        list(s.allow_formats),
        "Image formats accepted besides PNG, JPEG, BMP and TIFF (Pillow's names, e.g. WEBP).",
        flag_values=v,
    )
    flags.DEFINE_integer(
        "overlay_side", limits.overlay_side, "Longer side of overlay PNGs.", flag_values=v
    )


def _limits(values: flags.FlagValues) -> uploads.Limits:
    try:
        return uploads.Limits(
            max_file_bytes=values.max_file_bytes,
            max_files=values.max_files,
            max_pixels=values.max_pixels,
            overlay_side=values.overlay_side,
        )
    except ValueError as err:
        raise UsageError(f"--{err}") from err


def _settings(values: flags.FlagValues) -> settings_lib.Settings:
    try:
        return settings_lib.Settings(
            max_wait_ms=values.max_wait_ms,
            max_queue=values.max_queue,
            max_request_pixels=values.max_request_pixels,
            max_decodes=values.max_decodes,
            receive_timeout_s=values.receive_timeout_s,
            deadline_s=values.deadline_s,
            max_connections=values.max_connections,
            shutdown_timeout_s=values.shutdown_timeout_s,
            allowed_hosts=tuple(values.allowed_hosts),
            allow_formats=tuple(values.allow_formats),
        )
    except ValueError as err:
        raise UsageError(f"--{err}") from err


def serve_command(values: flags.FlagValues, args: list[str]) -> int:
    """Check the flags, load the model and serve it until stopped."""
    if (values.model is None) == (values.workdir is None):
        raise UsageError("give exactly one of --model=MODEL_DIR and --workdir=RUN_DIR")
    if values.batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, got {values.batch_size}")
    limits, settings = _limits(values), _settings(values)
    try:  # the [serve] extra, imported only by this command
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401 - for the uploads
        import uvicorn

        from grad_jax.serving import service
    except ImportError as err:
        raise UsageError(
            f"the service needs FastAPI, uvicorn and python-multipart ({err}): "
            'pip install -e ".[serve]"'
        ) from err
    model = load_scorer(
        values.model,
        values.workdir,
        batch_size=values.batch_size,
        step=values.step,
        expected_sha256=values.model_sha256 or None,
    )
    try:
        app = service.create_app(model, limits, settings)
    except ValueError as err:
        raise UsageError(str(err)) from err
    server = uvicorn.Server(service.uvicorn_config(app, values.host, values.port))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn passes Ctrl-C on once it has shut down gracefully
        pass
    return cli.EXIT_OK


def main(argv: Sequence[str]) -> int:
    """The command line (`argv[0]` is the program name); returns the exit status."""
    return cli.run_command(argv, __doc__, define_flags, serve_command)


def run() -> None:
    """Console-script entry point (`grad-jax-serve`)."""
    sys.exit(main(sys.argv))


if __name__ == "__main__":
    run()
