"""Scan, validate and decode a category folder in the MVTec AD layout.

The layout (one folder per category)::

    <root>/train/good/<image>                      defect-free training images
    <root>/test/good/<image>                       defect-free test images
    <root>/test/<defect>/<stem>.<ext>              defective test images
    <root>/ground_truth/<defect>/<stem>_mask.png   one mask per defective test image (optional)

Masks are optional per defect folder: a test/<defect>/ folder without a ground_truth/<defect>/
folder is accepted, and its images are known to be defective from the folder name alone
(`Sample.has_mask` is then False: image-level metrics only). A ground_truth/<defect>/ folder
that exists must hold a mask for every image of test/<defect>/ (a missing one is far more often a
naming mistake than an intent).

This module deliberately imports neither TensorFlow nor tensorflow-datasets (only pathlib,
Pillow and numpy), so that the rest of grad_jax can validate a folder or decode its images
without paying for the tfds import, and so that the rules live in one place: the tfds builder
and any plain-numpy loader then agree on what a valid sample is and on how a 16-bit, palette
or RGBA file becomes 8-bit RGB.

Every problem with the folder is reported as a `DatasetLayoutError` (a `ValueError`) whose
message names the offending path and says how to fix it; unreadable or corrupt image files
raise the subclass `BadImageError`, which callers may choose to skip.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

#: The 15 categories of MVTec AD, in the order of the paper.
MVTEC_CATEGORIES: tuple[str, ...] = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)

MVTEC_HOMEPAGE = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
MVTEC_ARCHIVE = "mvtec_anomaly_detection.tar.xz"
#: Name of the folder the full archive is conventionally extracted to.
MVTEC_FOLDER = "mvtec_anomaly_detection"

#: Suffixes (compared lower-case) that are treated as images; anything else is ignored.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
GOOD = "good"
SPLITS: tuple[str, ...] = ("train", "test")
MASK_SUFFIX = "_mask"

# Names that file managers and archivers leave behind; never data.
_JUNK_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_MAX_LISTED = 5  # how many offending files an error message spells out


class DatasetLayoutError(ValueError):
    """A folder does not follow the MVTec AD layout; the message names the path and the fix."""


class BadImageError(DatasetLayoutError):
    """An image or mask file cannot be read or decoded (empty, truncated, not an image, ...).

    Kept separate from other layout errors because it is the one problem a caller may choose to
    tolerate (``skip_bad_images=True``): the file is then left out instead of stopping the build.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(
            f"Bad image file {self.path}: {reason}. Replace or delete the file, or pass "
            "skip_bad_images=True to leave such files out (they are then listed in the log and "
            "in builder.info.metadata['skipped_images'])."
        )


@dataclasses.dataclass(frozen=True)
class Sample:
    """One image of a category, with where its mask lives.

    `mask_path` is None for good images (their mask is known: all zero) and for defective images
    of a folder without masks (their mask is unknown, see `has_mask`).
    """

    split: str
    defect_type: str
    path: Path
    relpath: str  # POSIX path relative to the category root, e.g. "test/crack/000.png"
    mask_path: Path | None

    @property
    def label(self) -> int:
        """0 for a defect-free image, 1 for a defective one."""
        return 0 if self.defect_type == GOOD else 1

    @property
    def has_mask(self) -> bool:
        """True if the pixel ground truth is known: a good image, or a defect with a mask."""
        return self.defect_type == GOOD or self.mask_path is not None


@dataclasses.dataclass(frozen=True)
class CategoryLayout:
    """The validated content of a category folder, in sorted (deterministic) order."""

    root: Path
    train: tuple[Sample, ...]
    test: tuple[Sample, ...]
    ignored: tuple[str, ...] = ()  # relpaths of non-image files found in image folders
    unused_masks: tuple[str, ...] = ()  # relpaths of masks that match no test image

    @property
    def name(self) -> str:
        """The category name, i.e. the folder name."""
        return self.root.name

    @property
    def unmasked_defect_types(self) -> tuple[str, ...]:
        """Defect folders without ground-truth masks (labelled by folder only), sorted."""
        return tuple(sorted({s.defect_type for s in self.test if not s.has_mask}))

    @property
    def defect_types(self) -> tuple[str, ...]:
        """Sorted defect folder names found under test/ (without 'good')."""
        return tuple(sorted({s.defect_type for s in self.test if s.defect_type != GOOD}))

    def samples(self, split: str) -> tuple[Sample, ...]:
        """The samples of `split` ('train' or 'test')."""
        if split not in SPLITS:
            raise KeyError(f"Unknown split {split!r}; expected one of {SPLITS}.")
        return self.train if split == "train" else self.test

    def fingerprint(self) -> str:
        """A cheap digest of file names and sizes, to notice a folder that changed after a build.

        Sizes rather than modification times, so that copying the folder elsewhere keeps the
        fingerprint.
        """
        digest = hashlib.sha1()
        for sample in self.train + self.test:
            for path in (sample.path, sample.mask_path):
                if path is None:
                    continue
                try:
                    size = path.stat().st_size
                except OSError:
                    size = -1
                digest.update(f"{path.relative_to(self.root).as_posix()}:{size}\n".encode())
        return digest.hexdigest()[:16]


