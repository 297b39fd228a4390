"""Test-wide set-up: a fixed repository root on sys.path and helpers shared by the tests."""

import os
import pathlib
import struct
import sys
import zlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Tests are CPU-only and hermetic. Multi-device tests start their own subprocesses.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

MAGNETIC_TILE = ROOT.parent / "shared" / "datasets" / "magnetic_tile"

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(what: str) -> None:
    """An optional dependency (`what` says which and how to get it) is absent: skip locally,
    fail in CI (CI=true), where every test must run."""
    import pytest

    if IN_CI:
        pytest.fail(f"CI=true and {what}", pytrace=False)
    pytest.skip(what, allow_module_level=True)


def require_module(name: str, hint: str = ""):
    """`import name`, or `missing(...)` when it is not installed."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        missing(f"{name} is not installed{' (' + hint + ')' if hint else ''}")


def require_magnetic_tile():
    """The Magnetic Tile folder, or `missing(...)` when it is not beside the checkout."""
    if not (MAGNETIC_TILE / "train" / "good").is_dir():
        missing(
            f"Magnetic Tile dataset not found at {MAGNETIC_TILE} (../shared/datasets/"
            "magnetic_tile beside the checkout)"
        )
    return MAGNETIC_TILE


def tiny_category(base, num_train=8, num_test_good=2, num_test_defect=1):
    """A small generated MVTec-layout category (80 px hex nuts) under `base`; returns its path."""
    from grad_jax.data import demo

    demo.generate_demo_dataset(
        base,
        classes=("hex_nut",),
        num_train=num_train,
        num_test_good=num_test_good,
        num_test_defect=num_test_defect,
        image_size=80,
        progress=False,
    )
    return base / "hex_nut"


def _train_tiny_run(base):
    """Train configs/tiny.py for one epoch on a generated category under `base`."""
    from grad_jax.configs import tiny

    from grad_jax.training import loop

    category = tiny_category(base / "data")
    config = tiny.get_config()
    config.data.dataset = "folder"
    config.data.root = str(category)
    config.data.data_dir = str(base / "tfds")
    config.train.epochs = 1
    workdir = base / "run"
    loop.train_and_evaluate(config, str(workdir))
    return workdir, category


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """`(run folder, category folder)`: a tiny trained run (configs/tiny.py, one epoch, a decision
    threshold from one held-out image) and its generated MVTec-layout data, shared by the tests
    of the service, its page and the inspection notebook."""
    return _train_tiny_run(tmp_path_factory.mktemp("tiny_run"))


def assert_clean_notebook(nb) -> None:
    """A valid python3 notebook committed without outputs, execution counts or attachments."""
    import nbformat

    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {i} has stored outputs"
            assert cell.execution_count is None, f"cell {i} has an execution count"
        assert "attachments" not in cell, f"cell {i} has attachments"


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height grey pixels, with almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1) * 4)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )
