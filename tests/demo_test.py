"""Tests for the embedded synthetic demo dataset (grad_jax.data.demo)."""

import hashlib
import json
import os
import pathlib

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from grad_jax.data import demo
from grad_jax.data.demo import build
from grad_jax.data.demo.defects import CLASS_SPECS

SMALL = dict(num_train=3, num_test_good=2, num_test_defect=2, image_size=64)


def _pngs(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.png"))


def _hashes(root: pathlib.Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def small_build(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("demo_a") / "demo"
    return demo.generate_demo_dataset(root, progress=False, **SMALL)


def test_registry_has_textures_objects_and_three_defects_each():
    kinds = {CLASS_SPECS[c].kind for c in demo.DEMO_CLASSES}
    assert kinds == {"texture", "object"}
    assert len(demo.DEMO_CLASSES) >= 4
    for cls in demo.DEMO_CLASSES:
        assert len(demo.DEMO_DEFECTS[cls]) >= 3, cls
        assert "good" not in demo.DEMO_DEFECTS[cls]


def test_layout_counts_and_masks(small_build):
    root = small_build
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(demo.DEMO_CLASSES)
    size = SMALL["image_size"]
    for cls in demo.DEMO_CLASSES:
        base = root / cls
        want = [f"{i:03d}.png" for i in range(SMALL["num_train"])]
        assert _pngs(base / "train" / "good") == want
        assert [p.name for p in (base / "train").iterdir()] == ["good"]
        want = [f"{i:03d}.png" for i in range(SMALL["num_test_good"])]
        assert _pngs(base / "test" / "good") == want
        defects = sorted(p.name for p in (base / "test").iterdir() if p.name != "good")
        assert defects == sorted(demo.DEMO_DEFECTS[cls])
        assert sorted(p.name for p in (base / "ground_truth").iterdir()) == defects
        for d in defects:
            images = _pngs(base / "test" / d)
            assert images == [f"{i:03d}.png" for i in range(SMALL["num_test_defect"])]
            masks = _pngs(base / "ground_truth" / d)
            assert masks == [n.replace(".png", "_mask.png") for n in images]
            for name in images:
                img = Image.open(base / "test" / d / name)
                mask = Image.open(base / "ground_truth" / d / name.replace(".png", "_mask.png"))
                assert img.mode == "RGB" and img.size == (size, size)
                assert mask.mode == "L" and mask.size == img.size
                m = np.asarray(mask)
                assert set(np.unique(m).tolist()) == {0, 255}, (cls, d, name)
                assert (m > 0).mean() < 0.25, "a mask should mark a defect, not the image"
        # Good images have no masks: every mask belongs to exactly one defect image.
        assert len(list(base.rglob("*_mask.png"))) == len(defects) * SMALL["num_test_defect"]
        assert not (base / "ground_truth" / "good").exists()


def test_marker_and_readme(small_build):
    marker = json.loads((small_build / ".complete").read_text())
    assert marker["version"] == demo.DEMO_VERSION
    assert marker["classes"] == list(demo.DEMO_CLASSES)
    for key, value in SMALL.items():
        assert marker[key] == value
    n_files = len(list(small_build.rglob("*.png")))
    n_masks = len(list(small_build.rglob("*_mask.png")))
    assert marker["num_images"] == n_files - n_masks
    readme = (small_build / "README.txt").read_text()
    for cls in demo.DEMO_CLASSES:
        assert cls in readme
        for d in demo.DEMO_DEFECTS[cls]:
            assert d in readme


def test_build_is_byte_identical_and_per_image_seeded(small_build, tmp_path):
    again = demo.generate_demo_dataset(tmp_path / "b", progress=False, **SMALL)
    assert _hashes(again) == _hashes(small_build)
    # A partial build (one class, fewer images) gives the very same files for what it has.
    part = demo.generate_demo_dataset(
        tmp_path / "c", classes=["wood"], progress=False, **{**SMALL, "num_train": 2}
    )
    ref = _hashes(small_build)
    for rel, digest in _hashes(part).items():
        if rel.endswith(".png"):
            assert ref[rel] == digest, rel
    # ... and the seed matters.
    other = demo.generate_demo_dataset(
        tmp_path / "d", classes=["wood"], seed=1, progress=False, **SMALL
    )
    same = [rel for rel, h in _hashes(other).items() if rel.endswith(".png") and ref[rel] == h]
    assert same == []


def test_files_are_what_the_renderer_makes(small_build):
    for cls in demo.DEMO_CLASSES:
        d = demo.DEMO_DEFECTS[cls][0]
        _, image, mask = build._render_sample(cls, "test", d, 1, image_size=SMALL["image_size"])
        on_disk = np.asarray(Image.open(small_build / cls / "test" / d / "001.png"))
        np.testing.assert_array_equal(on_disk, image)
        gt = np.asarray(Image.open(small_build / cls / "ground_truth" / d / "001_mask.png"))
        np.testing.assert_array_equal(gt, mask)
        clean, image, none = build._render_sample(cls, "train", "good", 2, image_size=64)
        assert none is None
        np.testing.assert_array_equal(clean, image)
        on_disk = np.asarray(Image.open(small_build / cls / "train" / "good" / "002.png"))
        np.testing.assert_array_equal(on_disk, image)


@pytest.mark.parametrize("cls", demo.DEMO_CLASSES)
def test_masks_are_exact(cls):
    """The defect changes the image only inside its mask (up to a 2 px rim), strongly."""
    size = 128
    for d in demo.DEMO_DEFECTS[cls]:
        for index in range(3):
            clean, image, mask = build._render_sample(cls, "test", d, index, image_size=size)
            diff = np.abs(clean.astype(np.int16) - image.astype(np.int16)).max(axis=-1)
            m = mask > 0
            assert m.sum() >= 12, (cls, d, index)
            near = ndimage.binary_dilation(m, iterations=2)
            assert diff[~near].max(initial=0) <= 3, (cls, d, index)
            # Inside the mask the change is substantial, and it covers most of the mask.
            assert diff[m].mean() >= 15, (cls, d, index, diff[m].mean())
            assert (diff[m] > 4).mean() >= 0.6, (cls, d, index)
            # The clean counterpart is a normal image of the class, not a blank canvas.
            assert clean.std() > 5


@pytest.mark.parametrize("cls", demo.DEMO_CLASSES)
def test_normal_images_vary(cls):
    imgs = np.stack(
        [build._render_sample(cls, "train", "good", i, image_size=64)[1] for i in range(6)]
    )
    per_pixel_std = imgs.astype(np.float64).std(axis=0).mean()
    assert per_pixel_std > 4.0, per_pixel_std
    # ... but they stay one class: no two normal images as different as noise would be.
    assert per_pixel_std < 60.0, per_pixel_std


@pytest.fixture
def tiny_defaults(monkeypatch):
    monkeypatch.setattr(build, "DEMO_CLASSES", ("wood", "capsule"))
    monkeypatch.setattr(build, "DEFAULT_NUM_TRAIN", 2)
    monkeypatch.setattr(build, "DEFAULT_NUM_TEST_GOOD", 1)
    monkeypatch.setattr(build, "DEFAULT_NUM_TEST_DEFECT", 1)
    monkeypatch.setattr(build, "DEFAULT_IMAGE_SIZE", 48)


def _mtimes(root: pathlib.Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_ensure_builds_once_then_reuses(tiny_defaults, tmp_path):
    root = tmp_path / "cache" / "demo"
    assert demo.ensure_demo_dataset(root, progress=False) == root
    marker = json.loads((root / ".complete").read_text())
    assert marker["image_size"] == 48 and marker["classes"] == ["wood", "capsule"]
    before, inode = _mtimes(root), root.stat().st_ino
    assert demo.ensure_demo_dataset(root, progress=False) == root
    assert _mtimes(root) == before and root.stat().st_ino == inode
    assert [p.name for p in root.parent.iterdir()] == ["demo"]  # no leftovers


def test_ensure_rebuilds_without_marker_or_with_stale_marker(tiny_defaults, tmp_path):
    root = tmp_path / "demo"
    demo.ensure_demo_dataset(root, progress=False)
    reference = _hashes(root)
    (root / ".complete").unlink()
    (root / "wood" / "train" / "good" / "001.png").unlink()  # looks like an interrupted build
    inode = root.stat().st_ino
    demo.ensure_demo_dataset(root, progress=False)
    assert root.stat().st_ino != inode
    assert _hashes(root) == reference
    stale = json.loads((root / ".complete").read_text())
    stale["version"] = "v0"
    (root / ".complete").write_text(json.dumps(stale))
    inode = root.stat().st_ino
    demo.ensure_demo_dataset(root, progress=False)
    assert root.stat().st_ino != inode
    assert _hashes(root) == reference


def test_interrupted_build_leaves_nothing_that_looks_complete(tiny_defaults, tmp_path, monkeypatch):
    root = tmp_path / "demo"
    calls = {"n": 0}
    real_save = build._save_png

    def failing_save(path, arr):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        real_save(path, arr)

    monkeypatch.setattr(build, "_save_png", failing_save)
    with pytest.raises(KeyboardInterrupt):
        demo.ensure_demo_dataset(root, progress=False)
    assert not root.exists()
    assert list(tmp_path.iterdir()) == []  # the temporary folder is cleaned up too
    monkeypatch.setattr(build, "_save_png", real_save)
    demo.ensure_demo_dataset(root, progress=False)
    assert (root / ".complete").is_file()


def test_refuses_to_replace_an_unrelated_folder(tmp_path):
    root = tmp_path / "precious"
    root.mkdir()
    (root / "thesis.tex").write_text("do not delete")
    with pytest.raises(FileExistsError):
        demo.generate_demo_dataset(root, classes=["wood"], progress=False, **SMALL)
    assert (root / "thesis.tex").read_text() == "do not delete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("GRAD_JAX_CACHE", str(tmp_path / "c"))
    assert demo.default_cache_dir() == tmp_path / "c" / "demo" / demo.DEMO_VERSION
    monkeypatch.delenv("GRAD_JAX_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expected = tmp_path / "home" / ".cache" / "grad_jax" / "demo" / demo.DEMO_VERSION
    assert demo.default_cache_dir() == expected


def test_ensure_uses_default_cache_dir(tiny_defaults, monkeypatch, tmp_path):
    monkeypatch.setenv("GRAD_JAX_CACHE", str(tmp_path))
    root = demo.ensure_demo_dataset(progress=False)
    assert root == tmp_path / "demo" / demo.DEMO_VERSION
    assert (root / ".complete").is_file()


def test_progress_bar(tmp_path, capsys):
    demo.generate_demo_dataset(tmp_path / "p", classes=["capsule"], progress=True, **SMALL)
    err = capsys.readouterr().err
    n = SMALL["num_train"] + SMALL["num_test_good"] + 3 * SMALL["num_test_defect"]
    assert f"{n}/{n}" in err
    demo.generate_demo_dataset(tmp_path / "q", classes=["capsule"], progress=False, **SMALL)
    assert capsys.readouterr().err == ""


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        demo.generate_demo_dataset(tmp_path / "x", classes=["zebra"], progress=False)
    with pytest.raises(ValueError):
        demo.generate_demo_dataset(tmp_path / "x", num_train=-1, progress=False)
    with pytest.raises(ValueError):
        demo.generate_demo_dataset(tmp_path / "x", image_size=8, progress=False)
    assert not (tmp_path / "x").exists()


def test_no_absolute_paths_in_written_files(small_build):
    text = (small_build / "README.txt").read_text() + (small_build / ".complete").read_text()
    assert str(small_build) not in text and os.sep + "tmp" not in text
