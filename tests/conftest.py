"""Test-wide set-up: a fixed repository root on sys.path and helpers shared by the tests."""

import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Tests are CPU-only and hermetic. Multi-device tests start their own subprocesses.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

MAGNETIC_TILE = ROOT.parent / "shared" / "datasets" / "magnetic_tile"
