"""Generate the tiny `dummy_data/` fixture of the mvtec_ad builder (and tmp folders for tests).

Run from the repository root to regenerate the committed fixture:

    python -m tfds_mvtec.mvtec_ad.make_dummy_data

The fixture mimics the two ways a user may extract MVTec AD into the manual directory:
`dummy_data/bottle/` (category at the top) holds small RGB PNGs, and
`dummy_data/mvtec_anomaly_detection/grid/` (inside the archive's folder) small grayscale PNGs,
like the real grid/screw/zipper categories. Each has 3 train images and 5 test images (2 good,
3 defective over two defect types). Pixels come from a seeded generator so that regenerating
gives the same files.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

DUMMY_DIR = Path(__file__).resolve().parent / "dummy_data"
SIZE = 32  # pixels; large enough for a visible defect blob, small enough to keep files ~1-3 KB

#: (relative category path inside dummy_data, Pillow mode, {defect: count}); good counts fixed.
FIXTURE = (
    ("bottle", "RGB", {"broken_large": 2, "contamination": 1}),
    ("mvtec_anomaly_detection/grid", "L", {"bent": 2, "broken": 1}),
)
N_TRAIN = 3
N_TEST_GOOD = 2


def _texture(rng: np.random.Generator, size: int, mode: str) -> np.ndarray:
    """A smooth random texture: coarse noise upsampled, so PNGs stay small."""
    channels = 3 if mode == "RGB" else 1
    coarse = rng.integers(60, 200, size=(size // 8, size // 8, channels), dtype=np.uint8)
    image = np.kron(coarse, np.ones((8, 8, 1), dtype=np.uint8))
    return image if channels == 3 else image[..., 0]


def _defect(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random filled rectangle as a boolean mask (the 'defect')."""
    mask = np.zeros((size, size), dtype=bool)
    y, x = rng.integers(2, size // 2, size=2)
    h, w = rng.integers(3, size // 3, size=2)
    mask[y : y + h, x : x + w] = True
    return mask


def save(array: np.ndarray, path: Path) -> None:
    """Save an array as an image file, creating parent folders; format from the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def write_category(
    root: Path,
    *,
    mode: str = "RGB",
    defects: dict[str, int] | None = None,
    n_train: int = N_TRAIN,
    n_test_good: int = N_TEST_GOOD,
    size: int = SIZE,
    ext: str = ".png",
    seed: int = 0,
) -> Path:
    """Write a small, valid MVTec-layout category at `root` and return `root`.

    Names follow MVTec: 000.png, 001.png, ... and ground_truth/<defect>/000_mask.png.
    """
    rng = np.random.default_rng(seed)
    defects = {"crack": 2} if defects is None else defects
    for i in range(n_train):
        save(_texture(rng, size, mode), root / "train" / "good" / f"{i:03d}{ext}")
    for i in range(n_test_good):
        save(_texture(rng, size, mode), root / "test" / "good" / f"{i:03d}{ext}")
    for defect, count in defects.items():
        for i in range(count):
            image = _texture(rng, size, mode)
            mask = _defect(rng, size)
            image[mask] = 255 if mode == "L" else (255, 0, 0)
            save(image, root / "test" / defect / f"{i:03d}{ext}")
            save(mask.astype(np.uint8) * 255, root / "ground_truth" / defect / f"{i:03d}_mask.png")
    return root


def main() -> None:
    """Regenerate dummy_data/ from scratch."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DUMMY_DIR, help="fixture folder")
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    for seed, (relative, mode, defects) in enumerate(FIXTURE):
        write_category(args.out / relative, mode=mode, defects=defects, seed=seed)
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"Wrote {args.out} ({total / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
