"""Tests of the mvtec_ad / mvtec_layout_folder builders and of the layout checks.

`tfds.testing.DatasetBuilderTestCase` cannot run here: it derives from `tf.test.TestCase` and
reads through `tf.data`, and tensorflow-datasets' testing package also needs `dill`. The class
below is defined only where TensorFlow is installed. `test_builds_like_tfds_testcase` re-does
its checks without TF (registered, info, build from dummy_data as the manual dir, split sizes,
feature shapes and dtypes, no example in two splits, relative keys, reload), reading through
`as_data_source`, which is what grad_jax uses.
"""

from __future__ import annotations

import hashlib
import io
import logging
import struct
import tarfile
import zlib
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import tfds_mvtec
from tfds_mvtec.mvtec_ad import layout, make_dummy_data
from tfds_mvtec.mvtec_ad import mvtec_ad_dataset_builder as mb

DUMMY = Path(__file__).resolve().parent / "dummy_data"
SPLITS = {"train": 3, "test": 5}  # per dummy_data category


def _tf_testing_available() -> bool:
    try:
        import tensorflow  # noqa: F401
        from tensorflow_datasets.testing import dataset_builder_testing  # noqa: F401
    except ImportError:
        return False
    return True


HAS_TF_TESTING = _tf_testing_available()

if HAS_TF_TESTING:

    class MvtecAdDatasetBuilderTest(tfds.testing.DatasetBuilderTestCase):
        """The stock tfds builder test; runs only where TensorFlow is installed."""

        DATASET_CLASS = mb.Builder
        BUILDER_CONFIG_NAMES_TO_TEST = ["bottle", "grid"]
        SPLITS = SPLITS
        SKIP_CHECKSUMS = True  # manual download: no URL to record


@pytest.mark.skipif(HAS_TF_TESTING, reason="the real DatasetBuilderTestCase runs instead")
def test_stock_tfds_testcase_needs_tensorflow() -> None:
    """Document (and notice if it changes) why the TF-free replacement below exists."""
    with pytest.raises(ImportError):
        from tensorflow_datasets.testing import dataset_builder_testing  # noqa: F401


# --------------------------------------------------------------------------- helpers


def read_all(builder: tfds.core.DatasetBuilder, split: str) -> list[dict]:
    """Decode every record of a split through the TF-free data-source path."""
    source = builder.as_data_source()[split]
    return [source[i] for i in range(len(source))]


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def example_digest(example: dict) -> str:
    digest = hashlib.md5()
    for key in sorted(example):
        value = example[key]
        digest.update(key.encode())
        digest.update(value.tobytes() if isinstance(value, np.ndarray) else str(value).encode())
    return digest.hexdigest()


def png16(array: np.ndarray) -> bytes:
    """Encode a uint16 HxWxC array as a 16-bit PNG by hand (Pillow cannot write 16-bit RGB)."""
    height, width, channels = array.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def category(tmp_path: Path, **kwargs) -> Path:
    """A valid category folder: 3 train, 2 test/good, 2 test/crack (+ masks), 32x32 RGB."""
    return make_dummy_data.write_category(tmp_path / "widget", **kwargs)


def build(root: Path, tmp_path: Path, **kwargs) -> tfds.core.DatasetBuilder:
    return tfds_mvtec.prepare(root, tmp_path / "tfds", **kwargs)


# --------------------------------------------------------------------------- tfds behaviour


def test_registered_and_info(tmp_path: Path) -> None:
    names = tfds.list_builders(with_community_datasets=False)
    assert "mvtec_ad" in names and "mvtec_layout_folder" in names
    assert [c.name for c in mb.Builder.BUILDER_CONFIGS] == list(layout.MVTEC_CATEGORIES)
    assert len(layout.MVTEC_CATEGORIES) == 15
    assert "mvtec.com" in mb.Builder.MANUAL_DOWNLOAD_INSTRUCTIONS
    builder = mb.Builder(config="bottle", data_dir=tmp_path)
    info = builder.info
    assert info.name == "mvtec_ad"
    assert "MVTec AD" in info.description and "Bergmann" in info.citation
    assert set(info.features) == {
        "image",
        "mask",
        "has_mask",
        "label",
        "category",
        "defect_type",
        "filename",
    }
    assert info.features["image"].shape == (None, None, 3)
    assert info.features["mask"].shape == (None, None, 1)
    assert info.features["label"].names == ["good", "defective"]
    assert set(builder.get_metadata().tags) <= set(tfds.core.dataset_metadata.valid_tags())
    assert builder.info.file_format.value == "array_record"


