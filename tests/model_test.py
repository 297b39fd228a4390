"""Model structure: parameter counts, shapes, and the train/eval split of the head."""

import jax
import jax.numpy as jnp
import numpy as np
from grad_jax.configs import crad_s, tiny, unified

from grad_jax.models.efficientnet import efficientnet_spec
from grad_jax.models.model import build_model, split_model
from grad_jax.weights import state_dicts


def count(tree):
    return sum(x.size for x in jax.tree.leaves(tree))


def test_reconstruction_parameter_counts_for_b4():
    for config, expected in ((unified.get_config(), 15_361_492), (crad_s.get_config(), 5_261_116)):
        model = build_model(config)
        _, backbone, params, stats = split_model(model)
        assert count(params) == expected
        from flax import nnx

        assert count(nnx.state(model.backbone, nnx.Param)) == 3_635_984  # stem + blocks 0-21


def test_b4_layout_and_widths():
    spec = efficientnet_spec("efficientnet-b4")
    assert spec.layer_blocks() == {1: 1, 2: 5, 3: 9, 4: 21, 5: 31}
    assert [spec.layer_channels(i) for i in (1, 2, 3, 4, 5)] == [24, 32, 56, 160, 448]
    assert spec.output_size((224, 224), 9) == (28, 28)
    assert spec.output_size((224, 224), 21) == (14, 14)
    model = build_model(unified.get_config())
    assert model.head.cfg.channels == 216 and model.head.cfg.feature_hw == (28, 28)
    assert model.head.local_grid[...].shape == (8, 8, 216)
    assert model.head.global_grid[...].shape == (4, 4, 28, 28, 216)
    assert len(model.backbone.blocks) == 22  # nothing after block 21 is built
    # init of the reference: xavier-normal grids (std 0.012 / 8.59e-4), N(0, 0.01) convs
    assert abs(float(jnp.std(model.head.local_grid[...])) - 0.0120) < 0.0005
    assert abs(float(jnp.std(model.head.global_grid[...])) - 8.59e-4) < 1e-5


def test_lite0_widths_derive_from_backbone():
    spec = efficientnet_spec("efficientnet-lite0")
    assert [spec.layer_channels(i) for i in (1, 2, 3, 4)] == [16, 24, 40, 112]
    config = tiny.get_config()
    model = build_model(config)
    assert model.head.cfg.channels == 152
    assert model.head.bottlenecks[0].expand.kernel[...].shape == (304, config.model.ch_exp)


def test_forward_shapes_and_eval_determinism():
    config = tiny.get_config()
    model = build_model(config)
    x = jnp.asarray(np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8))
    a = model(x)
    b = model(x)
    assert a.anomaly_map.shape == (2, 64, 64)
    assert a.feature_align.shape == (2, 8, 8, 152)
    np.testing.assert_array_equal(np.asarray(a.anomaly_map), np.asarray(b.anomaly_map))
    # refinement identities: x_hat - x = (1 - s)(r - x); d = |1 - s| * ||r - x||
    s = np.asarray(a.similarity)[..., None]
    diff = np.asarray(a.feature_rec - a.feature_align)
    np.testing.assert_allclose(
        diff, (1 - s) * np.asarray(a.reconstruction - a.feature_align), atol=1e-5
    )
    norm = np.linalg.norm(np.asarray(a.reconstruction - a.feature_align), axis=-1)
    np.testing.assert_allclose(np.asarray(a.distance), np.abs(1 - s[..., 0]) * norm, rtol=1e-4)


def test_jitter_only_in_training_and_one_coin_per_step():
    config = tiny.get_config()
    model = build_model(config)
    x = jnp.asarray(np.random.default_rng(1).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8))
    feats = model.neck(model.extract(x))
    clean = model.head.coordinates(feats)[1]
    evald = model.head(feats, train=False, noise_key=jax.random.key(0)).local_coord
    np.testing.assert_array_equal(np.asarray(evald), np.asarray(clean))
    jittered, plain = 0, 0
    for i in range(12):
        graph = __import__("flax").nnx.clone(model)
        out = graph.head(feats, train=True, noise_key=jax.random.key(i)).local_coord
        delta = np.asarray(out - clean)
        if np.all(delta == 0):
            plain += 1
        else:
            jittered += 1
            assert np.all(delta != 0)  # the whole batch moves together
            assert 0.03 < delta.std() < 0.07  # noise std 0.05
    assert jittered > 0 and plain > 0


def test_bfloat16_stays_within_stated_tolerance_of_float32():
    """bf16 compute (for accelerators): anomaly maps within 5% of the fp32 maximum and
    correlated above 0.99 with fp32, on the real Lite0 state_dicts."""

    config = tiny.get_config()
    config.data.image_size = (96, 96)
    full = build_model(config)
    state_dicts.load_backbone(full, config.model.backbone)
    config.model.dtype = "bfloat16"
    half = build_model(config)
    state_dicts.load_backbone(half, config.model.backbone)
    assert half.head.bottlenecks[0].expand.kernel[...].dtype == jnp.float32  # params stay fp32
    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 96, 96, 3), dtype=np.uint8))
    a = np.asarray(full(x).anomaly_map)
    b = np.asarray(half(x).anomaly_map)
    assert np.abs(a - b).max() <= 0.05 * np.abs(a).max()
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99