def is_hidden(path: Path) -> bool:
    """True for dot-files (.DS_Store, ._foo.png AppleDouble files) and archiver junk."""
    return path.name.startswith(".") or path.name in _JUNK_NAMES


def is_image_name(path: Path) -> bool:
    """True if the file name has one of the accepted image extensions (any letter case)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not is_hidden(path)


def _list_folder(folder: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """Split a folder's visible entries into (image files, other files, sub-folders), sorted.

    An entry whose name looks like an image but that is not a directory counts as an image even
    if it cannot be stat-ed (a dangling link): it must then be reported as a bad image rather
    than silently vanish from the dataset.
    """
    images: list[Path] = []
    others: list[Path] = []
    dirs: list[Path] = []
    for entry in sorted(folder.iterdir()):
        if is_hidden(entry):
            continue
        if entry.is_dir():
            dirs.append(entry)
        elif is_image_name(entry):
            images.append(entry)
        else:
            others.append(entry)
    return images, others, dirs


def _listing(paths: Iterable[str], total: int | None = None) -> str:
    """Format up to a few paths for an error message, saying how many more there are."""
    paths = list(paths)
    total = len(paths) if total is None else total
    shown = ", ".join(paths[:_MAX_LISTED])
    return shown + (f" (and {total - _MAX_LISTED} more)" if total > _MAX_LISTED else "")


def _layout_help(root: Path) -> str:
    return (
        f"Expected {root}/train/good/ (defect-free training images), {root}/test/good/ and "
        f"{root}/test/<defect>/ (test images), and optionally {root}/ground_truth/<defect>/"
        "<stem>_mask.png (one mask per defective test image), as in MVTec AD."
    )


def _child_categories(root: Path) -> list[str]:
    """Sub-folders of `root` that are themselves categories: a hint that root is one level up."""
    try:
        return sorted(
            p.name for p in root.iterdir() if p.is_dir() and (p / "train" / GOOD).is_dir()
        )
    except OSError:
        return []


def _index_masks(folder: Path) -> dict[str, Path]:
    """Map an image stem to its mask in a ground_truth/<defect>/ folder.

    `<stem>_mask.<ext>` (the MVTec naming) wins over a plain `<stem>.<ext>`; among several
    extensions for the same stem, .png wins, then alphabetical order, so the choice is stable.
    """

    def preference(path: Path) -> tuple[int, int, str]:
        suffixed = path.stem.endswith(MASK_SUFFIX)
        return (0 if suffixed else 1, 0 if path.suffix.lower() == ".png" else 1, path.name)

    masks: dict[str, Path] = {}
    images, _, _ = _list_folder(folder)
    for mask in sorted(images, key=preference):
        stem = mask.stem
        if stem.endswith(MASK_SUFFIX):
            stem = stem[: -len(MASK_SUFFIX)]
        masks.setdefault(stem, mask)
    return masks


def scan_category(root: str | os.PathLike) -> CategoryLayout:
    """List and validate the samples of an MVTec-layout category folder.

    Only names and folders are checked here (fast, no image is opened); the content of each file
    (readable, decodable, mask size equal to image size) is checked when it is decoded, see
    `decode_image` and `decode_mask`.

    Raises:
        DatasetLayoutError: the folder is missing or empty, train/good is missing or empty,
            test/ holds no image, or a ground_truth/<defect>/ folder lacks the mask of one of
            the images of test/<defect>/. The message says which path and what to do. A defect
            folder without any ground_truth/<defect>/ folder is accepted (labels only).
    """
    root = Path(root).expanduser()
    if not root.exists():
        where = "" if root.is_absolute() else f" (relative to the current directory {Path.cwd()})"
        raise DatasetLayoutError(
            f"Dataset folder {root} does not exist{where}. Check the path. "
            f"{_layout_help(root)} For MVTec AD itself, download mvtec_anomaly_detection.tar.xz "
            f"from {MVTEC_HOMEPAGE} and extract it."
        )
    if not root.is_dir():
        raise DatasetLayoutError(
            f"Dataset path {root} is a file, not a folder. Give the category folder. "
            f"{_layout_help(root)}"
        )

    train_dir, test_dir, gt_dir = root / "train", root / "test", root / "ground_truth"
    has_any_image = any(
        is_image_name(p) for d in (train_dir, test_dir) if d.is_dir() for p in d.rglob("*")
    )
    if not has_any_image:
        children = _child_categories(root)
        hint = (
            f" It contains the category folders {_listing(children)}: pass one of those instead."
            if children
            else ""
        )
        raise DatasetLayoutError(
            f"Empty category: {root} contains no image under train/ or test/.{hint} "
            f"{_layout_help(root)}"
        )

    good_dir = train_dir / GOOD
    if not good_dir.is_dir():
        raise DatasetLayoutError(
            f"Missing folder {good_dir}: put the defect-free training images there. "
            f"{_layout_help(root)}"
        )
    ignored: list[str] = []

    def rel(path: Path) -> str:
        return path.relative_to(root).as_posix()

    train_images, others, _ = _list_folder(good_dir)
    ignored += [rel(p) for p in others]
    if not train_images:
        raise DatasetLayoutError(
            f"Folder {good_dir} holds no image (accepted extensions: "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}, any case): put the defect-free training "
            "images there."
        )
    train = tuple(Sample("train", GOOD, p, rel(p), None) for p in train_images)
    for extra in _list_folder(train_dir)[2]:
        if extra.name != GOOD:
            logger.warning("Ignoring %s: train/ must hold only good/ in the MVTec layout.", extra)

    if not test_dir.is_dir():
        raise DatasetLayoutError(
            f"Missing folder {test_dir}: put test images in test/good/ and test/<defect>/. "
            f"{_layout_help(root)}"
        )
    test: list[Sample] = []
    used_masks: set[Path] = set()
    unused_masks: list[str] = []
    _, others, defect_dirs = _list_folder(test_dir)
    ignored += [rel(p) for p in others]
    for defect_dir in defect_dirs:
        defect = defect_dir.name
        images, others, subdirs = _list_folder(defect_dir)
        ignored += [rel(p) for p in others + subdirs]
        if not images:
            logger.warning("Ignoring %s: it holds no image.", defect_dir)
            continue
        if defect == GOOD:
            test += [Sample("test", GOOD, p, rel(p), None) for p in images]
            continue
        mask_dir = gt_dir / defect
        if not mask_dir.is_dir():
            # Image labels only: the folder says "defective", no pixel ground truth.
            test += [Sample("test", defect, p, rel(p), None) for p in images]
            continue
        masks = _index_masks(mask_dir)
        missing = [p for p in images if p.stem not in masks]
        if missing:
            expected = [rel(mask_dir / f"{p.stem}{MASK_SUFFIX}.png") for p in missing]
            raise DatasetLayoutError(
                f"{len(missing)} defective image(s) in {defect_dir} have no mask: "
                f"{_listing([p.name for p in missing])}. Add the masks (expected "
                f"{_listing(expected)} under {root}), or delete those images; to use folder "
                f"labels only for this defect (image-level metrics), remove {mask_dir}."
            )
        for p in images:
            used_masks.add(masks[p.stem])
            test.append(Sample("test", defect, p, rel(p), masks[p.stem]))

    if not test:
        raise DatasetLayoutError(
            f"Folder {test_dir} holds no image: put defect-free test images in test/good/ and "
            f"defective ones in test/<defect>/. {_layout_help(root)}"
        )
    if not any(s.defect_type == GOOD for s in test):
        logger.warning("%s has no test/good/ images: image-level AUROC is undefined.", root)
    if gt_dir.is_dir():
        for mask_dir in _list_folder(gt_dir)[2]:
            for mask in _list_folder(mask_dir)[0]:
                if mask not in used_masks:
                    unused_masks.append(rel(mask))
    unmasked = sorted({s.defect_type for s in test if not s.has_mask})
    if unmasked:
        logger.info(
            "%s: no ground_truth/ masks for %s: those images are labelled defective by their "
            "folder; pixel-level metrics leave them out.",
            root,
            ", ".join(unmasked),
        )
    if ignored:
        logger.warning(
            "Ignoring %d non-image file(s) in %s: %s", len(ignored), root, _listing(ignored)
        )
    if unused_masks:
        logger.warning(
            "%d mask(s) in %s match no test image: %s",
            len(unused_masks),
            gt_dir,
            _listing(unused_masks),
        )
    return CategoryLayout(root, train, tuple(test), tuple(ignored), tuple(unused_masks))


def find_mvtec_category(base: str | os.PathLike, category: str) -> Path | None:
    """Find an extracted MVTec AD category below `base`, or None.

    Accepts `<base>/<category>/`, `<base>/mvtec_anomaly_detection/<category>/`, and one level of
    any other wrapping folder, since archives and users differ in whether the top folder exists.
    """
    base = Path(base)
    candidates = [base / category, base / MVTEC_FOLDER / category]
    if base.is_dir():
        candidates += [d / category for d in sorted(base.iterdir()) if d.is_dir()]
    for candidate in candidates:
        if (candidate / "train").is_dir() or (candidate / "test").is_dir():
            return candidate
    return None


# --------------------------------------------------------------------------- image decoding


def read_bytes(path: str | os.PathLike) -> bytes:
    """Read a file, turning every OS failure into a BadImageError that names the file."""
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise BadImageError(path, f"cannot read the file ({err.strerror or err})") from err


#: The image formats decoded by default (Pillow's names): what training reads. Every other format
#: Pillow knows (ICO, WEBP, GIF, EPS, ...) is refused before its decoder runs, unless a caller
#: allows it (`accepted_formats`). A JPEG that carries extra pictures (MPO: a camera's preview,
#: a second view) is a JPEG: its primary picture is decoded, as by every JPEG reader.
ACCEPTED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "TIFF")
_SNIFF_BYTES = 16  # what Pillow's format checks look at


def _pillow_formats() -> list[str]:
    Image.init()
    return list(Image.ID)


def accepted_formats(allow: Iterable[str] = ()) -> tuple[str, ...]:
    """`ACCEPTED_FORMATS` plus the Pillow format names in `allow` (any case, e.g. 'webp').

    Raises ValueError naming an unknown format and the ones Pillow knows.
    """
    known = _pillow_formats()
    out = list(ACCEPTED_FORMATS)
    for name in allow:
        name = str(name).strip().upper()
        if not name:
            continue
        if name not in known:
            raise ValueError(
                f"unknown image format {name!r}; Pillow reads: {', '.join(sorted(known))}"
            )
        if name not in out:
            out.append(name)
    return tuple(out)


def format_extensions(formats: Iterable[str]) -> frozenset[str]:
    """The file suffixes (lower-case, with the dot) Pillow registers for `formats`."""
    wanted = {f.upper() for f in formats}
    return frozenset(ext.lower() for ext, f in Image.registered_extensions().items() if f in wanted)


def refused_format_reason(data: bytes, formats: Iterable[str]) -> str:
    """Why `data` was not opened as one of `formats`: the format it looks like, when Pillow's
    signature checks (the first bytes only; no decoder runs) recognise one, and how to allow it."""
    accepted = ", ".join(formats)
    prefix = data[:_SNIFF_BYTES]
    for name in _pillow_formats():
        accept = Image.OPEN[name][1]
        try:
            looks_like = accept is not None and name not in formats and accept(prefix)
        except Exception:  # noqa: BLE001 - a signature check that fails recognises nothing
            looks_like = False
        if looks_like:
            return (
                f"its content is a {name} image, not an accepted format ({accepted}); convert it "
                f"(predict and the service read it with --allow_formats={name})"
            )
    return f"not a recognised image format (accepted: {accepted})"


def frame_count(image: Image.Image) -> int:
    """How many frames (animation frames, pages) `image` holds; 1 for most files. A JPEG's
    extra pictures (MPO) do not count: only its primary picture is ever decoded."""
    if image.format == "MPO" or not getattr(image, "is_animated", False):
        return 1
    return int(getattr(image, "n_frames", 2))


def check_single_frame(image: Image.Image, path: str | os.PathLike) -> None:
    """BadImageError if `image` is animated or has several pages: scoring only its first frame
    would pass the others unseen."""
    frames = frame_count(image)
    if frames > 1:
        raise BadImageError(
            path,
            f"the file holds {frames} frames (an animation or a multi-page file); grad_jax scores "
            "single images, so save each frame as its own file",
        )


def open_image(
    data: bytes, path: str | os.PathLike, formats: Iterable[str] = ACCEPTED_FORMATS
) -> Image.Image:
    """Fully decode encoded image bytes with Pillow; any failure becomes a BadImageError.

    Only `formats` (Pillow names; default `ACCEPTED_FORMATS`) are tried, so no other decoder
    ever runs on the bytes; an animated or multi-page file is refused (`check_single_frame`).
    `Image.load()` decodes every pixel, which is what catches truncated files (opening alone
    only parses the header). Pillow raises many exception types on corrupt input (OSError,
    SyntaxError, ValueError, struct errors, decompression-bomb errors), so everything short of
    BaseException is treated as "this file is bad".
    """
    formats = tuple(formats)
    if not data:
        raise BadImageError(path, "the file is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data), formats=formats)
    except Image.UnidentifiedImageError as err:
        raise BadImageError(path, refused_format_reason(data, formats)) from err
    except Exception as err:
        raise BadImageError(path, f"cannot parse the header ({type(err).__name__}: {err})") from err
    try:
        check_single_frame(image, path)
    except BadImageError:
        raise
    except Exception as err:
        raise BadImageError(path, f"cannot read the frames ({type(err).__name__}: {err})") from err
    try:
        image.load()
    except Exception as err:
        raise BadImageError(
            path, f"cannot decode the pixels, probably truncated ({type(err).__name__}: {err})"
        ) from err
    return image


def _sixteen_to_eight(array: np.ndarray) -> np.ndarray:
    """Scale 0..65535 to 0..255 with rounding (scaling keeps the image, clipping would not)."""
    wide = array.astype(np.uint32)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def _wide_gray_to_eight(image: Image.Image, path: str | os.PathLike) -> np.ndarray:
    """16-bit grayscale (Pillow modes I;16*, or I holding 16-bit data) to 8-bit, scaled."""
    array = np.asarray(image)
    if image.mode == "I" and array.size and (array.min() < 0 or array.max() > 65535):
        raise BadImageError(
            path, "32-bit integer images are not supported; save it as 8- or 16-bit"
        )
    return _sixteen_to_eight(array)


def to_rgb8(image: Image.Image, path: str | os.PathLike = "<image>") -> Image.Image:
    """Convert any supported Pillow image to 8-bit RGB.

    Rules (why): grayscale is replicated to 3 channels (the network expects RGB); 16-bit data is
    scaled, not clipped (Pillow's own convert() clips I;16 to 255, which whitens the image;
    16-bit RGB(A) PNGs are already reduced by Pillow to their high byte, a correct scaling);
    palette images are expanded through their palette; alpha is dropped rather than blended,
    since in inspection images it carries no scene content and blending would alter pixels.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        return Image.fromarray(_wide_gray_to_eight(image, path)).convert("RGB")
    if mode == "F":
        raise BadImageError(path, "floating-point images are not supported; save as 8/16-bit")
    try:
        if mode in ("P", "PA"):
            image = image.convert("RGBA")
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        raise BadImageError(path, f"cannot convert mode {mode} to RGB ({err})") from err


