"""Training reads what training needs: sources that never decode a mask; and the epochs every
module takes from `input_pipeline`: the order of an epoch (`epoch_order`, a seeded permutation
whose last batch is cut to a multiple of the device count) and its length (`steps_per_epoch`),
both checked against counts made by hand."""

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


# (n images, global batch, devices) -> (images trained in an epoch, steps), by hand: full
# batches, then a last batch cut to a multiple of the device count.
_EPOCHS = [
    ((10, 4, 1), (10, 3)),  # 4 + 4 + 2
    ((10, 4, 4), (8, 2)),  # the last 2 cannot be split over 4 devices: dropped
    ((9, 4, 2), (8, 2)),  # 1 left over, fewer than the 2 devices
    ((11, 4, 2), (10, 3)),  # last batch of 3 cut to 2
    ((14, 4, 4), (12, 3)),  # full batches only: 2 left over
    ((15, 8, 2), (14, 2)),  # 8 + 7 cut to 6
    ((16, 4, 4), (16, 4)),  # no remainder
    ((3, 8, 2), (2, 1)),  # fewer images than a batch: one short batch, cut to 2
    ((3, 8, 1), (3, 1)),
    ((7, 8, 4), (4, 1)),
]


@pytest.mark.parametrize("case, want", _EPOCHS)
def test_steps_per_epoch_by_hand(case, want):
    n, batch, devices = case
    images, steps = want
    assert input_pipeline.steps_per_epoch(n, batch, devices) == steps
    for epoch in range(3):
        order = input_pipeline.epoch_order(n, 5, epoch, batch, devices)
        assert len(order) == images
        assert len(set(order.tolist())) == images and set(order.tolist()) <= set(range(n))
        # the last batch splits evenly over the devices, and the others are full
        last = images - (steps - 1) * batch
        assert 0 < last <= batch and last % devices == 0


def test_epoch_order_is_a_fresh_permutation_per_epoch_and_seed():
    n = 24
    orders = {
        (seed, epoch): input_pipeline.epoch_order(n, seed, epoch, 8, 1).tolist()
        for seed in (0, 1)
        for epoch in range(4)
    }
    for order in orders.values():
        assert sorted(order) == list(range(n))  # every image once
        assert order != list(range(n))  # shuffled
    assert len({tuple(o) for o in orders.values()}) == len(orders)  # epochs and seeds differ
    # the same (seed, epoch) gives the same order (a resumed run continues it)
    assert input_pipeline.epoch_order(n, 1, 2, 8, 1).tolist() == orders[(1, 2)]


@pytest.mark.parametrize("n, batch", [(24, 8), (27, 8), (5, 8)])
def test_epoch_order_is_the_same_for_every_device_count(n, batch):
    """The device count only decides how many images the last batch drops: the order itself
    is the same permutation (so a run's images do not depend on the machine)."""
    for epoch in range(3):
        one = input_pipeline.epoch_order(n, 7, epoch, batch, 1).tolist()
        assert sorted(one) == list(range(n))
        for devices in (2, 4, 8):
            order = input_pipeline.epoch_order(n, 7, epoch, batch, devices).tolist()
            assert order == one[: len(order)]
            assert n - len(order) < devices  # at most devices - 1 images left out
