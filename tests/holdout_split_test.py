"""The held-out normal images (`input_pipeline.split_holdout`): a seeded share of each category's
training images, at least one when the share is positive but never the only one, disjoint from
what is trained on; and the test items of a category (`input_pipeline.test_items`)."""

import pytest

from grad_jax.data import input_pipeline
from grad_jax.data.input_pipeline import Item


def _categories(sizes, test_sizes=None):
    test_sizes = test_sizes or [0] * len(sizes)
    return [
        input_pipeline.CategoryData(f"c{k}", [None] * n, [None] * t)
        for k, (n, t) in enumerate(zip(sizes, test_sizes, strict=True))
    ]


@pytest.mark.parametrize(
    "sizes,fraction,want",
    [
        # round(20 * 0.25) = 5; round(0.75) = 1; an only image is never held out; round(0.5) = 0
        # raised to one
        ([20, 3, 1, 2], 0.25, [5, 1, 0, 1]),
        ([2, 10], 0.9, [1, 9]),  # at most all but one
        ([7, 1], 0.0, [0, 0]),  # no share: nothing held out, even from a large category
        ([10, 40], 0.1, [1, 4]),
        ([7, 30], 0.25, [2, 8]),  # 1.75 and 7.5 rounded (to even), not truncated
    ],
)
def test_held_out_counts_per_category(sizes, fraction, want):
    train, held = input_pipeline.split_holdout(_categories(sizes), fraction, seed=0)
    assert [sum(1 for it in held if it.category == c) for c in range(len(sizes))] == want
    assert not set(train) & set(held)
    everything = {Item(c, i) for c, n in enumerate(sizes) for i in range(n)}
    assert set(train) | set(held) == everything and len(train) + len(held) == len(everything)
    assert train == sorted(train, key=lambda it: (it.category, it.index))


def test_the_split_is_seeded():
    categories = _categories([20, 20])
    first = input_pipeline.split_holdout(categories, 0.25, seed=3)
    assert input_pipeline.split_holdout(categories, 0.25, seed=3) == first
    other = input_pipeline.split_holdout(categories, 0.25, seed=4)
    assert set(other[1]) != set(first[1])
    # each category's own draw: the same images of c0 whatever c1 holds
    alone = input_pipeline.split_holdout(_categories([20, 5]), 0.25, seed=3)
    assert [it for it in alone[1] if it.category == 0] == [
        it for it in first[1] if it.category == 0
    ]


def test_test_items_are_every_test_image_of_the_category():
    categories = _categories([1, 1], test_sizes=[3, 2])
    assert input_pipeline.test_items(categories, 1) == [Item(1, 0), Item(1, 1)]
    assert input_pipeline.test_items(categories, 0) == [Item(0, i) for i in range(3)]
