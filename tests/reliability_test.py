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
from grad_jax import errors
from grad_jax.data import input_pipeline
from grad_jax.runs import checkpointing, run_folder
from grad_jax.training import feature_cache, loop
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


def _checkpoint_steps(run):
    folder = os.path.join(run, "checkpoints")
    if not os.path.isdir(folder):
        return []
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


def _logged_steps(run):
    try:
        return [s for s, _ in _losses(run)]
    except (FileNotFoundError, ValueError, KeyError):
        return []


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing(data, trained, tmp_path):
    """SIGKILL three times, each while training is under way past a checkpoint; every restart
    resumes from a checkpoint, and the end result equals the uninterrupted run's."""
    reference, config = trained
    env = dict(os.environ, JAX_PLATFORMS="cpu", GRAD_JAX_TEST_STEP_DELAY="0.5")
    killed = str(tmp_path / "killed")
    rng = random.Random(1)
    total = 8  # 2 epochs of 4 steps
    for attempt in range(3):
        log = open(tmp_path / f"attempt{attempt}.log", "w+")
        launched = time.time()
        proc = subprocess.Popen(
            [sys.executable, WORKER, killed, *data, "2"], env=env, stdout=log, stderr=log
        )
        start = max(_checkpoint_steps(killed), default=0)
        # Kill after step 5 or 6 was logged by this attempt (metrics.jsonl is rewritten when
        # a run starts): past the checkpoint of epoch 1 (step 4), before the end (step 8).
        target = 5 + rng.randint(0, 1)
        deadline = time.time() + 300
        while proc.poll() is None:
            assert time.time() < deadline
            path = os.path.join(killed, "metrics.jsonl")
            fresh = os.path.exists(path) and os.path.getmtime(path) > launched
            if fresh and max(_logged_steps(killed), default=0) >= target:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log.seek(0)
        text = log.read()
        logged = max(_logged_steps(killed), default=0)
        assert proc.returncode == -signal.SIGKILL
        assert start < logged < total, (attempt, start, logged)  # landed mid-training
        assert (f"resuming from step {start}" in text) == (attempt > 0 and start > 0)
    assert _checkpoint_steps(killed), "no kill landed after a checkpoint"
    resume_from = max(_checkpoint_steps(killed))
    done = subprocess.run(
        [sys.executable, WORKER, killed, *data, "2"],
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"resuming from step {resume_from}" in done.stderr
    assert _losses(killed) == _losses(reference)
    a, b = (run_folder.load_trained(r) for r in (killed, reference))
    assert a.step == b.step == total
    for x, y in (
        (a.variables.params, b.variables.params),
        (a.variables.batch_stats, b.variables.batch_stats),
    ):
        for k in y:
            np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]), err_msg=k)
    with (
        open(os.path.join(killed, "metrics.json")) as f,
        open(os.path.join(reference, "metrics.json")) as g,
    ):
        got, want = json.load(f), json.load(g)
    assert got["mean/image_auroc"] == want["mean/image_auroc"]
    assert got["mean/pixel_auroc"] == want["mean/pixel_auroc"]


