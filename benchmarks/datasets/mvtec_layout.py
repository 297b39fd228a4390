"""Shared helpers of the dataset scripts in this folder: lay a public dataset out in the MVTec AD
folder layout that grad_jax's `folder` dataset reads::

    <out>/<category>/train/good/*                       defect-free training images
    <out>/<category>/test/good/*                        defect-free test images
    <out>/<category>/test/<defect>/*                    defective test images
    <out>/<category>/ground_truth/<defect>/<stem>_mask.png   0/255 masks, image-sized (optional)

Each script reads its dataset from `--source` (a checkout or extracted copy of the public
repository, or its bare git directory, which is then read at HEAD with `git archive`), writes
`--out`, refuses a non-empty `--out` unless `--force` (which empties it first, so a rerun gives
the same files), then checks every file it wrote and prints the counts per folder.

Only numpy, Pillow and the standard library (plus the `git` command for a bare git directory).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def parse_args(doc: str, *, max_train: int, max_test: int) -> argparse.Namespace:
    """The common command line: --source, --out, --force, --seed and the two size caps."""
    parser = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", required=True, help="checkout, extracted copy or git dir")
    parser.add_argument("--out", required=True, help="output folder (one sub-folder a category)")
    parser.add_argument("--force", action="store_true", help="empty a non-empty --out first")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and subsampling")
    parser.add_argument(
        "--max-train",
        type=int,
        default=max_train,
        help=f"cap on train/good per category, 0 = no cap (default {max_train})",
    )
    parser.add_argument(
        "--max-test",
        type=int,
        default=max_test,
        help=f"cap on each test/<defect> folder, 0 = no cap (default {max_test})",
    )
    return parser.parse_args()


def _is_git_dir(path: Path) -> bool:
    return (path / "HEAD").is_file() and (path / "objects").is_dir()


@contextlib.contextmanager
def open_source(path: str, expected_commit: str) -> Iterator[Path]:
    """Yield a folder holding the repository's files.

    A bare git directory (or a checkout's .git) is extracted at HEAD into a temporary folder;
    its commit is printed, with a warning when it is not `expected_commit` (the one the script's
    docstring describes). A plain folder is used as it is."""
    src = Path(path).expanduser()
    if not src.is_dir():
        sys.exit(f"--source {src} is not a folder")
    if not _is_git_dir(src):
        print(f"source: folder {src}")
        yield src
        return
    git = ["git", f"--git-dir={src}"]
    commit = subprocess.run(
        [*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    print(f"source: git dir {src} at commit {commit}")
    if commit != expected_commit:
        print(f"WARNING: the script was written for commit {expected_commit}; counts may differ")
    with tempfile.TemporaryDirectory(prefix="mvtec_layout_") as tmp:
        proc = subprocess.Popen([*git, "archive", "--format=tar", "HEAD"], stdout=subprocess.PIPE)
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            tar.extractall(tmp, filter="data")
        if proc.wait() != 0:
            sys.exit(f"git archive failed on {src}")
        yield Path(tmp)


def prepare_out(out: str, force: bool) -> Path:
    """Create `out`; refuse a non-empty one unless `force`, which empties it."""
    root = Path(out).expanduser()
    if root.exists() and any(root.iterdir()):
        if not force:
            sys.exit(f"--out {root} is not empty: pass --force to replace its content")
        for child in root.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    root.mkdir(parents=True, exist_ok=True)
    return root


def split_good(items: Sequence, seed: int, test_fraction: float = 0.2) -> tuple[list, list]:
    """Seeded split of the defect-free items into (train, test): the items are sorted, shuffled
    with numpy's default_rng(seed), and the first round(test_fraction * n) go to test."""
    items = sorted(items)
    order = np.random.default_rng(seed).permutation(len(items))
    n_test = round(test_fraction * len(items))
    test = sorted(items[i] for i in order[:n_test])
    train = sorted(items[i] for i in order[n_test:])
    return train, test


def cap(items: Sequence, n: int, seed: int) -> list:
    """At most `n` of `items` (all of them when n <= 0), drawn with default_rng(seed), sorted."""
    items = sorted(items)
    if n <= 0 or len(items) <= n:
        return items
    keep = np.random.default_rng(seed).choice(len(items), size=n, replace=False)
    return sorted(items[i] for i in keep)


def drop_duplicates(items: Sequence, path_of=lambda item: item) -> tuple[list, list]:
    """(kept, dropped): `items` sorted, without those whose file (`path_of(item)`) has the same
    bytes as an earlier one."""
    kept, dropped, seen = [], [], set()
    for item in sorted(items):
        digest = hashlib.sha256(Path(path_of(item)).read_bytes()).hexdigest()
        (dropped if digest in seen else kept).append(item)
        seen.add(digest)
    return kept, dropped


def place_image(src: Path, root: Path, category: str, split: str, label: str, name: str) -> Path:
    """Copy an image file unchanged (same bytes) to <root>/<category>/<split>/<label>/<name>."""
    dst = root / category / split / label / name
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def write_mask(mask: np.ndarray, root: Path, category: str, label: str, stem: str) -> Path:
    """Write a boolean [H, W] mask as <root>/<category>/ground_truth/<label>/<stem>_mask.png,
    an 8-bit ("L") PNG with 0 for good pixels and 255 for defective ones."""
    dst = root / category / "ground_truth" / label / f"{stem}_mask.png"
    dst.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(dst)
    return dst


def polygon_mask(size: tuple[int, int], polygons: Sequence[Sequence[tuple[float, float]]]):
    """Boolean [H, W] mask of the union of filled polygons (pixel coordinates x, y) on an image
    of Pillow size (W, H); the outline pixels count as inside."""
    canvas = Image.new("L", size, 0)
    draw = ImageDraw.Draw(canvas)
    for poly in polygons:
        draw.polygon([(float(x), float(y)) for x, y in poly], fill=255, outline=255)
    return np.asarray(canvas) > 0


def box_mask(size: tuple[int, int], boxes: Sequence[tuple[int, int, int, int]]) -> np.ndarray:
    """Boolean [H, W] mask of the union of boxes (x1, y1, x2, y2), corners inclusive, clipped to
    the image of Pillow size (W, H)."""
    width, height = size
    mask = np.zeros((height, width), bool)
    for x1, y1, x2, y2 in boxes:
        x1, x2 = sorted((max(0, int(x1)), min(width - 1, int(x2))))
        y1, y2 = sorted((max(0, int(y1)), min(height - 1, int(y2))))
        mask[y1 : y2 + 1, x1 : x2 + 1] = True
    return mask


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def check_and_count(root: Path) -> dict[str, int]:
    """Open every image with Pillow; check that each ground_truth/<defect>/ folder holds exactly
    one mask per image of test/<defect>/, of the image's size, mode L, values in {0, 255}, not
    blank. Print and return the number of images per folder (relative to `root`)."""
    counts: dict[str, int] = {}
    problems: list[str] = []
    for category in sorted(p for p in root.iterdir() if p.is_dir()):
        for folder in sorted(p for p in category.glob("*/*") if p.is_dir()):
            if folder.parent.name == "ground_truth":
                continue
            images = _images(folder)
            counts[folder.relative_to(root).as_posix()] = len(images)
            gt = category / "ground_truth" / folder.name
            masked = folder.parent.name == "test" and folder.name != "good" and gt.is_dir()
            for path in images:
                with Image.open(path) as im:
                    im.load()
                    size = im.size
                if not masked:
                    continue
                mask_path = gt / f"{path.stem}_mask.png"
                if not mask_path.is_file():
                    problems.append(f"no mask for {path}")
                    continue
                with Image.open(mask_path) as m:
                    values = np.unique(np.asarray(m))
                    if m.mode != "L" or m.size != size or not set(values) <= {0, 255}:
                        problems.append(f"bad mask {mask_path}: {m.mode} {m.size} {values[:5]}")
                    elif 255 not in values:
                        problems.append(f"blank mask {mask_path}")
            if masked:
                stems = {p.stem for p in images}
                extra = [m for m in _images(gt) if m.stem.removesuffix("_mask") not in stems]
                problems += [f"mask without image: {m}" for m in extra]
    for folder, n in counts.items():
        print(f"{n:6d}  {folder}")
    if problems:
        print("\n".join(problems[:20]))
        sys.exit(f"{len(problems)} problem(s) in {root}")
    print(f"checked: every image opens, every mask is image-sized 0/255 ({root})")
    return counts


def write_source_note(root: Path, text: str) -> None:
    """A short SOURCE.md at the top of --out (beside the category folders, which the reader
    ignores) saying where the data came from and how it was laid out."""
    (root / "SOURCE.md").write_text(text.strip() + "\n")
