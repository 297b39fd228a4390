"""Training reads what training needs: sources that never decode a mask, and the epoch length
that every module takes from `input_pipeline.steps_per_epoch`."""

import numpy as np
import pytest
from grad_jax.configs import tiny

from grad_jax.data import input_pipeline


class _NoMasks(dict):
    """A dataset record whose mask must not be read."""

    def __getitem__(self, key):
        if key == "mask":
            raise AssertionError("a training source decoded a mask")
        return super().__getitem__(key)

    def get(self, key, default=None):
        if key in ("mask", "has_mask"):
            raise AssertionError("a training source looked at the mask")
        return super().get(key, default)


def _records(n: int, hw=(96, 80)):
    rng = np.random.default_rng(0)
    return [
        _NoMasks(
            image=rng.integers(0, 256, (*hw, 3), dtype=np.uint8),
            mask=np.zeros((*hw, 1), np.uint8),
            label=0,
            filename=f"{i}.png".encode(),
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("tile", [0, 32])
def test_training_sources_never_decode_masks(tile):
    config = tiny.get_config()
    config.data.tile.size = tile
    config.data.tile.overlap = 8
    records = _records(3)
    items = [input_pipeline.Item(0, i) for i in range(3)]
    source = input_pipeline.training_source(config, [records], items, ["part"])
    rows = [source[i] for i in range(len(source))]
    assert len(rows) == (3 if not tile else 3 * 12)  # 96x80 in 32-tiles overlapping by >= 8
    assert all("mask" not in r and "has_mask" not in r for r in rows)
    batch = next(input_pipeline.batches(source, np.arange(len(source)), 2))
    assert set(batch) == {"image", "label", "category", "position", "filename"}


def test_evaluation_sources_still_read_masks():
    records = [dict(r) for r in _records(2)]
    source = input_pipeline.IndexedSource([records], [input_pipeline.Item(0, 0)], (64, 64), ["p"])
    row = source[0]
    assert row["mask"].shape == (64, 64) and bool(row["has_mask"])


@pytest.mark.parametrize("n, batch, devices", [(10, 4, 1), (10, 4, 4), (9, 4, 2), (3, 8, 2)])
def test_steps_per_epoch_counts_the_batches_of_an_epoch(n, batch, devices):
    order = input_pipeline.epoch_order(n, 0, 0, batch, devices)
    batches = [order[i : i + batch] for i in range(0, len(order), batch)]
    assert input_pipeline.steps_per_epoch(n, batch, devices) == len(batches)