@pytest.mark.parametrize("config", ["bottle", "grid"])
def test_builds_like_tfds_testcase(config: str, tmp_path: Path) -> None:
    """The checks of DatasetBuilderTestCase, without TF, on the committed dummy_data fixture.

    'bottle' sits at dummy_data/bottle (RGB), 'grid' at
    dummy_data/mvtec_anomaly_detection/grid (grayscale): both manual-dir layouts.
    """
    builder = mb.mvtec_builder(config, tmp_path)
    keys: list[str] = []
    original = builder._generate_examples

    def recording(*args, **kwargs):
        for key, example in original(*args, **kwargs):
            keys.append(key)
            yield key, example

    with mock.patch.object(builder, "_generate_examples", recording):
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(DUMMY))
        )
    assert len(keys) == len(set(keys)) == sum(SPLITS.values())
    assert all(not Path(k).is_absolute() and str(DUMMY) not in k for k in keys)

    for reloaded in (builder, mb.mvtec_builder(config, tmp_path)):  # reload restores metadata
        assert {s: reloaded.info.splits[s].num_examples for s in SPLITS} == SPLITS
        assert reloaded.info.splits.total_num_examples == sum(SPLITS.values())
    digests: dict[str, set[str]] = {}
    for split, count in SPLITS.items():
        examples = read_all(builder, split)
        assert len(examples) == count
        digests[split] = {example_digest(e) for e in examples}
        filenames = [text(e["filename"]) for e in examples]
        assert filenames == sorted(filenames)  # shuffling disabled: sorted file order
        for example in examples:
            image, mask = example["image"], example["mask"]
            assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
            assert mask.dtype == np.uint8 and mask.shape == image.shape[:2] + (1,)
            assert set(np.unique(mask)) <= {0, 255}
            defect = text(example["defect_type"])
            assert text(example["category"]) == config
            assert text(example["filename"]).startswith(f"{split}/{defect}/")
            assert example["label"] == (0 if defect == "good" else 1)
            assert mask.any() == (defect != "good")
            assert bool(example["has_mask"]) is True
    assert not digests["train"] & digests["test"]
    # Reading back through tfds' registry, as grad_jax's loader does.
    source = tfds.data_source(f"mvtec_ad/{config}", data_dir=tmp_path, download=False)
    assert len(source["test"]) == SPLITS["test"]


def test_grayscale_source_becomes_rgb(tmp_path: Path) -> None:
    builder = tfds_mvtec.prepare("grid", tmp_path, manual_dir=DUMMY)
    source_path = DUMMY / "mvtec_anomaly_detection" / "grid" / "train" / "good" / "000.png"
    gray = np.asarray(Image.open(source_path))
    assert gray.ndim == 2
    image = read_all(builder, "train")[0]["image"]
    assert all(np.array_equal(image[..., c], gray) for c in range(3))


def test_grain_can_read_the_data_source(tmp_path: Path) -> None:
    grain = pytest.importorskip("grain")
    builder = tfds_mvtec.prepare("bottle", tmp_path, manual_dir=DUMMY)
    dataset = grain.MapDataset.source(builder.as_data_source()["train"]).shuffle(seed=0)
    assert {int(ex["label"]) for ex in dataset} == {0}
    assert len(dataset) == SPLITS["train"]


@pytest.mark.parametrize("archive_name", [layout.MVTEC_ARCHIVE, "bottle.tar.xz"])
def test_manual_archive_is_extracted_once(archive_name: str, tmp_path: Path) -> None:
    manual = tmp_path / "manual"
    manual.mkdir()
    with tarfile.open(manual / archive_name, "w:xz") as tar:
        tar.add(DUMMY / "bottle", arcname="bottle")
    data_dir = tmp_path / "data"
    builder = tfds_mvtec.prepare("bottle", data_dir, manual_dir=manual)
    assert builder.info.splits["test"].num_examples == SPLITS["test"]
    extracted = data_dir / "downloads" / "extracted" / archive_name.removesuffix(".tar.xz")
    assert (extracted / "bottle" / "train" / "good" / "000.png").is_file()
    # A second category build (here: same category, fresh data dir for the dataset, same
    # download dir) must reuse the extraction rather than unpack again.
    (data_dir / "mvtec_ad").rename(tmp_path / "old_build")
    with mock.patch.object(mb, "_extract_archive", side_effect=AssertionError("re-extracted")):
        again = tfds_mvtec.prepare("bottle", data_dir, manual_dir=manual)
    assert again.info.splits["train"].num_examples == SPLITS["train"]


