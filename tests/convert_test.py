"""The conversion CLI: official CRAD checkpoints -> run folders, backbone files, bad files."""

import os
import pickle
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import ROOT, require_module  # noqa: E402

torch = require_module("torch", "pip install -e '.[test]'")

from grad_jax.config import load_config_file  # noqa: E402
from grad_jax.inference.device_program import make_predict_fn  # noqa: E402
from grad_jax.runs import run_folder  # noqa: E402
from grad_jax.weights import state_dicts  # noqa: E402
from tests import torch_reference as ref  # noqa: E402

CONFIG = textwrap.dedent(
    """
    from grad_jax.configs import tiny

    def get_config():
        config = tiny.get_config()
        config.model.backbone = "efficientnet-b0"
        config.model.ch_exp = 32
        return config
    """
)


def run_cli(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "grad_jax.convert", *args],
        cwd=cwd, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )  # fmt: skip


@pytest.fixture(scope="module")
def torch_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("convert")
    config_path = tmp / "convert_config.py"  # imports configs.tiny (the CLI runs in ROOT)
    config_path.write_text(CONFIG)
    backbone = ref.efficientnet("efficientnet-b0", 64)
    # C = 40 + 112: B0's blocks 4 and 10; features 8x8 at 64 px
    head = ref.TorchCRAD(40 + 112, (8, 8), 4, 2, 2, 32, 8)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        for name, p in head.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "query" in name else 0.2))
    model = ref.TorchGrad(backbone, [4, 10], [8, 16], 8, head).eval()
    return model, tmp, config_path


def test_crad_checkpoint_becomes_a_run_folder(torch_model):
    model, tmp, config_path = torch_model
    ckpt = tmp / "ckpt_best.pth.tar"
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 40, "state_dict": state, "best_metric": np.float64(0.9)}, ckpt)
    out = tmp / "run"
    result = run_cli(f"--torch-checkpoint={ckpt}", f"--config={config_path}", f"--workdir={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "source epoch 40" in result.stdout
    trained = run_folder.load_trained(str(out))
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    got = make_predict_fn(trained.variables, trained.config)(images)["raw"]
    mean = np.array([0.485, 0.456, 0.406], np.float32)  # ImageNet, as the lukemelas B0
    std = np.array([0.229, 0.224, 0.225], np.float32)
    x = (images.astype(np.float32) / 255.0 - mean) / std
    with torch.no_grad():
        want = model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
    want = want["anomaly_map"].numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    # the converted folder refuses to be overwritten
    again = run_cli(f"--torch-checkpoint={ckpt}", f"--config={config_path}", f"--workdir={out}")
    assert again.returncode == 2 and "already holds checkpoints" in again.stderr
    # an official checkpoint is a GRAD model (no kNN bank), whatever kind the config deploys
    knn_out = tmp / "run_knn_config"
    result = run_cli(
        f"--torch-checkpoint={ckpt}",
        f"--config={config_path}",
        "--config.model.kind=knn",
        f"--workdir={knn_out}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    converted = run_folder.load_trained(str(knn_out))
    assert converted.config.model.kind == "grad"
    np.testing.assert_array_equal(
        make_predict_fn(converted.variables, converted.config)(images)["raw"], got
    )


def test_backbone_file_to_npz_and_back(torch_model):
    model, tmp, config_path = torch_model
    pth = tmp / "efficientnet-b0.pth"
    torch.save(model.backbone.state_dict(), pth)
    npz = tmp / "b0.npz"
    result = run_cli(f"--torch-backbone={pth}", f"--config={config_path}", f"--out={npz}")
    assert result.returncode == 0, result.stderr[-2000:]
    config = load_config_file(str(config_path))
    from grad_jax.models.model import build_model

    from_pth, from_npz = build_model(config), build_model(config)
    state_dicts.load_backbone(from_pth, "efficientnet-b0", str(pth))
    state_dicts.load_backbone(from_npz, "efficientnet-b0", str(npz))
    x = jnp.asarray(np.random.default_rng(1).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8))
    for a, b in zip(from_pth.extract(x), from_npz.extract(x), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zip_format", [False, True])
def test_malicious_file_is_one_clear_line(torch_model, tmp_path, zip_format):
    _, _, config_path = torch_model
    marker = tmp_path / "pwned"
    bad = tmp_path / "ckpt.pth"
    if zip_format:
        import zipfile

        with zipfile.ZipFile(bad, "w") as zf:
            zf.writestr("archive/data.pkl", pickle.dumps({"state_dict": _Payload(marker)}))
    else:
        import torch.serialization as ts

        with open(bad, "wb") as f:
            for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001}):
                pickle.dump(header, f, protocol=2)
            pickle.dump({"state_dict": _Payload(marker)}, f, protocol=2)
            pickle.dump([], f, protocol=2)
        del ts
    result = run_cli(
        f"--torch-checkpoint={bad}", f"--config={config_path}", f"--workdir={tmp_path / 'out'}"
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("grad_jax:")]
    assert len(lines) == 1 and "system" in lines[0] and "ckpt.pth" in lines[0]
    assert not marker.exists()


def test_not_a_crad_checkpoint_and_missing_file(torch_model, tmp_path):
    model, _, config_path = torch_model
    only_backbone = tmp_path / "backbone_only.pth"
    torch.save(model.backbone.state_dict(), only_backbone)
    result = run_cli(
        f"--torch-checkpoint={only_backbone}",
        f"--config={config_path}",
        f"--workdir={tmp_path / 'o'}",
    )
    assert result.returncode == 2 and "not an official CRAD" in result.stderr
    missing = run_cli(
        f"--torch-checkpoint={tmp_path / 'nope.pth'}",
        f"--config={config_path}",
        f"--workdir={tmp_path / 'o2'}",
    )
    assert missing.returncode == 2 and "nope.pth" in missing.stderr
    assert "Traceback" not in missing.stderr
