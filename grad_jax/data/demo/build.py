"""Building the demo dataset: per-image seeded rendering, the cache folder and its marker.

Every image is rendered from its own generators seeded from ``(seed, class, split, kind,
index)``, so a build is byte-identical whatever order (or subset) the images are made in. A
defective image is the clean scene plus a defect drawn from a second, independent generator;
its mask is the set of pixels the defect changed (coverage >= ``_MASK_THRESHOLD``).

Builds are atomic: images go to a temporary sibling folder, the ``.complete`` marker (JSON:
version and counts) is written last, and the folder is then renamed into place, so an
interrupted build never looks complete. Bump ``DEMO_VERSION`` whenever the generated pixels
change; it is part of the cache path.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import tempfile
import uuid
import zlib
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from grad_jax.data.demo.defects import CLASS_SPECS, DEMO_CLASSES
from grad_jax.data.demo.textures import lighting_and_noise

DEMO_VERSION = "v1"

_LOG = logging.getLogger(__name__)

_MARKER = ".complete"
_README = "README.txt"
_MASK_THRESHOLD = 0.2  # a pixel is in the mask when the defect's coverage reaches this

DEFAULT_NUM_TRAIN = 60
DEFAULT_NUM_TEST_GOOD = 15
DEFAULT_NUM_TEST_DEFECT = 10
DEFAULT_IMAGE_SIZE = 256


# --------------------------------------------------------------------------------------
# Per-image rendering (deterministic).
# --------------------------------------------------------------------------------------


def _key(text: str) -> int:
    """A stable 32-bit number for a name (Python's ``hash`` changes between runs)."""
    return zlib.crc32(text.encode("utf-8"))


def _rngs(
    seed: int, cls: str, split: str, kind: str, index: int
) -> tuple[np.random.Generator, np.random.Generator]:
    """The scene and defect generators of one image, independent of every other image's."""
    ss = np.random.SeedSequence([int(seed), _key(cls), _key(split), _key(kind), int(index)])
    scene_ss, defect_ss = ss.spawn(2)
    return np.random.default_rng(scene_ss), np.random.default_rng(defect_ss)


def _render_sample(
    cls: str, split: str, kind: str, index: int, *, seed: int = 0, image_size: int = 256
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Render one image; the internal hook the tests use to check masks.

    Returns ``(clean, image, mask)``: uint8 ``(H, W, 3)`` images and a uint8 0/255 mask.
    ``clean`` is the same image without the defect (the same as ``image`` for ``good``);
    ``mask`` is ``None`` for ``good``.
    """
    spec = CLASS_SPECS[cls]
    scene_rng, defect_rng = _rngs(seed, cls, split, kind, index)
    scene = spec.render(scene_rng, image_size)
    finish_state = scene_rng.bit_generator.state
    clean = lighting_and_noise(scene.img, scene_rng)
    if kind == "good":
        return clean, clean, None
    _, fn = spec.defects[kind]
    min_area = max(12.0, 0.0015 * image_size * image_size)
    for _attempt in range(20):
        img, cover = fn(scene, defect_rng)
        mask = cover >= _MASK_THRESHOLD
        if mask.sum() >= min_area:
            break
    scene_rng.bit_generator.state = finish_state
    image = lighting_and_noise(img, scene_rng)
    return clean, image, (mask.astype(np.uint8) * 255)


# --------------------------------------------------------------------------------------
# Dataset building.
# --------------------------------------------------------------------------------------


def default_cache_dir() -> pathlib.Path:
    """``$GRAD_JAX_CACHE`` (or ``~/.cache/grad_jax``) ``/demo/<DEMO_VERSION>``."""
    base = os.environ.get("GRAD_JAX_CACHE") or os.path.join("~", ".cache", "grad_jax")
    return pathlib.Path(base).expanduser() / "demo" / DEMO_VERSION


def _expected_marker(classes, num_train, num_test_good, num_test_defect, image_size, seed):
    """The ``.complete`` marker a finished build with these arguments writes."""
    num_images = sum(
        num_train + num_test_good + num_test_defect * len(CLASS_SPECS[c].defects) for c in classes
    )
    return {
        "version": DEMO_VERSION,
        "classes": list(classes),
        "defects": {c: list(CLASS_SPECS[c].defects) for c in classes},
        "num_train": num_train,
        "num_test_good": num_test_good,
        "num_test_defect": num_test_defect,
        "image_size": image_size,
        "seed": seed,
        "num_images": num_images,
    }


def _read_marker(root: pathlib.Path) -> dict | None:
    try:
        return json.loads((root / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _readme(marker: dict) -> str:
    """The dataset's README.txt text: layout, counts, and each class with its defect types."""
    lines = [
        "grad_jax demo dataset (synthetic, generated locally; no download)",
        "",
        f"Generator version {marker['version']}, seed {marker['seed']}, "
        f"{marker['image_size']}x{marker['image_size']} RGB PNG, MVTec AD layout:",
        "  <class>/train/good/NNN.png            normal training images",
        "  <class>/test/good/NNN.png             normal test images",
        "  <class>/test/<defect>/NNN.png         defective test images",
        "  <class>/ground_truth/<defect>/NNN_mask.png   pixel masks (0 / 255)",
        "",
        f"Per class: {marker['num_train']} train, {marker['num_test_good']} test good, "
        f"{marker['num_test_defect']} test images per defect type "
        f"({marker['num_images']} images in all).",
        "",
        "Classes:",
    ]
    for name in marker["classes"]:
        spec = CLASS_SPECS[name]
        lines.append(f"  {name} ({spec.kind}): {spec.description}")
        for d, (desc, _) in spec.defects.items():
            lines.append(f"    - {d}: {desc}")
    lines += [
        "",
        "Normal images vary in position/rotation (objects), texture phase and period,",
        "brightness, colour tint, illumination gradient and sensor noise. Masks mark",
        "exactly the pixels a defect changed.",
        "",
        "Regenerate with grad_jax.data.demo.generate_demo_dataset(root).",
        "",
    ]
    return "\n".join(lines)


def _jobs(
    classes, num_train, num_test_good, num_test_defect
) -> Iterator[tuple[str, str, str, int]]:
    """Every image to render, as ``(class, split, kind, index)``."""
    for cls in classes:
        for i in range(num_train):
            yield cls, "train", "good", i
        for i in range(num_test_good):
            yield cls, "test", "good", i
        for d in CLASS_SPECS[cls].defects:
            for i in range(num_test_defect):
                yield cls, "test", d, i


def _save_png(path: pathlib.Path, arr: np.ndarray) -> None:
    Image.fromarray(arr).save(path, format="PNG", compress_level=6)


def _is_replaceable(root: pathlib.Path) -> bool:
    """Only an empty folder or one that holds (part of) a demo dataset may be replaced."""
    if not root.exists() and not root.is_symlink():
        return True
    if not root.is_dir() or root.is_symlink():
        return False
    if _read_marker(root) is not None:
        return True
    allowed = set(DEMO_CLASSES) | {_README, _MARKER}
    return all(p.name in allowed for p in root.iterdir())


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _checked_numbers(
    num_train: int | None,
    num_test_good: int | None,
    num_test_defect: int | None,
    image_size: int,
    seed: int,
) -> tuple[int, int, int, int, int]:
    """The counts (``None`` means the default), image size and seed, checked, as ints."""
    num_train = _check_count("num_train", DEFAULT_NUM_TRAIN if num_train is None else num_train)
    num_test_good = _check_count(
        "num_test_good", DEFAULT_NUM_TEST_GOOD if num_test_good is None else num_test_good
    )
    num_test_defect = _check_count(
        "num_test_defect", DEFAULT_NUM_TEST_DEFECT if num_test_defect is None else num_test_defect
    )
    image_size = _check_count("image_size", image_size)
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    seed = _check_count("seed", seed)
    return num_train, num_test_good, num_test_defect, image_size, seed


def _write_images(
    folder: pathlib.Path,
    jobs: Sequence[tuple[str, str, str, int]],
    *,
    seed: int,
    image_size: int,
    progress: bool,
) -> None:
    """Render every job and write its PNG (and mask PNG) in the MVTec layout under ``folder``."""
    bar = tqdm(total=len(jobs), desc="building demo dataset", unit="img", disable=not progress)
    with bar:
        for cls, split, kind, index in jobs:
            _, image, mask = _render_sample(
                cls, split, kind, index, seed=seed, image_size=image_size
            )
            out_dir = folder / cls / split / kind
            out_dir.mkdir(parents=True, exist_ok=True)
            _save_png(out_dir / f"{index:03d}.png", image)
            if mask is not None:
                gt_dir = folder / cls / "ground_truth" / kind
                gt_dir.mkdir(parents=True, exist_ok=True)
                _save_png(gt_dir / f"{index:03d}_mask.png", mask)
            bar.update(1)


def generate_demo_dataset(
    root,
    *,
    classes: Sequence[str] | None = None,
    num_train: int | None = None,
    num_test_good: int | None = None,
    num_test_defect: int | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
    progress: bool = True,
) -> pathlib.Path:
    """Render the demo dataset into ``root`` (replacing a previous demo build there).

    ``None`` counts mean the defaults (60 train, 15 test good, 10 per defect type). The
    images are written to a temporary sibling folder that is renamed to ``root`` once
    complete; the ``.complete`` marker (JSON: version and counts) is written last.
    Refuses to replace an existing folder that does not look like a demo dataset.
    """
    root = pathlib.Path(root).expanduser()
    classes = tuple(DEMO_CLASSES if classes is None else classes)
    unknown = [c for c in classes if c not in CLASS_SPECS]
    if unknown or not classes:
        raise ValueError(f"unknown demo classes {unknown}; choose from {DEMO_CLASSES}")
    num_train, num_test_good, num_test_defect, image_size, seed = _checked_numbers(
        num_train, num_test_good, num_test_defect, image_size, seed
    )
    if not _is_replaceable(root):
        raise FileExistsError(
            f"{root} exists and is not a grad_jax demo dataset; refusing to replace it"
        )

    marker = _expected_marker(classes, num_train, num_test_good, num_test_defect, image_size, seed)
    before = _read_marker(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        os.chmod(tmp, 0o755)
        jobs = list(_jobs(classes, num_train, num_test_good, num_test_defect))
        _write_images(tmp, jobs, seed=seed, image_size=image_size, progress=progress)
        (tmp / _README).write_text(_readme(marker), encoding="utf-8")
        (tmp / _MARKER).write_text(
            json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        if before != marker and _read_marker(root) == marker:
            # Another process finished the very same (deterministic) build meanwhile: keep
            # its folder, which may already be in use, and drop ours.
            return root
        _move_into_place(tmp, root, marker)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _move_into_place(tmp: pathlib.Path, root: pathlib.Path, marker: dict) -> None:
    """Rename the finished ``tmp`` build to ``root``, replacing (then deleting) an old one."""
    old = None
    if root.exists() or root.is_symlink():
        old = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(root, old)
    try:
        os.rename(tmp, root)
    except OSError:
        # Another process finished the same build first; identical content is fine.
        if _read_marker(root) != marker:
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def ensure_demo_dataset(root=None, *, progress: bool = True) -> pathlib.Path:
    """Return the default demo dataset's folder, building it on first use.

    ``root`` defaults to :func:`default_cache_dir`. An existing build is reused when its
    ``.complete`` marker matches the current version and default counts; otherwise (no
    marker, an interrupted build, another version) the folder is rebuilt.
    """
    root = pathlib.Path(default_cache_dir() if root is None else root).expanduser()
    kwargs = dict(
        classes=DEMO_CLASSES,
        num_train=DEFAULT_NUM_TRAIN,
        num_test_good=DEFAULT_NUM_TEST_GOOD,
        num_test_defect=DEFAULT_NUM_TEST_DEFECT,
        image_size=DEFAULT_IMAGE_SIZE,
        seed=0,
    )
    if _read_marker(root) == _expected_marker(**kwargs):
        return root
    _LOG.info("Building the grad_jax demo dataset in %s (one-off, about 20 s).", root)
    return generate_demo_dataset(root, progress=progress, **kwargs)