def mask_to_binary(image: Image.Image, path: str | os.PathLike = "<mask>") -> np.ndarray:
    """Turn a mask image into an HxW uint8 array with values {0, 255}.

    Colour masks count a pixel as defective if any channel is set (a pure red mask would fall
    under the threshold after a luminance conversion). Masks stored as 0/1 (or small class
    indices, max < 128) mark every non-zero pixel; otherwise the threshold is 128, which also
    cleans anti-aliased or JPEG-compressed edges.
    """
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        gray = _wide_gray_to_eight(image, path)
    elif mode == "L":
        gray = np.asarray(image)
    elif mode in ("1", "LA", "La"):
        gray = np.asarray(image.convert("L"))
    else:
        gray = np.asarray(to_rgb8(image, path)).max(axis=-1)
    peak = int(gray.max()) if gray.size else 0
    threshold = 1 if 0 < peak < 128 else 128
    return np.where(gray >= threshold, 255, 0).astype(np.uint8)


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as an HxWx3 uint8 array (BadImageError if it cannot be read)."""
    return np.asarray(to_rgb8(open_image(read_bytes(path), path), path))


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a mask file as an HxW uint8 array with values {0, 255}."""
    return mask_to_binary(open_image(read_bytes(path), path), path)


def slugify(text: str) -> str:
    """Lower-case `text` and keep [a-z0-9_], as tfds names require."""
    slug = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return slug or "folder"
