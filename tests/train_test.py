"""End-to-end training on a tiny generated dataset: records, resume, devices and processes.

The runs hold out 4 of the 16 training images for the decision threshold (3 steps of 4 per
epoch) and take BN statistics per group of 2 images, as the unified config does per group of
16. Resumed, multi-device and multi-process runs are compared with the uninterrupted one-device
run on everything a run produces: parameters, BN statistics, optimiser state, the threshold,
the per-image test scores and the metrics.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from grad_jax import errors
from grad_jax.evaluation import evaluate
from grad_jax.models.model import ModelVariables, build_model
from grad_jax.runs import checkpointing
from grad_jax.runs.train_state import TrainState
from grad_jax.training import loop, run_records
from grad_jax.training.optim import make_optimizer
from tests.conftest import ROOT, tiny_category
from tests.train_worker import record_scores, tiny_config

WORKER = str(ROOT / "tests" / "train_worker.py")
HOLDOUT, BN_GROUP, EPOCHS, STEPS = 0.25, 2, 2, 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """16 training images of one class, built into TFDS once."""
    import tfds_mvtec

    base = tmp_path_factory.mktemp("data")
    root = str(tiny_category(base / "demo", num_train=16, num_test_good=3, num_test_defect=2))
    tfds_dir = str(base / "tfds")
    tfds_mvtec.prepare(root, tfds_dir)
    return root, tfds_dir


def config_for(data, epochs=EPOCHS):
    return tiny_config(*data, epochs=epochs, holdout=HOLDOUT, bn_group=BN_GROUP)


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_in_process(config, workdir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluate, "publish", record_scores(evaluate.publish))
        return loop.train_and_evaluate(config, workdir)


@pytest.fixture(scope="module")
def reference_run(data, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ref"))
    values = run_in_process(config_for(data), workdir)
    return workdir, values


def final_checkpoint(workdir, config):
    """(step, train state, meta) of the newest checkpoint, read-only."""
    variables = ModelVariables.from_model(build_model(config))
    tx, _ = make_optimizer(config.train, 1, variables.params)
    state = TrainState.create(variables.params, variables.batch_stats, tx)
    ckpt = checkpointing.Checkpoints(workdir, read_only=True)
    try:
        step, state, _, meta = ckpt.restore_training(state, variables.backbone, config)
        return step, state, meta
    finally:
        ckpt.close()


def assert_same_run(got_dir, want_dir, config, exact=True):
    """Everything two finished runs produced agrees: exactly, or (other device or process
    counts, where sums are reordered) within about ten times the differences measured on the
    tiny runs here: per tensor |a - b| / |b| <= 1e-3 (measured <= 9.2e-5), parameters within
    5e-4 of each other (4.4e-5, a global-grid element: Adam's normalised step magnifies float
    noise in near-zero gradients), per-image scores and the threshold within 5e-6 relative
    (4.4e-7), metrics within 1e-5 (9e-7)."""
    got_step, got, got_meta = final_checkpoint(got_dir, config)
    want_step, want, want_meta = final_checkpoint(want_dir, config)
    assert got_step == want_step == STEPS and got_meta["final"] and want_meta["final"]
    flat_got = jax.tree_util.tree_flatten_with_path(got)[0]
    flat_want = jax.tree_util.tree_flatten_with_path(want)[0]
    assert [p for p, _ in flat_got] == [p for p, _ in flat_want]
    names = {jax.tree_util.keystr(p) for p, _ in flat_got}
    assert any("batch_stats" in n for n in names) and any("opt_state" in n for n in names)
    for (path, a), (_, b) in zip(flat_got, flat_want, strict=True):
        name = jax.tree_util.keystr(path)
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if exact:
            np.testing.assert_array_equal(a, b, err_msg=name)
            continue
        assert np.linalg.norm(a - b) <= 1e-3 * np.linalg.norm(b), name
        if "'params'" in name:
            assert np.abs(a - b).max() <= 5e-4, name
    rel, diff = (0.0, 0.0) if exact else (5e-6, 1e-5)
    th_got, th_want = got_meta["threshold"], want_meta["threshold"]
    assert th_want is not None and th_want["num_images"] == 4
    assert th_got["image_score"] == pytest.approx(th_want["image_score"], rel=rel, abs=0)
    scores = [json.load(open(os.path.join(d, "test_scores.json"))) for d in (got_dir, want_dir)]
    assert sorted(scores[0]) == sorted(scores[1]) and len(scores[1]) >= 5
    for name, value in scores[1].items():
        assert scores[0][name] == pytest.approx(value, rel=rel, abs=0), name
    metrics = [json.load(open(os.path.join(d, "metrics.json"))) for d in (got_dir, want_dir)]
    for key in ("mean/image_auroc", "mean/pixel_auroc", "mean/pixel_aupro"):
        assert metrics[0][key] == pytest.approx(metrics[1][key], rel=0, abs=diff), key


def test_run_records_and_eval_mode(reference_run, data):
    workdir, values = reference_run
    records = losses(workdir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # every step
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
    assert config["train"]["epochs"] == EPOCHS
    # --mode=eval reloads the latest checkpoint and reproduces the final metrics
    again = evaluate.evaluate_workdir(workdir, config_for(data))
    assert again["mean/image_auroc"] == pytest.approx(values["mean/image_auroc"], abs=1e-9)
    assert again["mean/pixel_auroc"] == pytest.approx(values["mean/pixel_auroc"], abs=1e-9)


def _stop_at_step(n):
    """A StopFlag whose request is seen in the batch of step `n` (1-based)."""

    class StopAt(run_records.StopFlag):
        calls = 0

        def requested(self):
            StopAt.calls += 1
            return StopAt.calls == n

    return StopAt


def test_interrupted_run_resumes_exactly(reference_run, data, tmp_path, monkeypatch):
    ref_dir, _ = reference_run
    workdir = str(tmp_path / "resumed")
    monkeypatch.setattr(loop, "StopFlag", _stop_at_step(4))  # the first step of epoch 2
    with pytest.raises(errors.Interrupted, match="stopped at step 5"):
        run_in_process(config_for(data), workdir)
    assert checkpointing.Checkpoints(workdir).steps() == [3, 5]  # epoch 1's end, the stop
    monkeypatch.undo()
    run_in_process(config_for(data), workdir)
    got, want = losses(workdir), losses(ref_dir)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    np.testing.assert_array_equal([r["loss"] for r in got], [r["loss"] for r in want])
    assert_same_run(workdir, ref_dir, config_for(data))


def test_interrupt_at_the_last_step_finishes_on_rerun(reference_run, data, tmp_path, monkeypatch):
    ref_dir, _ = reference_run
    workdir = str(tmp_path / "last")
    monkeypatch.setattr(loop, "StopFlag", _stop_at_step(STEPS))
    with pytest.raises(errors.Interrupted, match="training is complete"):
        run_in_process(config_for(data), workdir)
    monkeypatch.undo()
    run_in_process(config_for(data), workdir)  # evaluates; training is not repeated
    assert_same_run(workdir, ref_dir, config_for(data))


def test_final_save_replaces_a_non_final_checkpoint_of_the_last_step(reference_run, data, tmp_path):
    """Run folders where an older version saved the last step as not final still finish."""
    import shutil

    ref_dir, _ = reference_run
    workdir = str(tmp_path / "legacy")
    shutil.copytree(ref_dir, workdir)
    ckpt = checkpointing.Checkpoints(workdir)
    step, state, meta = final_checkpoint(workdir, config_for(data))
    ckpt.delete(step)
    backbone = ModelVariables.from_model(build_model(config_for(data))).backbone
    ckpt.save(step, state, backbone, config_for(data), {**meta, "final": False})
    ckpt.close()
    run_in_process(config_for(data), workdir)
    assert final_checkpoint(workdir, config_for(data))[2]["final"]


def test_checkpoint_from_another_config_is_refused(reference_run, data):
    workdir, _ = reference_run
    config = config_for(data)
    config.model.ch_exp = 24
    with pytest.raises(checkpointing.CheckpointMismatchError, match="model.ch_exp"):
        evaluate.evaluate_workdir(workdir, config)
    before = open(os.path.join(workdir, "config.json")).read()
    with pytest.raises(checkpointing.CheckpointMismatchError, match="model.ch_exp"):
        loop.train_and_evaluate(config, workdir)  # restarting with other widths
    assert open(os.path.join(workdir, "config.json")).read() == before


@pytest.mark.parametrize("field,value", [("seed", 1), ("train.batch_size", 8), ("train.epochs", 3)])
def test_resume_with_another_batch_seed_or_length_is_refused(reference_run, data, field, value):
    workdir, _ = reference_run
    config = config_for(data)
    section, _, key = field.rpartition(".")
    (config[section] if section else config)[key] = value
    before = open(os.path.join(workdir, "config.json")).read()
    with pytest.raises(checkpointing.CheckpointMismatchError, match=field.replace(".", r"\.")):
        loop.train_and_evaluate(config, workdir)
    assert open(os.path.join(workdir, "config.json")).read() == before


def _run_worker(workdir, data, env_extra, epochs=EPOCHS, log=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **env_extra)
    return subprocess.Popen(
        [sys.executable, WORKER, workdir, *data, str(epochs), str(HOLDOUT), str(BN_GROUP)],
        env=env,
        stdout=log or subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _devices(workdir):
    return json.load(open(os.path.join(workdir, "test_devices.json")))


def test_four_devices_match_one(reference_run, data, tmp_path):
    ref_dir, _ = reference_run
    workdir = str(tmp_path / "four")
    proc = _run_worker(workdir, data, {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert _devices(workdir) == {"devices": 4, "processes": 1}
    assert _devices(ref_dir) == {"devices": 1, "processes": 1}
    np.testing.assert_allclose(
        [r["loss"] for r in losses(workdir)], [r["loss"] for r in losses(ref_dir)], rtol=1e-5
    )
    assert_same_run(workdir, ref_dir, config_for(data), exact=False)


def _two_processes(workdir, data, env_extra=None, logs=None):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [
        _run_worker(
            workdir,
            data,
            {
                "GRAD_JAX_COORDINATOR": f"127.0.0.1:{port}",
                "GRAD_JAX_NUM_PROCESSES": "2",
                "GRAD_JAX_PROCESS_ID": str(rank),
                **(env_extra or {}),
            },
            log=None if logs is None else logs[rank],
        )
        for rank in range(2)
    ]


def test_two_processes_stop_together_on_one_sigterm_resume_and_match_one(
    reference_run, data, tmp_path
):
    """SIGTERM reaches process 1 only (as on one preempted host): both processes stop after the
    same step and save; the rerun finishes and matches the one-process run."""
    ref_dir, _ = reference_run
    workdir = str(tmp_path / "two")
    logs = [open(tmp_path / f"p{r}.log", "w+") for r in range(2)]
    fresh = (data[0], str(tmp_path / "tfds"))  # process 0 builds it, process 1 waits
    procs = _two_processes(workdir, fresh, {"GRAD_JAX_TEST_STEP_DELAY": "1.0"}, logs)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and not (
        os.path.exists(metrics) and len(open(metrics).read().splitlines()) >= 2
    ):
        assert all(p.poll() is None for p in procs), "a worker ended before training started"
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)
    try:
        for p in procs:
            p.wait(timeout=120)  # a process left in a collective alone would hang here
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    text = [(f.seek(0), f.read())[1] for f in logs]
    assert [p.returncode for p in procs] == [130, 130], text[0][-2000:] + text[1][-2000:]
    stopped = checkpointing.Checkpoints(workdir).latest_step()
    assert 2 < stopped < STEPS and "stopped at step" in text[0] and "stopped at step" in text[1]
    assert "waiting for process 0 to build" in text[1]
    procs = _two_processes(workdir, fresh)
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert f"resuming from step {stopped}" in outs[0]
    assert _devices(workdir) == {"devices": 2, "processes": 2}
    np.testing.assert_allclose(
        [r["loss"] for r in losses(workdir)], [r["loss"] for r in losses(ref_dir)], rtol=1e-5
    )
    assert_same_run(workdir, ref_dir, config_for(data), exact=False)
