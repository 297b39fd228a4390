"""`data.image_size='auto'`: the training images' median aspect ratio at about
`data.auto_pixels` pixels, each side a multiple of the coarsest stride, measured on at most
AUTO_SAMPLE evenly spaced training images and never on a test image. Every expectation below is
worked out by hand in its comment."""

import numpy as np
import pytest
from grad_jax.configs import tiny

from grad_jax.data import input_pipeline


@pytest.mark.parametrize(
    "sizes,pixels,stride,want",
    [
        # aspects (h / w) 1, 2, 3, 10: the median is 2.5 (the mean, 4, would give (128, 32)).
        # short = sqrt(4096 / 2.5) = 40.5 -> 3 strides = 48; long = 4096 / 48 = 85.3 -> 80
        ([(100, 100), (200, 100), (300, 100), (1000, 100)], 4096, 16, (80, 48)),
        # aspects 1 and 4: the median of h / w is 2.5 (1 / the median of w / h would be 1.6,
        # giving (288, 176)). short = sqrt(50176 / 2.5) = 141.7 -> 144; long = 348.4 -> 352
        ([(100, 100), (400, 100)], 224 * 224, 16, (352, 144)),
        # aspect 3: short = sqrt(4096 / 3) = 36.95 -> 2 strides = 32, then the long side keeps
        # the pixel count: 4096 / 32 = 128 (rounding sqrt(4096 * 3) = 110.9 alone gives 112)
        ([(300, 100)] * 3, 4096, 16, (128, 32)),
        ([(100, 300)] * 3, 4096, 16, (32, 128)),  # wide: the same, transposed
        # stride 8: short 36.95 -> 5 strides = 40; long 4096 / 40 = 102.4 -> 13 strides = 104
        ([(300, 100)], 4096, 8, (104, 40)),
        # stride 32: short 141.7 -> 4 strides = 128; long 50176 / 128 = 392 -> 12 strides = 384
        ([(250, 100)], 224 * 224, 32, (384, 128)),
        # very elongated: the short side is at least one stride (sqrt(4096 / 400) = 3.2 -> 16)
        ([(4000, 10)], 4096, 16, (256, 16)),
        ([(64, 64), (30, 30)], 4096, 16, (64, 64)),
    ],
)
def test_auto_image_size_by_hand(sizes, pixels, stride, want):
    assert input_pipeline.auto_image_size(sizes, pixels, stride) == want


def test_auto_image_size_needs_sizes():
    with pytest.raises(ValueError, match="no image sizes"):
        input_pipeline.auto_image_size([], 4096, 16)


class _Split:
    """A train or test split of records with the given image sizes that logs what is read."""

    def __init__(self, name, sizes, log, readable=True):
        self.name, self.sizes, self.log, self.readable = name, list(sizes), log, readable

    def __len__(self):
        return len(self.sizes)

    def __getitem__(self, i):
        assert self.readable, f"{self.name}[{i}] read"
        self.log.append((self.name, i))
        return {"image": np.zeros((*self.sizes[i], 3), np.uint8), "label": 0}


TALL, WIDE, SQUARE = (300, 100), (100, 300), (100, 100)


def _categories(log):
    """Ten training images in two categories: only images 0 and 3 of each are tall."""
    a = [TALL, WIDE, WIDE, TALL, WIDE, WIDE]
    b = [TALL, SQUARE, WIDE, TALL]
    return [
        input_pipeline.CategoryData(
            name, _Split(f"{name}/train", train, log), _Split(f"{name}/test", [], log, False)
        )
        for name, train in (("a", a), ("b", b))
    ]


def _auto_config(out_layers=(3, 4)):
    config = tiny.get_config()
    config.data.image_size = "auto"
    config.data.auto_pixels = 4096
    config.model.out_layers = out_layers
    return config


def test_resolve_measures_at_most_auto_sample_evenly_spaced_training_images(monkeypatch):
    monkeypatch.setattr(input_pipeline, "AUTO_SAMPLE", 4)
    log = []
    # 10 items (a0..a5, b0..b3); linspace(0, 9, 4) picks items 0, 3, 6, 9: a0, a3, b0, b3,
    # all tall (aspect 3): (128, 32) at 4096 pixels and stride 16. All ten images would give a
    # median of 2/3 (wide, see below), the first four a median of 5/3.
    got = input_pipeline.resolve_image_size(_auto_config(), _categories(log))
    assert got == (128, 32)
    assert log == [("a/train", 0), ("a/train", 3), ("b/train", 0), ("b/train", 3)]
    # the stride comes from the backbone stages used: 2 ** 3 = 8 -> (104, 40)
    log.clear()
    assert input_pipeline.resolve_image_size(_auto_config((2, 3)), _categories(log)) == (104, 40)


def test_resolve_measures_every_training_image_when_there_are_few(monkeypatch):
    monkeypatch.setattr(input_pipeline, "AUTO_SAMPLE", 10)
    log = []
    # aspects: a: 3, 1/3, 1/3, 3, 1/3, 1/3; b: 3, 1, 1/3, 3 -> sorted, the 5th and 6th are 1/3
    # and 1: median 2/3 (wide). short = sqrt(4096 * 2 / 3) = 52.3 -> 48; long 85.3 -> 80
    assert input_pipeline.resolve_image_size(_auto_config(), _categories(log)) == (48, 80)
    assert sorted(log) == sorted(
        [("a/train", i) for i in range(6)] + [("b/train", i) for i in range(4)]
    )


def test_resolve_reads_nothing_for_a_given_size_or_tiles():
    log = []
    config = _auto_config()
    config.data.image_size = (48, 80)
    assert input_pipeline.resolve_image_size(config, _categories(log)) == (48, 80)
    config = _auto_config()  # 'auto' with tiles: the model sees tiles
    config.data.tile.size = 32
    assert input_pipeline.resolve_image_size(config, _categories(log)) == (32, 32)
    assert log == []