def test_corrupt_archive_says_download_again(tmp_path: Path) -> None:
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / layout.MVTEC_ARCHIVE).write_bytes(b"\xfd7zXZ\x00 truncated download")
    with pytest.raises(layout.DatasetLayoutError, match="download it again") as info:
        tfds_mvtec.prepare("bottle", tmp_path / "data", manual_dir=manual)
    assert layout.MVTEC_ARCHIVE in str(info.value)
    assert not list((tmp_path / "data" / "downloads" / "extracted").glob("*"))


def test_prepare_is_idempotent_and_notices_changes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = category(tmp_path)
    first = build(root, tmp_path)
    with mock.patch.object(mb, "_encode_sample", side_effect=AssertionError("rebuilt")):
        second = build(root, tmp_path)
        assert second.data_dir == first.data_dir
        make_dummy_data.save(np.zeros((32, 32, 3), np.uint8), root / "train" / "good" / "009.png")
        with caplog.at_level(logging.WARNING):
            third = build(root, tmp_path)
    assert third.info.splits["train"].num_examples == 3  # the earlier build is kept...
    assert "changed since it was built" in caplog.text  # ...but the user is told


def test_folder_config_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = make_dummy_data.write_category(tmp_path / "a" / "Magnetic Tile")
    b = make_dummy_data.write_category(tmp_path / "b" / "Magnetic Tile")
    name_a = tfds_mvtec.folder_builder(a, tmp_path / "d").builder_config.name
    name_b = tfds_mvtec.folder_builder(b, tmp_path / "d").builder_config.name
    assert name_a.startswith("magnetic_tile_") and name_b.startswith("magnetic_tile_")
    assert name_a != name_b
    monkeypatch.chdir(tmp_path / "a")
    assert tfds_mvtec.folder_builder("Magnetic Tile", tmp_path / "d").builder_config.name == name_a
    named = tfds_mvtec.folder_builder(a, tmp_path / "d", name="tiles")
    assert named.builder_config.name.startswith("tiles_")
    assert tfds.builder("mvtec_layout_folder", root=a, data_dir=tmp_path).builder_config.name == (
        name_a
    )


def test_folder_build_category_and_reads_from_files(tmp_path: Path) -> None:
    root = category(tmp_path, defects={"crack": 2, "scratch": 1})
    builder = build(root, tmp_path, name="gadget")
    examples = read_all(builder, "test")
    assert {text(e["category"]) for e in examples} == {"gadget"}
    assert sorted(text(e["defect_type"]) for e in examples) == sorted(
        ["good", "good", "crack", "crack", "scratch"]
    )
    # Readable without the builder code knowing the config (tfds restores it from files).
    source = tfds.data_source(
        f"mvtec_layout_folder/{builder.builder_config.name}",
        data_dir=tmp_path / "tfds",
        download=False,
    )
    assert len(source["train"]) == 3


# --------------------------------------------------------------------------- layout errors


def assert_layout_error(root: Path, tmp_path: Path, *fragments: str) -> None:
    """prepare() must raise DatasetLayoutError naming every fragment, and leave no build."""
    with pytest.raises(layout.DatasetLayoutError) as info:
        build(root, tmp_path)
    assert isinstance(info.value, ValueError)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    built = list((tmp_path / "tfds").rglob("dataset_info.json"))
    leftovers = list((tmp_path / "tfds").rglob("incomplete*"))
    assert not built and not leftovers


def test_error_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_category"
    assert_layout_error(missing, tmp_path, str(missing), "does not exist", "mvtec.com")


def test_error_missing_manual_dir(tmp_path: Path) -> None:
    manual = tmp_path / "manual"
    with pytest.raises(layout.DatasetLayoutError) as info:
        tfds_mvtec.prepare("bottle", tmp_path / "data", manual_dir=manual)
    message = str(info.value)
    assert str(manual) in message and layout.MVTEC_HOMEPAGE in message
    assert layout.MVTEC_ARCHIVE in message and "mvtec_anomaly_detection/<category>" in message