def _snapshot(folder):
    """Every path under `folder` with the bytes of each file."""
    out = {}
    for dirpath, dirnames, files in os.walk(folder):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), folder)] = None
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def test_predict_and_eval_never_write_into_the_checkpoints(data, trained, tmp_path):
    """A training job beside us has a save in progress (an Orbax temporary folder): predict
    and eval must leave it, and every checkpoint, byte-identical; predict writes nothing."""
    import shutil

    from grad_jax.evaluation import evaluate
    from grad_jax.inference.predictor import Predictor

    run = str(tmp_path / "run")
    shutil.copytree(trained[0], run)
    steps = _checkpoint_steps(run)
    in_progress = os.path.join(run, "checkpoints", f"{steps[-1] + 4}.orbax-checkpoint-tmp-1")
    os.makedirs(os.path.join(in_progress, "model"))
    with open(os.path.join(in_progress, "model", "part"), "wb") as f:
        f.write(b"half-written")
    before = _snapshot(run)
    predictor = Predictor.from_workdir(run, step=steps[0])
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    predictor.predict([image])
    Predictor.from_workdir(run).predict([image])
    assert _snapshot(run) == before
    evaluate.evaluate_workdir(run)
    after = _snapshot(run)
    checkpoints = {k: v for k, v in before.items() if k.startswith("checkpoints")}
    assert {k: v for k, v in after.items() if k.startswith("checkpoints")} == checkpoints


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A finished 2-epoch run (checkpoints at steps 4 and 8); tests copy it before changing it."""
    run = str(tmp_path_factory.mktemp("trained") / "run")
    config = tiny_config(*data, epochs=2)
    loop.train_and_evaluate(config, run)
    return run, config


def test_damaged_latest_checkpoint_falls_back_with_a_warning(trained, tmp_path, caplog):
    import shutil

    run = str(tmp_path / "run")
    shutil.copytree(trained[0], run)
    ckpt = checkpointing.Checkpoints(run)
    steps = ckpt.steps()
    assert len(steps) == 2
    latest = os.path.join(ckpt.directory, str(steps[-1]), "model")
    for dirpath, _, files in os.walk(latest):
        for name in files:
            with open(os.path.join(dirpath, name), "r+b") as f:
                f.truncate(max(0, os.path.getsize(os.path.join(dirpath, name)) // 3))
    with caplog.at_level(logging.WARNING):
        trained = run_folder.load_trained(run)
    assert trained.step == steps[0]
    assert any("damaged" in r.message or "unreadable" in r.message for r in caplog.records)


def test_nan_loss_names_step_and_files_and_keeps_checkpoint(data, tmp_path, monkeypatch):
    """One image's features turn NaN in epoch 2, after epoch 1's checkpoint was saved: the
    error names the step and the file, and that earlier checkpoint survives and loads."""
    original = feature_cache.cached_batches
    poisoned_name = []

    def poisoned(cache, names, *args, **kwargs):
        poisoned.epochs += 1
        if poisoned.epochs == 2:  # the second epoch, after the first save
            cache[0][3] = np.nan
            poisoned_name.append(names[3])
        return original(cache, names, *args, **kwargs)

    poisoned.epochs = 0
    monkeypatch.setattr(feature_cache, "cached_batches", poisoned)
    run = str(tmp_path / "nan")
    config = tiny_config(*data, epochs=2)
    with pytest.raises(errors.NonFiniteLossError) as err:
        loop.train_and_evaluate(config, run)
    message = str(err.value)
    assert "step" in message and poisoned_name[0] in message
    bad_step = int(message.split("step ")[1].split()[0])
    assert bad_step > 4
    assert checkpointing.Checkpoints(run).steps() == [4]  # epoch 1's checkpoint, kept
    kept = run_folder.load_trained(run)
    assert kept.step == 4
    assert all(np.isfinite(np.asarray(v)).all() for v in kept.variables.params.values())


def test_only_process_zero_builds_the_datasets(monkeypatch, tmp_path):
    """With several processes, process 0 builds first; the others wait at a collective and
    then reuse its build; if process 0 fails, they fail too instead of waiting forever."""
    import jax
    from jax.experimental import multihost_utils

    events = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    for rank, ok in ((0, 1), (1, 1), (1, 0)):
        monkeypatch.setattr(jax, "process_index", lambda rank=rank: rank)

        def barrier(value, rank=rank, ok=ok):
            events.append((rank, "agreed"))
            return np.int32(ok if rank else value)

        monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", barrier)

        def build(rank=rank):
            events.append((rank, "build"))
            return ["builder"]

        if ok:
            assert input_pipeline._first_process_builds(build, "DIR") == ["builder"]
        else:
            with pytest.raises(input_pipeline.DataNotFoundError, match="process 0"):
                input_pipeline._first_process_builds(build, "DIR")
    assert events == [(0, "build"), (0, "agreed"), (1, "agreed"), (1, "build"), (1, "agreed")]
    # open_categories goes through it
    monkeypatch.setattr(jax, "process_count", lambda: 1)
    original, calls = input_pipeline._first_process_builds, []

    def spy(prepare_all, data_dir):
        calls.append(data_dir)
        return original(prepare_all, data_dir)

    monkeypatch.setattr(input_pipeline, "_first_process_builds", spy)
    config = tiny_config(str(_folder(tmp_path)), str(tmp_path / "tfds"), 1)
    assert [c.name for c in input_pipeline.open_categories(config)] == ["hex_nut"]
    assert calls == [str(tmp_path / "tfds")]
