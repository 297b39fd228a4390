"""notebooks/colab_tpu.ipynb: a clean, valid notebook, and a CPU run of its SMOKE mode.

The run executes the notebook as Colab would, cell by cell in a python3 kernel started in the
notebooks/ folder, with SMOKE turned on by environment variable: a tiny generated dataset and
configs/tiny.py, with the run folder and all data under the test's temporary folder.
"""

import json
import os
import re
import time

import nbformat
import pytest

from tests.conftest import ROOT, assert_clean_notebook

NOTEBOOK = ROOT / "notebooks" / "colab_tpu.ipynb"
CELL_TIMEOUT_S = 300


def read_notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def code_of(nb) -> str:
    return "\n".join(c.source for c in nb.cells if c.cell_type == "code")


def test_notebook_is_valid_and_clean():
    nb = read_notebook()
    assert_clean_notebook(nb)


def test_parameters_cell():
    nb = read_notebook()
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    source = tagged[0].source
    for line in (
        "SMOKE = False",
        'DRIVE_MANUAL_DIR = "/content/drive/MyDrive/mvtec"',
        'WORKDIR = "/content/drive/MyDrive/grad_jax_runs/unified"',
        "CATEGORIES = None",
        "EPOCHS = None",
        'B4_WEIGHTS = "/content/drive/MyDrive/weights/efficientnet-b4-6ed6700e.pth"',
        "GRAD_JAX_NOTEBOOK_SMOKE",
        "GRAD_JAX_NOTEBOOK_WORKDIR",
    ):
        assert line in source, line
    # the parameters come first: nothing but markdown before them
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert first_code is tagged[0]


def test_full_run_path_uses_the_project_entry_points():
    nb = read_notebook()
    text = "\n".join(c.source for c in nb.cells)
    code = code_of(nb)
    assert "configs/unified.py" in text
    for call in (
        "unified.get_config()",
        "config.model.backbone_weights = B4_WEIGHTS",
        "tfds_mvtec.prepare(category, TFDS_DATA_DIR, manual_dir=DRIVE_MANUAL_DIR)",
        "loop.train_and_evaluate(config, WORKDIR)",
        "Predictor.from_workdir(WORKDIR)",
        "heatmap.overlay(",
        "drive.mount(",
        "jax.devices()",
        '"google.colab" in sys.modules',
    ):
        assert call in code, call
    # absolute paths only on the Colab machine
    for path in re.findall(r"[\"'](/[^\"'\s]+)[\"']", code):
        assert path.startswith("/content/"), path


def test_smoke_run_on_cpu(tmp_path):
    from nbclient import NotebookClient

    nb = read_notebook()
    workdir = tmp_path / "run"
    env = dict(
        os.environ,
        GRAD_JAX_NOTEBOOK_SMOKE="1",
        GRAD_JAX_NOTEBOOK_WORKDIR=str(workdir),
        GRAD_JAX_NOTEBOOK_SMOKE_DIR=str(tmp_path / "scratch"),
        JAX_PLATFORMS="cpu",
    )
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    start = time.monotonic()
    try:
        client.execute(env=env)
    finally:
        # the executed copy, for a look at what went wrong; the repository file is not touched
        nbformat.write(nb, tmp_path / "executed.ipynb")
    elapsed = time.monotonic() - start

    assert (workdir / "metrics.json").is_file()
    with open(workdir / "metrics.json", encoding="utf-8") as f:
        values = json.load(f)
    assert {"hex_nut/image_auroc", "fabric/image_auroc", "mean/image_auroc"} <= set(values)
    assert (workdir / "report" / "index.html").is_file()
    assert not (tmp_path / "scratch" / "run").exists()  # the WORKDIR variable was honoured

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3, "ROC curves, examples and heat-maps should be displayed"

    # the model reloaded from the checkpoint scores the images as the evaluation did
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    pairs = re.findall(r": score (\S+), evaluation (\S+)", text)
    assert pairs, text[-2000:]
    for reloaded, evaluated in pairs:
        assert float(reloaded) == pytest.approx(float(evaluated), rel=1e-4, abs=1e-6)
    print(f"notebook smoke run: {elapsed:.0f} s")


def test_full_mode_outside_colab_stops_early_with_instructions(tmp_path):
    """Without the MVTec AD folder, the full mode fails before any work, saying what to do."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = read_notebook()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAD_JAX_NOTEBOOK_")}
    env.update(GRAD_JAX_NOTEBOOK_WORKDIR=str(tmp_path / "run"), JAX_PLATFORMS="cpu")
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    with pytest.raises(CellExecutionError) as err:
        client.execute(env=env)
    message = str(err.value)
    assert "FileNotFoundError" in message and "DRIVE_MANUAL_DIR" in message
    assert "mvtec_anomaly_detection.tar.xz" in message
    assert not (tmp_path / "run").exists()
