"""notebooks/inspect.ipynb: a clean, valid notebook, executed on CPU against a tiny trained run.

The run executes the notebook as Colab would, cell by cell in a python3 kernel started in the
notebooks/ folder, with its parameters given by environment variables: the session's tiny run
folder, the test images of its generated category, and a CSV under the test's folder.
"""

import csv
import os
import re

import nbformat
import pytest

from grad_jax.data.images import read_image
from grad_jax.inference import result_files
from grad_jax.inference.predictor import Predictor
from tests.conftest import ROOT, assert_clean_notebook

NOTEBOOK = ROOT / "notebooks" / "inspect.ipynb"
CELL_TIMEOUT_S = 300


def read_notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def test_notebook_is_valid_and_clean():
    nb = read_notebook()
    assert_clean_notebook(nb)
    intro = nb.cells[0].source
    assert "colab.research.google.com/assets/colab-badge.svg" in intro
    assert "notebooks/inspect.ipynb" in intro
    assert "GPU or TPU runtime" in intro


def test_parameters_cell_and_model_loading():
    nb = read_notebook()
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert first_code is tagged[0]
    for line in ("MODEL_DIR = None", "GRAD_JAX_INSPECT_WORKDIR", "GRAD_JAX_INSPECT_IMAGES"):
        assert line in tagged[0].source, line
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    # an exported model and a run folder, each one line
    assert "model = load_scorer(model_dir=MODEL_DIR)" in code
    assert "model = load_scorer(workdir=WORKDIR)" in code
    for path in re.findall(r"[\"'](/[^\"'\s]+)[\"']", code):
        assert path.startswith(("/content/", "/dev/accel0")), path


@pytest.mark.parametrize("source", ["run folder", "exported model"])
def test_runs_on_cpu(tiny_run, tmp_path, source):
    from nbclient import NotebookClient

    run_dir, category = tiny_run
    out_csv = tmp_path / "scores.csv"
    nb = read_notebook()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAD_JAX_INSPECT_")}
    if source == "exported model":
        from grad_jax import export

        export.export_workdir(str(run_dir), str(tmp_path / "model"), platforms=("cpu",))
        env["GRAD_JAX_INSPECT_MODEL_DIR"] = str(tmp_path / "model")
    else:
        env["GRAD_JAX_INSPECT_WORKDIR"] = str(run_dir)
    env.update(
        GRAD_JAX_INSPECT_IMAGES=str(category / "test"),
        GRAD_JAX_INSPECT_OUT_CSV=str(out_csv),
        JAX_PLATFORMS="cpu",
    )
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    try:
        client.execute(env=env)
    finally:
        nbformat.write(nb, tmp_path / "executed.ipynb")  # for a look at what went wrong

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2, "the overlays and the histogram"
    assert any("<table>" in o.get("data", {}).get("text/html", "") for o in outputs)

    # the CSV holds every test image with Predictor's score and decision
    with open(out_csv, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    files, _ = result_files.collect_inputs([str(category / "test")])
    assert [r["file"] for r in rows] == [key for _, key in files]
    predictor = Predictor.from_workdir(run_dir, batch_size=4)
    want = predictor.predict([read_image(path) for path, _ in files])
    for r, p in zip(rows, want, strict=True):
        assert float(r["score"]) == pytest.approx(p.score, rel=1e-5), r["file"]
        assert float(r["threshold"]) == pytest.approx(predictor.threshold)
        assert r["decision"] == ("anomalous" if p.is_anomalous else "normal")
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"{len(rows)} images scored, 0 unreadable" in text
