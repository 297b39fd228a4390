"""Non-square inputs: (height, width) sizes, 'auto' from the training images, and a 2.5:1
dataset that trains, evaluates and predicts end to end.

Only the comparisons with the PyTorch reference need torch (`_torch_reference`); the rest runs
without it, and with `CI=true` a missing torch fails those two tests instead of skipping them.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from grad_jax.configs import tiny
from PIL import Image

from grad_jax import errors, predict
from grad_jax.config import validate_config
from grad_jax.data import input_pipeline
from grad_jax.evaluation import evaluate
from grad_jax.models import scoring
from grad_jax.models.neck import mfcn
from grad_jax.runs import run_folder
from grad_jax.training import loop
from tests.conftest import require_module

TALL = (200, 80)  # a line-scan-like part, 2.5 times taller than wide


def tall_category(base, num_train=8, num_good=3, num_defect=3, size=TALL, seed=0):
    """An MVTec-layout category of striped tall images; defects are dark ellipses (with masks).

    One training image is square, so the median (not the mean) aspect ratio is what 'auto' must
    use to land on 2.5:1.
    """
    rng = np.random.default_rng(seed)
    root = base / "tall"

    def background(h, w):
        y = np.arange(h)[:, None]
        stripes = 120 + 40 * np.sin(2 * np.pi * y / 13 + rng.uniform(0, 6)) + 0 * np.arange(w)
        return stripes + rng.normal(0, 6, (h, w))

    def save(array, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).save(path)

    for i in range(num_train):
        h, w = (120, 120) if i == 0 else size
        save(background(h, w), root / "train" / "good" / f"{i:03d}.png")
    for i in range(num_good):
        save(background(*size), root / "test" / "good" / f"{i:03d}.png")
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    for i in range(num_defect):
        cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.3, 0.7) * w
        inside = ((yy - cy) / 14) ** 2 + ((xx - cx) / 9) ** 2 <= 1
        image = background(h, w)
        image[inside] = 20
        save(image, root / "test" / "dent" / f"{i:03d}.png")
        save(inside * 255.0, root / "ground_truth" / "dent" / f"{i:03d}_mask.png")
    return root


def test_auto_size_uses_the_median_aspect_ratio_and_stride():
    sizes = [(200, 80)] * 5 + [(120, 120)] * 2
    assert input_pipeline.auto_image_size(sizes, 80 * 32, 16) == (80, 32)
    # transposed images give the transposed size: height first
    assert input_pipeline.auto_image_size([(80, 200)] * 3, 80 * 32, 16) == (32, 80)
    # about the configured pixel count, each side a stride multiple (224^2 at 2.5:1 -> 352x144)
    h, w = input_pipeline.auto_image_size([(2500, 1000)], 224 * 224, 16)
    assert (h % 16, w % 16) == (0, 0) and (h, w) == (352, 144)
    assert input_pipeline.auto_image_size([(10, 4000)], 64 * 64, 16) == (16, 256)


def test_image_size_validation():
    config = tiny.get_config()
    config.data.image_size = (100, 64)
    with pytest.raises(errors.ConfigError, match=r"data.image_size=\(100, 64\).*multiples of .*16"):
        validate_config(config)
    config.data.image_size = "auto"
    validate_config(config)
    config.data.auto_pixels = 100
    with pytest.raises(errors.ConfigError, match="data.auto_pixels=100"):
        validate_config(config)


def _torch_reference():
    """(torch, the PyTorch reference module, parity_test's helpers), or `missing(...)`."""
    torch = require_module("torch", "pip install -e '.[test]'")
    from tests import parity_test
    from tests import torch_reference as ref

    return torch, ref, parity_test


def test_neck_and_head_on_a_non_square_feature_map_match_pytorch():
    """The align-corners upsampling (neck and map), the [G, G, H, W, C] global grid and the
    local lookup at H != W, against the PyTorch reference built from the method specification."""
    torch, ref, parity = _torch_reference()
    assert_close, nchw = parity.assert_close, parity.nchw
    rng = np.random.default_rng(0)
    f3 = rng.normal(size=(2, 10, 4, 5)).astype(np.float32)
    f4 = rng.normal(size=(2, 5, 2, 7)).astype(np.float32)
    got = mfcn([jnp.asarray(f3), jnp.asarray(f4)], (8, 16), 8)
    want = ref.mfcn(
        [torch.from_numpy(nchw(f3).copy()), torch.from_numpy(nchw(f4).copy())], [8, 16], 8
    )
    assert got.shape == (2, 10, 4, 12)
    assert_close(nchw(got), want, "neck")

    ours, theirs = parity._tiny_head(feature_hw=(10, 4))
    x = rng.normal(size=(3, 10, 4, 12)).astype(np.float32) * 2
    got = ours(jnp.asarray(x), train=False)
    with torch.no_grad():
        want = theirs.eval()(torch.from_numpy(nchw(x).copy()))
    assert got.anomaly_map.shape == (3, 40, 16)
    assert_close(nchw(got.reconstruction), want["reconstruction"], "reconstruction")
    assert_close(got.anomaly_map, want["anomaly_map"], "anomaly map")


def test_smoothing_and_scores_on_a_non_square_map():
    torch, _, _ = _torch_reference()
    rng = np.random.default_rng(0)
    maps = rng.random((2, 50, 20)).astype(np.float32)
    maps[1, 30:36, 4:9] += 5
    t = torch.from_numpy(maps)[:, None]
    want_smooth = torch.nn.functional.avg_pool2d(t, 7, 1, 3)
    want_score = torch.nn.functional.avg_pool2d(want_smooth, 16, 1).amax(dim=(1, 2, 3))
    got_smooth = scoring.smooth(jnp.asarray(maps), 7)
    np.testing.assert_allclose(np.asarray(got_smooth), want_smooth[:, 0].numpy(), atol=1e-5)
    got_score = scoring.image_scores(got_smooth, 16)
    np.testing.assert_allclose(np.asarray(got_score), want_score.numpy(), rtol=1e-5)


@pytest.fixture(scope="module")
def tall_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("tall")
    root = tall_category(base)
    config = tiny.get_config()
    config.data.root = str(root)
    config.data.data_dir = str(base / "tfds")
    config.data.image_size = "auto"
    config.data.auto_pixels = 80 * 32
    config.train.epochs = 1
    config.threshold.holdout_fraction = 0.25
    workdir = base / "run"
    values = loop.train_and_evaluate(config, str(workdir))
    return root, workdir, values, config


def test_tall_dataset_trains_evaluates_and_predicts(tall_run):
    root, workdir, values, config = tall_run
    saved_config = run_folder.read_config(str(workdir))
    assert tuple(saved_config.data.image_size) == (80, 32)  # (height, width) from 'auto'
    saved = json.loads((workdir / "metrics.json").read_text())
    for key in ("tall/image_auroc", "tall/pixel_auroc", "tall/pixel_aupro"):
        assert isinstance(saved[key], float)
    assert (workdir / "report" / "index.html").is_file()

    # --mode=eval with the 'auto' config evaluates at the size the run chose.
    again = evaluate.evaluate_workdir(str(workdir), config)
    assert again["tall/pixel_auroc"] == pytest.approx(values["tall/pixel_auroc"], abs=1e-9)

    # Masks follow the image: the evaluated mask is the nearest-resized file at (80, 32).
    categories = input_pipeline.open_categories(saved_config)
    source = input_pipeline.IndexedSource(
        [c.test for c in categories], input_pipeline.test_items(categories, 0), (80, 32), ["tall"]
    )
    item = next(source[i] for i in range(len(source)) if "dent/000" in source[i]["filename"])
    mask_file = np.asarray(Image.open(root / "ground_truth" / "dent" / "000_mask.png"))
    want = np.asarray(Image.fromarray(mask_file).resize((32, 80), Image.NEAREST)) > 0
    assert item["image"].shape == (80, 32, 3)
    np.testing.assert_array_equal(item["mask"] != 0, want)

    # predict: maps at the model size, overlays at the original (tall) size.
    out = workdir / "scored"
    test_dir = root / "test" / "dent"
    assert predict.main(["predict", f"--workdir={workdir}", f"--out={out}", str(test_dir)]) == 0
    with np.load(out / "maps.npz") as maps:
        assert {maps[k].shape for k in maps.files} == {(80, 32)}
    overlay = Image.open(out / "overlays" / "000.png")
    assert overlay.size == (TALL[1], TALL[0])
