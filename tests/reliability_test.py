"""Faults and bad input: corrupt images, bad layouts, killed runs, damaged checkpoints, NaN
losses and bad configs. Each case ends in one clear message, and nothing is lost."""

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import tfds_mvtec
from grad_jax import checkpointing, input_pipeline, train, workdir
from tests.conftest import ROOT, tiny_category
from tests.train_worker import tiny_config

WORKER = str(ROOT / "tests" / "train_worker.py")


def _folder(tmp_path, n_train=8):
    return tiny_category(tmp_path / "demo", num_train=n_train)


def _main(*args, env=None, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "grad_jax.main", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})),
    )  # fmt: skip


# --- images ----------------------------------------------------------------------------------


def test_tiny_huge_and_odd_images_load_as_rgb(tmp_path):
    root = _folder(tmp_path)
    good = root / "train" / "good"
    Image.fromarray(np.full((20, 24), 90, np.uint8)).save(good / "tiny_gray.png")
    Image.fromarray((np.random.default_rng(0).random((300, 8200, 3)) * 255).astype(np.uint8)).save(
        good / "huge.png"
    )
    Image.fromarray(np.full((64, 64, 4), 200, np.uint8), "RGBA").save(good / "rgba.png")
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(
        good / "deep.png"
    )
    Image.fromarray(np.zeros((40, 40), np.uint8)).convert("P").save(good / "palette.png")
    builder = tfds_mvtec.prepare(str(root), str(tmp_path / "tfds"))
    source = builder.as_data_source()["train"]
    items = [input_pipeline.Item(0, i) for i in range(len(source))]
    loader = input_pipeline.IndexedSource([source], items, (64, 64), ["hex_nut"])
    names = []
    for i in range(len(loader)):
        row = loader[i]
        assert row["image"].shape == (64, 64, 3) and row["image"].dtype == np.uint8
        names.append(row["filename"])
    assert len(names) == 13 and any("huge" in n for n in names)
    deep = next(loader[i] for i in range(len(loader)) if "deep" in loader[i]["filename"])
    assert deep["image"].max() > 200  # 16-bit scaled to 8 bits, not clipped to 255 or 0


def test_corrupt_training_image_stops_with_its_name_or_is_skipped(tmp_path):
    root = _folder(tmp_path)
    bad = root / "train" / "good" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # truncated PNG
    args = [
        "--config=configs/tiny.py",
        f"--config.data.root={root}",
        f"--config.data.data_dir={tmp_path / 'tfds'}",
        "--config.train.epochs=1",
    ]
    result = _main(*args, f"--workdir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr[-2000:]
    message = result.stderr.strip().splitlines()[-1]
    assert "broken.png" in message and "Traceback" not in result.stderr
    skipped = _main(
        *args,
        "--config.data.skip_bad_images=True",
        f"--config.data.data_dir={tmp_path / 'tfds2'}",
        f"--workdir={tmp_path / 'run2'}",
    )
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    assert "skipped 1" in (skipped.stderr + skipped.stdout).lower()


# --- layouts ---------------------------------------------------------------------------------


def test_layout_problems_are_named_with_the_fix(tmp_path):
    config = tiny_config(str(tmp_path / "missing"), str(tmp_path / "tfds"), 1)
    with pytest.raises(input_pipeline.DataNotFoundError, match="does not exist"):
        input_pipeline.open_categories(config)
    root = _folder(tmp_path)
    for mask in (root / "ground_truth").rglob("*.png"):
        mask.unlink()
        break
    config = tiny_config(str(root), str(tmp_path / "tfds"), 1)
    with pytest.raises(tfds_mvtec.DatasetLayoutError, match="mask"):
        input_pipeline.open_categories(config)
    config.data.dataset = "mvtec_ad"
    config.data.categories = ("bottle",)
    config.data.root = str(tmp_path / "empty_manual")
    with pytest.raises(tfds_mvtec.DatasetLayoutError, match="mvtec"):
        input_pipeline.open_categories(config)


def test_cli_reports_missing_data_in_one_line(tmp_path):
    result = _main(
        "--config=configs/folder.py",
        f"--config.data.root={tmp_path / 'nowhere'}",
        f"--workdir={tmp_path / 'run'}",
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "nowhere" in result.stderr and "does not exist" in result.stderr


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override,expected",
    [
        ("--config.model.no_such_key=1", "no key 'model.no_such_key'"),
        ("--config.train.epochs=many", "invalid literal"),
        ("--config.train.batch_size=6", "multiple of the 4 devices"),
    ],
)
def test_bad_config_fails_at_start(tmp_path, override, expected):
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    result = _main("--config=configs/tiny.py", override, f"--workdir={tmp_path}", env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    assert expected in result.stderr and "Traceback" not in result.stderr


# --- checkpoints -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("rel")
    root = _folder(base, n_train=16)
    tfds_mvtec.prepare(str(root), str(base / "tfds"))
    return str(root), str(base / "tfds")


def _losses(path):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f)]


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing(data, tmp_path):
    epochs = "4"
    reference = str(tmp_path / "reference")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    subprocess.run(
        [sys.executable, WORKER, reference, *data, epochs],
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    killed = str(tmp_path / "killed")
    rng = random.Random(1)
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, WORKER, killed, *data, epochs],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(8, 20))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = subprocess.run(
        [sys.executable, WORKER, killed, *data, epochs],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert _losses(killed) == _losses(reference)
    with open(os.path.join(killed, "metrics.json")) as f:
        assert "mean/image_auroc" in json.load(f)


def test_damaged_latest_checkpoint_falls_back_with_a_warning(data, tmp_path, caplog):
    run = str(tmp_path / "run")
    config = tiny_config(*data, epochs=2)
    train.train_and_evaluate(config, run)
    ckpt = checkpointing.Checkpoints(run)
    steps = ckpt.steps()
    assert len(steps) == 2
    latest = os.path.join(ckpt.directory, str(steps[-1]), "model")
    for dirpath, _, files in os.walk(latest):
        for name in files:
            with open(os.path.join(dirpath, name), "r+b") as f:
                f.truncate(max(0, os.path.getsize(os.path.join(dirpath, name)) // 3))
    with caplog.at_level(logging.WARNING):
        trained = workdir.load_trained(run)
    assert trained.step == steps[0]
    assert any("damaged" in r.message or "unreadable" in r.message for r in caplog.records)


def test_nan_loss_names_step_and_files_and_keeps_checkpoint(data, tmp_path, monkeypatch):
    original = train.build_feature_cache
    poisoned_name = []

    def poisoned(*args, **kwargs):
        cache, names = original(*args, **kwargs)
        cache[0][3] = np.nan  # one image's features
        poisoned_name.append(names[3])
        return cache, names

    monkeypatch.setattr(train, "build_feature_cache", poisoned)
    run = str(tmp_path / "nan")
    config = tiny_config(*data, epochs=2)
    with pytest.raises(train.NonFiniteLossError) as err:
        train.train_and_evaluate(config, run)
    message = str(err.value)
    assert "step" in message and poisoned_name[0] in message
    steps = checkpointing.Checkpoints(run).steps()
    assert all(s < int(message.split("step ")[1].split()[0]) for s in steps)
