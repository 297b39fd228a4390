"""End-to-end training on a tiny generated dataset: records, resume, devices and processes."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from grad_jax import checkpointing, evaluate, train
from tests.conftest import ROOT, tiny_category
from tests.train_worker import tiny_config

WORKER = str(ROOT / "tests" / "train_worker.py")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """16 training images of one class (4 steps of 4 per epoch), built into TFDS once."""
    import tfds_mvtec

    base = tmp_path_factory.mktemp("data")
    root = str(tiny_category(base / "demo", num_train=16, num_test_good=3, num_test_defect=2))
    tfds_dir = str(base / "tfds")
    tfds_mvtec.prepare(root, tfds_dir)
    return root, tfds_dir


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def reference_run(data, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ref"))
    values = train.train_and_evaluate(tiny_config(*data, epochs=2), workdir)
    return workdir, values


def test_run_records_and_eval_mode(reference_run, data):
    workdir, values = reference_run
    records = losses(workdir)
    assert [r["step"] for r in records] == list(range(1, 9))  # 2 epochs x 4 steps, every step
    assert set(records[0]) >= {"step", "epoch", "loss", "lr_grid", "lr_net", "images_per_s"}
    assert records[0]["lr_grid"] == pytest.approx(0.1) and records[0]["lr_net"] == pytest.approx(
        1e-3
    )
    with open(os.path.join(workdir, "metrics.json")) as f:
        saved = json.load(f)
    for key in ("hex_nut/image_auroc", "mean/image_auroc", "mean/pixel_auroc", "mean/pixel_aupro"):
        assert key in saved
    assert "not selected on the test set" in saved["model"]
    config = json.load(open(os.path.join(workdir, "config.json")))
    assert config["train"]["epochs"] == 2
    # --mode=eval reloads the latest checkpoint and reproduces the final metrics
    again = evaluate.evaluate_workdir(workdir, tiny_config(*data, epochs=2))
    assert again["mean/image_auroc"] == pytest.approx(values["mean/image_auroc"], abs=1e-9)
    assert again["mean/pixel_auroc"] == pytest.approx(values["mean/pixel_auroc"], abs=1e-9)


def test_interrupted_run_resumes_exactly(reference_run, data, tmp_path, monkeypatch):
    ref_dir, _ = reference_run
    workdir = str(tmp_path / "resumed")

    class StopAfterSix(train.StopFlag):
        calls = 0

        def requested(self):
            StopAfterSix.calls += 1
            return StopAfterSix.calls == 6  # mid-way through the second epoch

    monkeypatch.setattr(train, "StopFlag", StopAfterSix)
    with pytest.raises(train.Interrupted):
        train.train_and_evaluate(tiny_config(*data, epochs=2), workdir)
    assert checkpointing.Checkpoints(workdir).latest_step() == 6
    monkeypatch.undo()
    train.train_and_evaluate(tiny_config(*data, epochs=2), workdir)
    got, want = losses(workdir), losses(ref_dir)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    np.testing.assert_array_equal([r["loss"] for r in got], [r["loss"] for r in want])


def test_checkpoint_from_another_config_is_refused(reference_run, data):
    workdir, _ = reference_run
    config = tiny_config(*data, epochs=2)
    config.model.ch_exp = 24
    with pytest.raises(checkpointing.CheckpointMismatchError, match="model.ch_exp"):
        evaluate.evaluate_workdir(workdir, config)
    before = open(os.path.join(workdir, "config.json")).read()
    with pytest.raises(checkpointing.CheckpointMismatchError, match="model.ch_exp"):
        train.train_and_evaluate(config, workdir)  # restarting with other widths
    assert open(os.path.join(workdir, "config.json")).read() == before


def _run_worker(workdir, data, env_extra, epochs=2):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **env_extra)
    return subprocess.Popen(
        [sys.executable, WORKER, workdir, *data, str(epochs)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _assert_same_losses(got, want, steps=5):
    got = np.array([r["loss"] for r in got][:steps])
    want = np.array([r["loss"] for r in want][:steps])
    assert len(got) == steps
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_four_devices_match_one(reference_run, data, tmp_path):
    ref_dir, _ = reference_run
    workdir = str(tmp_path / "four")
    proc = _run_worker(workdir, data, {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    _assert_same_losses(losses(workdir), losses(ref_dir))


def test_two_processes_match_one(reference_run, data, tmp_path):
    ref_dir, _ = reference_run
    workdir = str(tmp_path / "two")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        _run_worker(
            workdir,
            data,
            {
                "GRAD_JAX_COORDINATOR": f"127.0.0.1:{port}",
                "GRAD_JAX_NUM_PROCESSES": "2",
                "GRAD_JAX_PROCESS_ID": str(rank),
            },
        )
        for rank in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    _assert_same_losses(losses(workdir), losses(ref_dir))