def test_error_manual_dir_without_the_category(tmp_path: Path) -> None:
    manual = tmp_path / "manual"
    make_dummy_data.write_category(manual / "bottle")
    with pytest.raises(layout.DatasetLayoutError, match="'cable' not found") as info:
        tfds_mvtec.prepare("cable", tmp_path / "data", manual_dir=manual)
    assert str(manual / "cable") in str(info.value)


def test_error_unknown_bare_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(layout.DatasetLayoutError, match="neither an MVTec AD category"):
        tfds_mvtec.prepare("metal-nut", tmp_path / "data")


def test_error_train_good_missing(tmp_path: Path) -> None:
    root = category(tmp_path)
    for path in (root / "train" / "good").iterdir():
        path.unlink()
    (root / "train" / "good").rmdir()
    assert_layout_error(root, tmp_path, str(root / "train" / "good"), "Missing folder")


def test_error_train_good_empty(tmp_path: Path) -> None:
    root = category(tmp_path)
    for path in (root / "train" / "good").iterdir():
        path.unlink()
    (root / "train" / "good" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "train" / "good" / "notes.txt").write_text("not an image")
    assert_layout_error(root, tmp_path, str(root / "train" / "good"), "holds no image")


def test_defect_folder_without_ground_truth_is_labelled_by_its_folder(tmp_path: Path) -> None:
    """A defect folder without ground_truth/<defect>/ is accepted: label 1, has_mask False;
    the masked folder beside it keeps its masks (has_mask True)."""
    root = category(tmp_path)
    for i in range(2):
        make_dummy_data.save(np.zeros((32, 32, 3), np.uint8), root / "test" / "dent" / f"{i}.png")
    scanned = tfds_mvtec.scan_category(root)
    assert scanned.unmasked_defect_types == ("dent",)
    assert {s.relpath: s.has_mask for s in scanned.test if s.defect_type == "dent"} == {
        "test/dent/0.png": False,
        "test/dent/1.png": False,
    }
    builder = build(root, tmp_path)
    assert builder.info.metadata["defects_without_masks"] == ["dent"]
    examples = {text(e["filename"]): e for e in read_all(builder, "test")}
    for name, example in examples.items():
        defect = name.split("/")[1]
        assert example["label"] == (0 if defect == "good" else 1)
        assert bool(example["has_mask"]) == (defect != "dent")
        assert example["mask"].any() == (defect == "crack")
    # Every defect folder without masks (no ground_truth/ at all) works too.
    bare = category(tmp_path / "bare")
    for path in sorted((bare / "ground_truth").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    (bare / "ground_truth").rmdir()
    examples = read_all(build(bare, tmp_path / "bare"), "test")
    assert [bool(e["has_mask"]) for e in examples] == [e["label"] == 0 for e in examples]


def test_error_defective_image_without_mask(tmp_path: Path) -> None:
    root = category(tmp_path)
    (root / "ground_truth" / "crack" / "001_mask.png").unlink()
    assert_layout_error(root, tmp_path, "001.png", "ground_truth/crack/001_mask.png")
    assert_layout_error(root, tmp_path, "folder labels only")


@pytest.mark.parametrize("skip", [False, True])
def test_error_mask_size_differs(skip: bool, tmp_path: Path) -> None:
    root = category(tmp_path)
    mask = root / "ground_truth" / "crack" / "000_mask.png"
    make_dummy_data.save(np.full((16, 24), 255, np.uint8), mask)
    with pytest.raises(layout.DatasetLayoutError) as info:
        build(root, tmp_path, skip_bad_images=skip)  # not a bad image: never skipped
    assert not isinstance(info.value, layout.BadImageError)
    assert str(mask) in str(info.value) and "24x16" in str(info.value)


def test_error_empty_category(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    (root / "train" / "good").mkdir(parents=True)
    (root / "test").mkdir()
    assert_layout_error(root, tmp_path, "Empty category", str(root))


def test_error_parent_of_categories_is_named(tmp_path: Path) -> None:
    parent = tmp_path / "mvtec"
    make_dummy_data.write_category(parent / "bottle")
    make_dummy_data.write_category(parent / "cable")
    assert_layout_error(parent, tmp_path, "Empty category", "bottle, cable")


def test_error_no_test_folder(tmp_path: Path) -> None:
    root = category(tmp_path)
    for path in sorted((root / "test").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    (root / "test").rmdir()
    assert_layout_error(root, tmp_path, str(root / "test"))


# --------------------------------------------------------------------------- bad images

BAD_KINDS = ("zero_bytes", "truncated_png", "truncated_jpeg", "not_an_image", "dangling_link")


def make_bad(path: Path, kind: str) -> Path:
    """Turn `path` (an existing valid image) into a bad one of the given kind; return its path."""
    good = path.read_bytes()
    path.unlink()
    if kind == "zero_bytes":
        path.write_bytes(b"")
    elif kind == "truncated_png":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "truncated_jpeg":
        path = path.with_suffix(".jpg")
        noise = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
        full = encoded(Image.fromarray(noise), "JPEG")
        path.write_bytes(full[: len(full) * 2 // 3])
    elif kind == "not_an_image":
        path.write_text("<html>404 not found</html>")
    elif kind == "dangling_link":
        path.symlink_to(path.parent / "missing-target.png")
    return path


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_image_stops_by_default(kind: str, tmp_path: Path) -> None:
    root = category(tmp_path)
    bad = make_bad(root / "test" / "crack" / "001.png", kind)
    if kind == "truncated_jpeg":  # the mask follows the image stem, whatever the extension
        assert (root / "ground_truth" / "crack" / "001_mask.png").exists()
    with pytest.raises(layout.BadImageError) as info:
        build(root, tmp_path)
    assert info.value.path == bad
    assert str(bad) in str(info.value) and "skip_bad_images=True" in str(info.value)
    assert info.value.reason
    assert not list((tmp_path / "tfds").rglob("dataset_info.json"))


def test_bad_images_skipped_on_request(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = category(tmp_path, n_train=6, defects={"crack": 3})
    bad = {
        make_bad(root / "train" / "good" / f"{i:03d}.png", kind).relative_to(root).as_posix()
        for i, kind in enumerate(BAD_KINDS)
    }
    bad.add("test/crack/002.png")  # a bad *mask* drops its image too
    (root / "ground_truth" / "crack" / "002_mask.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        builder = build(root, tmp_path, skip_bad_images=True)
    assert builder.info.splits["train"].num_examples == 6 - len(BAD_KINDS)
    assert builder.info.splits["test"].num_examples == 2 + 2
    skipped = tfds_mvtec.skipped_images(builder)
    assert {item["file"] for item in skipped} == bad
    assert all(item["reason"] for item in skipped)
    assert "skipped 5 bad image(s)" in caplog.text and "001.png" in caplog.text
    # The report survives a reload of the finished build.
    assert tfds_mvtec.skipped_images(build(root, tmp_path)) == skipped


def test_hidden_and_junk_files_are_ignored(tmp_path: Path) -> None:
    root = category(tmp_path)
    good = root / "train" / "good"
    (good / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (good / "._000.png").write_bytes(b"\0\5\26\7 AppleDouble")  # macOS resource fork
    (good / "Thumbs.db").write_bytes(b"\xd0\xcf")
    (good / "readme.txt").write_text("hello")
    (root / "test" / ".hidden_dir").mkdir()
    builder = build(root, tmp_path)
    assert builder.info.splits["train"].num_examples == 3
    assert builder.info.metadata["ignored_files"] == ["train/good/readme.txt"]


# --------------------------------------------------------------------------- image modes


def test_image_modes_become_rgb8(tmp_path: Path) -> None:
    """Palette, 16-bit (gray, RGB, gray+alpha), gray+alpha, RGBA, 1-bit, CMYK all end RGB8."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    gray16 = rng.integers(0, 65536, (8, 8), dtype=np.uint16)
    rgb16 = rng.integers(0, 65536, (8, 8, 3), dtype=np.uint16)
    palette = Image.fromarray(rgb).quantize(colors=16)
    bits = gray > 127
    cases = {  # file name -> (encoded bytes, expected HxWx3 uint8)
        "palette.png": (encoded(palette, "PNG"), np.asarray(palette.convert("RGB"))),
        "gray16.png": (encoded(Image.fromarray(gray16), "PNG"), None),
        "gray16.tif": (encoded(Image.fromarray(gray16), "TIFF"), None),
        "rgb16.png": (png16(rgb16), (rgb16 >> 8).astype(np.uint8)),
        "gray_alpha16.png": (png16(np.stack([gray16, gray16], -1)), None),
        "gray_alpha.png": (encoded(Image.fromarray(np.stack([gray, gray], -1)), "PNG"), 0),
        "rgba.png": (encoded(Image.fromarray(np.dstack([rgb, gray])), "PNG"), rgb),
        "bilevel.png": (encoded(Image.fromarray(bits), "PNG"), 0),
        "cmyk.jpg": (encoded(Image.fromarray(rgb).convert("CMYK"), "JPEG"), None),
        "gray.bmp": (encoded(Image.fromarray(gray), "BMP"), 0),
        "upper.JPEG": (encoded(Image.fromarray(rgb), "JPEG"), None),
        "upper.TIFF": (encoded(Image.fromarray(rgb), "TIFF"), rgb),
        "gray.jpg": (encoded(Image.fromarray(gray), "JPEG"), None),
    }
    scaled16 = np.round(gray16.astype(np.float64) * 255 / 65535).astype(np.uint8)
    root = category(tmp_path)
    for name, (data, _) in cases.items():
        (root / "train" / "good" / name).write_bytes(data)
    builder = build(root, tmp_path)
    got = {text(e["filename"]).split("/")[-1]: e["image"] for e in read_all(builder, "train")}
    assert set(cases) <= set(got)
    for name, (data, expected) in cases.items():
        image = got[name]
        assert image.dtype == np.uint8 and image.shape == (8, 8, 3), name
        if name.startswith(("gray16", "gray_alpha16")):
            expected = np.repeat(scaled16[..., None], 3, -1)
            # Pillow reduces 16-bit gray+alpha PNGs to their high byte: off by at most one.
            assert np.abs(image.astype(int) - expected).max() <= 1, name
            assert image.max() > 200  # scaled, not clipped to 255 nor truncated to ~0
            continue
        if isinstance(expected, int):  # gray sources: three equal channels of the gray
            source = bits * np.uint8(255) if name == "bilevel.png" else gray
            expected = np.repeat(source[..., None], 3, -1)
        if expected is None:  # lossy sources: compare with Pillow's own RGB decode
            expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        np.testing.assert_array_equal(image, expected, err_msg=name)


def test_mask_binarisation() -> None:
    red = np.zeros((4, 4, 3), np.uint8)
    red[0, 0] = (255, 0, 0)
    assert layout.mask_to_binary(Image.fromarray(red))[0, 0] == 255
    ones = np.eye(4, dtype=np.uint8)
    np.testing.assert_array_equal(layout.mask_to_binary(Image.fromarray(ones)), ones * 255)
    soft = np.array([[0, 90, 130, 255]], np.uint8)
    np.testing.assert_array_equal(layout.mask_to_binary(Image.fromarray(soft)), [[0, 0, 255, 255]])
    wide = np.array([[0, 1000, 40000, 65535]], np.uint16)
    np.testing.assert_array_equal(layout.mask_to_binary(Image.fromarray(wide)), [[0, 0, 255, 255]])


def test_layout_module_needs_no_tfds() -> None:
    """grad_jax may import the layout checks without paying for (or having) tfds."""
    import subprocess
    import sys

    code = (
        "import sys; import tfds_mvtec; from tfds_mvtec.mvtec_ad import layout; "
        "assert 'tensorflow_datasets' not in sys.modules, 'tfds imported'"
    )
    repo_root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo_root)


def test_scan_category_lists_samples(tmp_path: Path) -> None:
    root = category(tmp_path, defects={"crack": 2, "hole": 1}, ext=".PNG")
    scanned = tfds_mvtec.scan_category(root)
    assert [s.relpath for s in scanned.train] == [f"train/good/{i:03d}.PNG" for i in range(3)]
    assert scanned.defect_types == ("crack", "hole")
    assert [s.label for s in scanned.test] == [1, 1, 0, 0, 1]
    hole = scanned.test[-1]
    assert hole.mask_path == root / "ground_truth" / "hole" / "000_mask.png"
    assert tfds_mvtec.load_rgb(hole.path).shape == (32, 32, 3)
    assert set(np.unique(tfds_mvtec.load_mask(hole.mask_path))) == {0, 255}
