"""Evaluation smoothing and image scores against a PyTorch avg_pool2d reference."""

import jax.numpy as jnp
import numpy as np
import pytest

from grad_jax.models import scoring
from tests.conftest import require_module  # noqa: E402

torch = require_module("torch", "pip install -e '.[test]'")


def test_smoothing_and_scores_match_avg_pool2d():
    rng = np.random.default_rng(0)
    maps = rng.random((3, 40, 40)).astype(np.float32)
    maps[1, 10:14, 20:30] += 5  # a hot blob
    t = torch.from_numpy(maps)[:, None]
    want_smooth = torch.nn.functional.avg_pool2d(t, 21, 1, 10)  # count_include_pad=True
    want_score = torch.nn.functional.avg_pool2d(want_smooth, 16, 1).amax(dim=(1, 2, 3))
    got_smooth = scoring.smooth(jnp.asarray(maps), 21)
    got_score = scoring.image_scores(got_smooth, 16)
    np.testing.assert_allclose(np.asarray(got_smooth), want_smooth[:, 0].numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_score), want_score.numpy(), rtol=1e-5)
    assert int(np.argmax(np.asarray(got_score))) == 1
    # the corner keeps 11*11/441 of a uniform level
    flat = scoring.smooth(jnp.ones((1, 40, 40)), 21)
    assert float(flat[0, 0, 0]) == pytest.approx(121 / 441, rel=1e-6)
