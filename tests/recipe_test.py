"""The reference's training and evaluation recipe, pinned to independent values.

Every expected value here comes from the method specification (the official code's constants)
or from arithmetic done in the test, never from grad_jax's own output: the reference config's
numbers, the optimiser's first two AdamW steps computed in NumPy, the learning rate at every
epoch boundary of the 50-epoch StepLR schedule, the jitter's coin and spread measured over many
keys, the input normalisation of the original backbones, the box filters of the evaluation, and
the unpickler's allow-list.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from grad_jax.configs import default, tiny, unified

from grad_jax.data import input_pipeline
from grad_jax.inference import device_program
from grad_jax.models import layers, scoring
from grad_jax.models.efficientnet import VARIANTS, EfficientNet
from grad_jax.models.model import ModelVariables, build_model, split_model, to_flat
from grad_jax.training import optim
from grad_jax.weights import torch_pickle

# --- the reference config (tae-mo/CRAD experiments/config.yaml, method.md sections 2, 8, 9) ----


def test_default_config_carries_the_reference_constants():
    c = default.get_config()
    m, t, e = c.model, c.train, c.eval
    assert (m.local_resol, m.global_resol, m.layers) == (8, 4, 11)
    assert (m.mse_lamb, m.cos_lamb, m.mse_coef) == (0.3, 0.7, 0.05)
    assert (m.noise_std, m.noise_prob) == (0.05, 0.5)
    assert (tuple(m.out_layers), m.out_stride, tuple(c.data.image_size)) == ((3, 4), 8, (224, 224))
    assert (t.epochs, t.batch_size, t.grid_lr, t.net_lr) == (50, 16, 0.1, 1e-3)
    assert (t.weight_decay, t.clip_norm, t.lr_step_epochs, t.lr_gamma) == (0.01, 0.1, 40, 0.1)
    assert (e.smooth_size, e.score_pool) == (21, 32)
    u = unified.get_config()  # 4 GPUs x 16 images, BN per GPU
    assert (u.model.backbone, u.model.ch_exp, u.train.batch_size) == ("efficientnet-b4", 864, 64)
    assert u.model.bn_group_size == 16


# --- optimiser -------------------------------------------------------------------------------


def _tiny_params():
    _, _, params, _ = split_model(build_model(tiny.get_config()))
    return {k: np.asarray(v, np.float64) for k, v in to_flat(params).items()}


def _adamw_reference(params, grads_per_step, lr_of):
    """Two-group AdamW as torch.optim.AdamW with PyTorch 1.12 defaults, after a joint
    clip_grad_norm_(0.1), in float64. `lr_of(name)` is the group's rate."""
    p = {k: v.copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    b1, b2, eps, wd = 0.9, 0.999, 1e-8, 0.01
    for t, grads in enumerate(grads_per_step, start=1):
        norm = np.sqrt(sum(np.sum(g**2) for g in grads.values()))
        scale = min(1.0, 0.1 / (norm + 1e-6))
        for k in p:
            g = grads[k] * scale
            lr = lr_of(k)
            p[k] = p[k] * (1 - lr * wd)  # decoupled decay, before the Adam step
            m[k] = b1 * m[k] + (1 - b1) * g
            v2[k] = b2 * v2[k] + (1 - b2) * g * g
            m_hat, v_hat = m[k] / (1 - b1**t), v2[k] / (1 - b2**t)
            p[k] = p[k] - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


def _run_optimizer(params, grads_per_step, steps_per_epoch=1000):
    config = default.get_config()
    f32 = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    tx, _ = optim.make_optimizer(config.train, steps_per_epoch, f32)
    state = tx.init(f32)
    for grads in grads_per_step:
        g32 = {k: jnp.asarray(v, jnp.float32) for k, v in grads.items()}
        updates, state = tx.update(g32, state, f32)
        f32 = jax.tree.map(lambda a, b: a + b, f32, updates)
    return {k: np.asarray(v, np.float64) for k, v in f32.items()}


def _grid(name):
    return name.rsplit(".", 1)[-1] in ("local_grid", "global_grid")


def test_optimizer_groups_rates_decay_and_joint_clip():
    params = _tiny_params()
    assert not any("backbone" in k for k in params)  # the frozen backbone is not trained
    assert sorted(k for k in params if _grid(k)) == ["head.global_grid", "head.local_grid"]
    assert any(k.endswith(".bias") for k in params) and any("bn" in k for k in params)
    rng = np.random.default_rng(0)
    # Large gradients (norm far above 0.1, so the joint clip is active), grids dominating.
    grads = [{k: rng.normal(size=v.shape) * (5.0 if _grid(k) else 0.5) for k, v in params.items()}]
    grads.append({k: rng.normal(size=v.shape) for k, v in params.items()})
    got = _run_optimizer(params, grads)
    want = _adamw_reference(params, grads, lambda k: 0.1 if _grid(k) else 1e-3)
    for k in params:
        # float32: the bias corrections (1 - 0.999 is 1.3e-5 off) and the rounding of p
        lr = 0.1 if _grid(k) else 1e-3
        tol = 3e-5 * lr + 2.5e-7 * np.abs(params[k]).max()
        np.testing.assert_allclose(got[k] - params[k], want[k] - params[k], atol=tol, err_msg=k)
    # A parameter with no gradient still decays (AdamW on every trained tensor, BN and biases
    # included): p * (1 - lr * 0.01) per step.
    zero = [{k: (np.zeros_like(params[k]) if not _grid(k) else s[k]) for k in s} for s in grads]
    got = _run_optimizer(params, zero)
    for k in params:
        if not _grid(k):
            np.testing.assert_allclose(got[k], params[k] * (1 - 1e-3 * 0.01) ** 2, rtol=1e-6)


def test_clip_uses_torch_epsilon_and_adam_epsilon_is_1e_8():
    clip = optim.clip_by_global_norm_torch(0.1)
    g = {"a": jnp.asarray([0.06], jnp.float32), "b": jnp.asarray([0.08], jnp.float32)}  # norm 0.1
    out, _ = clip.update(g, clip.init(g))
    scale = 0.1 / (0.1 + 1e-6)  # torch: max_norm / (norm + 1e-6), below 1 even at the norm
    np.testing.assert_allclose(float(out["a"][0]), 0.06 * scale, rtol=1e-7)
    assert float(out["b"][0]) < 0.08
    # Below the clip, a gradient of 1e-8 meets Adam's eps 1e-8: the first step is lr * 1/2.
    params = {"head.local_grid": np.zeros((2,)), "head.x": np.zeros((1,))}
    grads = [{"head.local_grid": np.array([1e-8, 0.01]), "head.x": np.array([0.0])}]
    got = _run_optimizer(params, grads)
    np.testing.assert_allclose(got["head.local_grid"], [-0.1 * 0.5, -0.1 * 1.0], rtol=1e-4)


def test_step_lr_with_the_one_epoch_lag_at_every_epoch_boundary():
    """StepLR(40, 0.1) stepped with the epoch after each epoch: 41 epochs at the base rate,
    then 9 at a tenth. Checked on the optimiser's actual updates, first and last step of
    every epoch, with a constant gradient (Adam's normalised step is then exactly 1)."""
    steps_per_epoch, epochs = 2, 50
    params = {"head.local_grid": np.zeros((1,)), "head.net": np.zeros((1,))}
    config = default.get_config()
    tx, schedules = optim.make_optimizer(
        config.train, steps_per_epoch, {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    )
    grads = {k: jnp.full((1,), 1e-3, jnp.float32) for k in params}  # norm below the clip

    @jax.jit
    def step(p, s):
        u, s = tx.update(grads, s, p)
        return jax.tree.map(lambda a, b: a + b, p, u), u, s

    p = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    s = tx.init(p)
    for i in range(steps_per_epoch * epochs):
        before = {k: float(v[0]) for k, v in p.items()}
        p, u, s = step(p, s)
        epoch = i // steps_per_epoch
        factor = 1.0 if epoch <= 40 else 0.1
        for name, base in (("head.local_grid", 0.1), ("head.net", 1e-3)):
            lr = base * factor
            # update = -lr * (m_hat / (sqrt(v_hat) + eps) + wd * p), m_hat/sqrt(v_hat) = 1
            want = -lr * (1e-3 / (1e-3 + 1e-8) + 0.01 * before[name])
            np.testing.assert_allclose(float(u[name][0]), want, rtol=1e-4, err_msg=(name, i))
        assert float(schedules["grid"](i)) == pytest.approx(0.1 * factor)


# --- coordinate jitter -----------------------------------------------------------------------


def _jitter_draws(config, n_keys):
    model = build_model(config)
    x = jnp.asarray(np.random.default_rng(1).integers(0, 255, (1, 64, 64, 3), dtype=np.uint8))
    feats = model.neck(model.extract(x))
    clean = model.head.coordinates(feats)[1]
    from flax import nnx

    graphdef, state = nnx.split(model.head)

    def local(key):
        head = nnx.merge(graphdef, jax.tree.map(lambda a: a, state))
        return head(feats, train=True, noise_key=key).local_coord

    keys = jax.random.split(jax.random.key(123), n_keys)
    out = jax.jit(jax.vmap(local))(keys)
    return np.asarray(out - clean[None], np.float64)  # [n, 1, H, W, 2]


def test_jitter_probability_and_spread_over_many_keys():
    """One coin per step with p = 0.5 (3 sigma ~ 0.05 at 1000 keys), N(0, 0.05^2) noise on
    every local coordinate (64 000 values: the sample std within 2 %); no clamp."""
    config = tiny.get_config()
    config.model.noise_prob = default.get_config().model.noise_prob
    config.model.noise_std = default.get_config().model.noise_std
    deltas = _jitter_draws(config, 1000)
    # (the vmapped coordinates may differ from the plain ones in the last float32 bits)
    per_key = np.abs(deltas).reshape(len(deltas), -1)
    moved = per_key.max(axis=1) > 1e-5
    assert per_key[~moved].max() < 1e-6
    assert np.median(per_key[moved], axis=1).min() > 1e-3  # the whole batch moves together
    assert abs(moved.mean() - 0.5) < 0.06, moved.mean()
    noise = deltas[moved].ravel()
    assert abs(noise.std() - 0.05) < 0.001, noise.std()
    assert abs(noise.mean()) < 0.001


# --- input normalisation ---------------------------------------------------------------------

# The original sources: lukemelas EfficientNet / UniAD's config (ImageNet mean and std on [0, 1]
# RGB) for the B-series; the TF EfficientNet-Lite preprocessing (x - 127) / 128 on 0..255.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


@pytest.mark.parametrize("name", [v for v in VARIANTS if v.endswith(("b0", "b4", "lite0"))])
def test_backbone_input_normalisation(name, monkeypatch):
    from flax import nnx

    seen = []

    class Seen(Exception):
        pass

    def capture(x, *args, **kwargs):
        seen.append(np.asarray(x))
        raise Seen

    net = EfficientNet(name, (3,), rngs=nnx.Rngs(0))
    monkeypatch.setattr(layers, "conv2d", capture)
    image = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(Seen):
        net(jnp.asarray(image))
    x = image.astype(np.float64)
    want = (x - 127.0) / 128.0 if "lite" in name else (x / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(seen[0], want, rtol=1e-5, atol=1e-5)


# --- evaluation ------------------------------------------------------------------------------


def _box_mean_numpy(a, size, pad):
    """Mean over size x size windows of zero-padded `a` [H, W], divisor size**2 always."""
    p = np.pad(a, pad)
    h, w = p.shape[0] - size + 1, p.shape[1] - size + 1
    out = np.zeros((h, w))
    for dy in range(size):
        for dx in range(size):
            out += p[dy : dy + h, dx : dx + w]
    return out / size**2


def test_evaluation_scores_follow_the_reference_recipe():
    """21x21 zero-padded box mean (divisor 441) of the raw map, then the max of the 32x32
    'valid' box mean of that smoothed map; maps stay at the model's input resolution."""
    config = tiny.get_config()
    config.eval = default.get_config().eval
    model = build_model(config)

    predict = device_program.make_predict_fn(ModelVariables.from_model(model), config)
    images = np.random.default_rng(2).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    out = predict(images)
    assert out["raw"].shape == out["smoothed"].shape == (2, 64, 64)
    for raw, smoothed, score in zip(out["raw"], out["smoothed"], out["score"], strict=True):
        want_smooth = _box_mean_numpy(raw.astype(np.float64), 21, 10)
        np.testing.assert_allclose(smoothed, want_smooth, rtol=1e-5, atol=1e-7)
        want_score = _box_mean_numpy(want_smooth, 32, 0).max()
        assert _box_mean_numpy(want_smooth, 32, 0).shape == (33, 33)
        np.testing.assert_allclose(score, want_score, rtol=1e-5)
    # The functions themselves on a hot spot at the corner (border attenuation 121/441).
    hot = np.zeros((1, 40, 40), np.float32)
    hot[0] = 1.0
    corner = float(scoring.smooth(jnp.asarray(hot), 21)[0, 0, 0])
    assert corner == pytest.approx(121 / 441, rel=1e-6)


def test_masks_are_resized_by_nearest_neighbour():
    # Pillow nearest samples source pixel floor((i + 0.5) * 4) = 2, 6 when 8 -> 2.
    mask = np.zeros((8, 8), np.uint8)
    mask[2, 6] = 255  # kept: lands on output (0, 1)
    mask[3, 3] = 255  # dropped: between the sampled pixels
    out = input_pipeline.resize_mask(mask, (2, 2))
    np.testing.assert_array_equal(out, [[0, 1], [0, 0]])
    # Upscaling 2 -> 4 repeats each pixel twice: no blending at the edges.
    up = input_pipeline.resize_mask(np.array([[255, 0], [0, 255]], np.uint8), (4, 4))
    np.testing.assert_array_equal(up, np.kron(np.eye(2), np.ones((2, 2))))


# --- the unpickler's allow-list --------------------------------------------------------------


def test_unpickler_allows_exactly_these_globals():
    dtypes = (
        "float64 float32 float16 bfloat16 int64 int32 int16 int8 uint8 uint16 uint32 uint64 bool "
        "complex64 complex128 float8_e4m3fn float8_e5m2 float8_e4m3fnuz float8_e5m2fnuz"
    ).split()
    storages = (
        "Double Float Half BFloat16 Long Int Short Char Byte Bool ComplexFloat ComplexDouble"
    ).split()
    want = {
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor_v3"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_parameter_with_state"),
        ("torch", "Size"),
        ("torch", "UntypedStorage"),
        ("torch.storage", "UntypedStorage"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
        *(("torch", d) for d in dtypes),
        *(("torch", s + "Storage") for s in storages),
    }
    assert set(torch_pickle._ALLOWED) == want
