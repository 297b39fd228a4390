"""tfds builders for MVTec AD (manual download) and for any folder in the MVTec AD layout.

Both builders write `array_record` files and hand tfds only encoded bytes, which is what lets
them build and be read without TensorFlow installed (see tfds_mvtec/README.md for what in tfds
4.9 needs TF and what does not):

* `Builder` (registered as ``mvtec_ad``): one config per MVTec AD category, read from the manual
  download directory (the archive, a per-category archive, or an extracted folder).
* `MvtecLayoutFolder` (registered as ``mvtec_layout_folder``): one config per folder on disk,
  named after the folder plus a hash of its absolute path.

`prepare()` is the entry point for the rest of grad_jax: it builds once into `data_dir` and
returns the builder, whose `as_data_source()` gives random access for grain.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import inspect
import io
import logging
import lzma
import shutil
import tarfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image
from tensorflow_datasets.core import utils as tfds_utils
from tqdm import auto as tqdm_auto

from . import layout
from .layout import BadImageError, DatasetLayoutError

logger = logging.getLogger(__name__)

VERSION = tfds.core.Version("1.1.0")
RELEASE_NOTES = {
    "1.0.0": "Initial release: image, mask, label, category, defect_type, filename.",
    "1.1.0": "has_mask: defect folders without ground_truth/ masks are accepted (labels only).",
}
LABEL_NAMES = ("good", "defective")
FILE_FORMAT = "array_record"  # the only tfds format whose writer and reader need no TensorFlow

# Decoding runs on a few threads (Pillow releases the GIL while decoding); the window bounds
# how many encoded examples wait in memory ahead of the tfds writer.
_WORKERS = 4
_WINDOW = 16

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
MVTec AD cannot be downloaded automatically (its licence requires registration).

1. Register and download `{layout.MVTEC_ARCHIVE}` (about 4.9 GB) from
   {layout.MVTEC_HOMEPAGE}
   (a single category archive such as `bottle.tar.xz` works too).
2. Either put the archive itself in the manual directory (it is extracted once, to
   `<download_dir>/extracted/`), or extract it there so that one of
   `<manual_dir>/{layout.MVTEC_FOLDER}/<category>/train/good/` or
   `<manual_dir>/<category>/train/good/` exists.

The manual directory is `~/tensorflow_datasets/downloads/manual/` by default (in general
`<data_dir>/downloads/manual/`); choose another with `tfds build --manual_dir=...` or
`tfds_mvtec.prepare(category, data_dir, manual_dir=...)`.
"""


def features() -> tfds.features.FeaturesDict:
    """The feature spec shared by both builders.

    `image` holds encoded bytes, not pixels: 8-bit RGB or grayscale PNG/JPEG files are stored
    as they are, anything else is converted to 8-bit RGB PNG while building. tfds' decoders
    (TF, OpenCV or Pillow) all expand grayscale to the declared 3 channels, so a decoded image is
    always HxWx3 uint8. `mask` is always a binary {0, 255} grayscale PNG, all zero for good
    images, decoded as HxWx1 uint8. `has_mask` says whether `mask` is ground truth: False for
    defective images of a folder without masks (their stored mask is all zero and means
    "unknown"; `label` = 1 from the folder is then the only ground truth).
    """
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(
                shape=(None, None, 3),
                dtype=np.uint8,
                encoding_format=None,
                doc="8-bit RGB after decoding (grayscale sources are expanded to 3 channels).",
            ),
            "mask": tfds.features.Image(
                shape=(None, None, 1),
                dtype=np.uint8,
                encoding_format="png",
                doc="Defect mask, 0 or 255, same height and width as image; zero for good images.",
            ),
            "has_mask": tfds.features.Scalar(
                dtype=np.bool_,
                doc="True if mask is ground truth (good images, defects with a mask file); "
                "False for defects labelled by their folder only (mask all zero, unknown).",
            ),
            "label": tfds.features.ClassLabel(
                names=list(LABEL_NAMES), doc="0 = good (defect-free), 1 = defective."
            ),
            "category": tfds.features.Text(doc="Category name, e.g. 'bottle'."),
            "defect_type": tfds.features.Text(doc="Defect folder name; 'good' for good images."),
            "filename": tfds.features.Text(
                doc="Path relative to the category root, e.g. 'test/crack/000.png'."
            ),
        }
    )


# --------------------------------------------------------------------------- configs


@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
    """A BuilderConfig that carries the MVTec-layout folder to read.

    Attributes:
        root: absolute path of the category folder.
        category: value of the `category` feature (the folder name unless given).
    """

    root: str = ""
    category: str = ""


def folder_config(root: str | Path, name: str | None = None) -> FolderConfig:
    """Build the config of a folder: name = slug(name or folder name) + '_' + 8 hex of its path.

    The hash of the absolute (resolved) path keeps two folders with the same name, e.g.
    `a/bottle` and `b/bottle`, from sharing a build directory, while the same folder reached
    through different relative paths maps to the same config and so reuses its build.
    """
    absolute = Path(root).expanduser().resolve()
    digest = hashlib.sha1(str(absolute).encode("utf-8")).hexdigest()[:8]
    label = name or absolute.name
    return FolderConfig(
        name=f"{layout.slugify(label)}_{digest}",
        description=f"MVTec-layout folder {absolute}",
        root=str(absolute),
        category=label,
    )


# --------------------------------------------------------------------------- encoding


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@functools.lru_cache(maxsize=32)
def _empty_mask_png(width: int, height: int) -> bytes:
    """The all-zero mask of good images; cached because a category has few distinct sizes."""
    return _png_bytes(Image.new("L", (width, height), 0))


def _keeps_original_bytes(image: Image.Image, data: bytes) -> bool:
    """True if the file can be stored untouched: 8-bit gray or RGB PNG/JPEG without alpha.

    Those decode identically with every tfds decoder; storing them as they are avoids
    re-encoding (time) and inflating JPEGs into PNGs (space). The PNG bit depth is read from
    the IHDR chunk because Pillow opens 16-bit RGB PNGs as mode 'RGB' too.
    """
    if image.mode not in ("L", "RGB"):
        return False
    if image.format == "JPEG":
        return True
    if image.format == "PNG":
        return data[12:16] == b"IHDR" and data[24] == 8 and "transparency" not in image.info
    return False


def _encode_sample(sample: layout.Sample, category: str) -> dict[str, Any]:
    """Read, validate and encode one sample into the feature dict tfds expects.

    Raises:
        BadImageError: image or mask unreadable (the caller may skip the sample).
        DatasetLayoutError: mask size differs from the image size (never skipped: the pair is
            readable but inconsistent, which points at a mislabelled dataset).
    """
    data = layout.read_bytes(sample.path)
    image = layout.open_image(data, sample.path)
    width, height = image.size
    encoded = data if _keeps_original_bytes(image, data) else _png_bytes(layout.to_rgb8(image))
    if sample.mask_path is None:  # good (known empty) or no mask file (unknown, has_mask False)
        mask_png = _empty_mask_png(width, height)
        mask_empty = False
    else:
        mask_image = layout.open_image(layout.read_bytes(sample.mask_path), sample.mask_path)
        if mask_image.size != image.size:
            raise DatasetLayoutError(
                f"Mask {sample.mask_path} is {mask_image.size[0]}x{mask_image.size[1]} (WxH) but "
                f"its image {sample.path} is {width}x{height}: a mask must have its image's size. "
                "Fix or replace the mask (resize with nearest-neighbour interpolation)."
            )
        mask = layout.mask_to_binary(mask_image, sample.mask_path)
        mask_empty = not mask.any()
        mask_png = _png_bytes(Image.fromarray(mask))
    return {
        "image": encoded,
        "mask": mask_png,
        "has_mask": sample.has_mask,
        "label": sample.label,
        "category": category,
        "defect_type": sample.defect_type,
        "filename": sample.relpath,
        "_mask_empty": mask_empty,  # bookkeeping, removed before yielding
    }


def _ordered_map(
    fn: Callable[[layout.Sample], dict[str, Any]], items: Sequence[layout.Sample]
) -> Iterator[tuple[layout.Sample, dict[str, Any] | BadImageError]]:
    """Map `fn` over `items` on threads, in input order, keeping at most _WINDOW in flight.

    A BadImageError is returned in place of the result (the caller decides whether to skip);
    any other exception propagates when its item is reached, so errors stay deterministic.
    """

    def guarded(item: layout.Sample) -> dict[str, Any] | BadImageError:
        try:
            return fn(item)
        except BadImageError as err:
            return err

    executor = concurrent.futures.ThreadPoolExecutor(max_workers=_WORKERS)
    pending: collections.deque = collections.deque()
    try:
        for item in items:
            pending.append((item, executor.submit(guarded, item)))
            if len(pending) >= _WINDOW:
                done_item, future = pending.popleft()
                yield done_item, future.result()
        while pending:
            done_item, future = pending.popleft()
            yield done_item, future.result()
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- archives


def _extract_archive(archive: Path, target: Path) -> None:
    """Extract a tar archive into `target` once, atomically (temp folder, then rename).

    tfds' own `dl_manager.extract` goes through tf.io.gfile, i.e. needs TensorFlow, hence
    tarfile here. The 'data' filter refuses absolute paths, links out of the tree and devices.
    """
    partial = target.with_name(target.name + ".incomplete")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    logger.info("Extracting %s to %s (once; later builds reuse it).", archive, target)
    try:
        with (
            tarfile.open(archive, "r:*") as tar,
            tqdm_auto.tqdm(desc=f"Extracting {archive.name}", unit=" files") as bar,
        ):
            for member in tar:
                tar.extract(member, partial, filter="data")
                bar.update()
    except (tarfile.TarError, lzma.LZMAError, EOFError, OSError) as err:
        shutil.rmtree(partial, ignore_errors=True)
        raise DatasetLayoutError(
            f"Cannot extract {archive} ({type(err).__name__}: {err}). The download is probably "
            f"incomplete or corrupt: download it again from {layout.MVTEC_HOMEPAGE}, or extract "
            f"it yourself into {archive.parent}/."
        ) from err
    partial.rename(target)


def _archive_stem(archive: Path) -> str:
    name = archive.name
    for suffix in (".tar.xz", ".tar.gz", ".tgz", ".tar"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return archive.stem


def locate_mvtec_category(manual_dir: Path, extract_dir: Path, category: str) -> Path:
    """Find (extracting an archive once if needed) the folder of an MVTec AD category.

    Looks, in order, for an extracted folder in `manual_dir`, a previous extraction in
    `extract_dir`, then `mvtec_anomaly_detection.tar.xz` or `<category>.tar.xz` in `manual_dir`.
    """
    found = layout.find_mvtec_category(manual_dir, category)
    if found is not None:
        return found
    archives = [manual_dir / layout.MVTEC_ARCHIVE, manual_dir / f"{category}.tar.xz"]
    for archive in archives:
        target = extract_dir / _archive_stem(archive)
        if not target.exists() and archive.is_file():
            _extract_archive(archive, target)
        if target.exists():
            found = layout.find_mvtec_category(target, category)
            if found is not None:
                return found
    looked = [
        manual_dir / layout.MVTEC_FOLDER / category,
        manual_dir / category,
        *archives,
    ]
    raise DatasetLayoutError(
        f"MVTec AD category '{category}' not found in the manual directory {manual_dir}; looked "
        f"for {', '.join(str(p) for p in looked)}.\n{MANUAL_DOWNLOAD_INSTRUCTIONS}"
    )


# --------------------------------------------------------------------------- builders


class _LayoutBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """What both builders share: features, array_record default, generation, bad-image policy."""

    VERSION = VERSION
    RELEASE_NOTES = RELEASE_NOTES

    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """This module's file (tfds looks for checksums.tsv and dummy_data/ next to it).

        tfds 4.9.10 computes it through `importlib_resources`, a package it declares only for
        Python < 3.9, so on 3.11 without that package any builder living in a package fails
        with ModuleNotFoundError. tfds' own fallback, `inspect.getfile`, gives the same path.
        """
        return epath.Path(inspect.getfile(cls))

    def __init__(self, *, skip_bad_images: bool = False, file_format: Any = None, **kwargs: Any):
        """Default to array_record (the tfrecord writer needs TensorFlow).

        Args:
            skip_bad_images: leave out unreadable images (and their masks) instead of stopping;
                they are logged and listed in `info.metadata['skipped_images']`.
            file_format: tfds file format; default 'array_record'.
            **kwargs: passed to `tfds.core.GeneratorBasedBuilder` (data_dir, config, version).
        """
        self._skip_bad_images = skip_bad_images
        super().__init__(file_format=file_format or FILE_FORMAT, **kwargs)
        # tfds pickles builders by re-running __init__ with this dict.
        self._original_state["skip_bad_images"] = skip_bad_images

    def _category_name(self, scanned: layout.CategoryLayout) -> str:
        return scanned.name

    def _splits_for(self, root: Path) -> dict[str, Iterator[tuple[str, dict[str, Any]]]]:
        """Scan `root` (layout errors surface here, before any writing) and make the generators.

        The bookkeeping lists live in `info.metadata`, which tfds writes to metadata.json after
        the splits are generated, so what was skipped stays attached to the built dataset.
        """
        scanned = layout.scan_category(root)
        metadata = self.info.metadata
        metadata.clear()
        metadata.update(
            {
                "root": str(scanned.root.resolve()),
                "fingerprint": scanned.fingerprint(),
                "skip_bad_images": self._skip_bad_images,
                "skipped_images": [],
                "empty_masks": [],
                "ignored_files": list(scanned.ignored),
                "unused_masks": list(scanned.unused_masks),
                "defects_without_masks": list(scanned.unmasked_defect_types),
            }
        )
        category = self._category_name(scanned)
        return {split: self._generate_examples(scanned, split, category) for split in layout.SPLITS}

    def _generate_examples(
        self, scanned: layout.CategoryLayout, split: str, category: str
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield (relative filename, example) in sorted file order.

        Keys are relative paths, so they never contain a machine-specific directory, and with
        shuffling disabled the record order equals the sorted file order.
        """
        metadata = self.info.metadata
        encode = functools.partial(_encode_sample, category=category)
        skipped = 0
        for sample, result in _ordered_map(encode, scanned.samples(split)):
            if isinstance(result, BadImageError):
                if not self._skip_bad_images:
                    raise result
                skipped += 1
                metadata["skipped_images"].append(
                    {"file": sample.relpath, "path": str(result.path), "reason": result.reason}
                )
                logger.warning("Skipping bad image %s: %s", result.path, result.reason)
                continue
            if result.pop("_mask_empty"):
                metadata["empty_masks"].append(sample.relpath)
                logger.warning("Mask of defective image %s is empty (all zero).", sample.path)
            yield sample.relpath, result
        if skipped:
            logger.warning(
                "%s/%s: skipped %d bad image(s); see info.metadata['skipped_images'].",
                category,
                split,
                skipped,
            )


class Builder(_LayoutBuilder):
    """MVTec AD, one config per category, from a manually downloaded archive or folder."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name=category, description=f"MVTec AD category '{category}'.")
        for category in layout.MVTEC_CATEGORIES
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        """Metadata; description and citation come from README.md and CITATIONS.bib."""
        return self.dataset_info_from_configs(
            features=features(),
            supervised_keys=("image", "label"),
            homepage=layout.MVTEC_HOMEPAGE,
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _category_name(self, scanned: layout.CategoryLayout) -> str:
        return self.builder_config.name

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        """Resolve the category folder in the manual directory, then scan it."""
        category = self.builder_config.name
        try:
            manual_dir = Path(dl_manager.manual_dir)
        except AssertionError as err:  # tfds' way of saying "missing or empty"
            where = getattr(dl_manager, "_manual_dir", None) or "<data_dir>/downloads/manual"
            raise DatasetLayoutError(
                f"Cannot build MVTec AD category '{category}': the manual directory {where} does "
                f"not exist or is empty.\n{MANUAL_DOWNLOAD_INSTRUCTIONS}"
            ) from err
        extract_dir = Path(dl_manager.download_dir) / "extracted"
        return self._splits_for(locate_mvtec_category(manual_dir, extract_dir, category))


class MvtecLayoutFolder(_LayoutBuilder):
    """Any folder in the MVTec AD layout, as a category of its own (see `folder_builder`)."""

    def __init__(self, *, root: str | Path | None = None, **kwargs: Any):
        """Accept `root=` as a shortcut for `config=folder_config(root)`.

        That makes `tfds.builder('mvtec_layout_folder', root=...)` work as well.
        """
        if root is not None:
            if kwargs.get("config") is not None:
                raise ValueError("Give either root= or config=, not both.")
            kwargs["config"] = folder_config(root)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        """Metadata built in code: this builder has no README of its own."""
        config = self.builder_config
        where = f" read from {config.root}" if isinstance(config, FolderConfig) else ""
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Images in the MVTec AD folder layout (train/good, test/<defect>, "
                f"ground_truth/<defect>/<stem>_mask.png){where}."
            ),
            features=features(),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _category_name(self, scanned: layout.CategoryLayout) -> str:
        return self.builder_config.category or scanned.name

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        """Scan the folder named by the config."""
        del dl_manager  # everything is local
        config = self.builder_config
        if not isinstance(config, FolderConfig) or not config.root:
            raise DatasetLayoutError(
                "mvtec_layout_folder needs a folder: use tfds_mvtec.folder_builder(root, data_dir) "
                "or tfds.builder('mvtec_layout_folder', root=...)."
            )
        return self._splits_for(Path(config.root))


MvtecAd = Builder

# --------------------------------------------------------------------------- public helpers


def mvtec_builder(
    category: str, data_dir: str | Path | None = None, *, skip_bad_images: bool = False
) -> Builder:
    """The (not yet prepared) builder of one MVTec AD category."""
    if category not in layout.MVTEC_CATEGORIES:
        raise DatasetLayoutError(
            f"Unknown MVTec AD category {category!r}; expected one of "
            f"{', '.join(layout.MVTEC_CATEGORIES)}."
        )
    return Builder(config=category, data_dir=_dir(data_dir), skip_bad_images=skip_bad_images)


def folder_builder(
    root: str | Path,
    data_dir: str | Path | None = None,
    name: str | None = None,
    *,
    skip_bad_images: bool = False,
) -> MvtecLayoutFolder:
    """The (not yet prepared) builder of an MVTec-layout folder.

    The folder is only read when the builder is prepared, so a builder for a folder that is
    gone can still open a dataset built from it earlier.

    Args:
        root: the category folder (holding train/, test/, ground_truth/).
        data_dir: where tfds writes the build (default ~/tensorflow_datasets).
        name: label used for the config name and the `category` feature instead of the folder
            name; the path hash is appended either way.
        skip_bad_images: see `prepare`.
    """
    return MvtecLayoutFolder(
        config=folder_config(root, name), data_dir=_dir(data_dir), skip_bad_images=skip_bad_images
    )


def make_builder(
    root_or_category: str | Path,
    data_dir: str | Path | None = None,
    *,
    name: str | None = None,
    skip_bad_images: bool = False,
) -> _LayoutBuilder:
    """`mvtec_builder` for a bare category name, `folder_builder` for anything else.

    A bare name such as 'bottle' always means the MVTec AD category; write './bottle' (or pass
    a Path) for a local folder of that name.
    """
    if isinstance(root_or_category, str) and root_or_category in layout.MVTEC_CATEGORIES:
        return mvtec_builder(root_or_category, data_dir, skip_bad_images=skip_bad_images)
    text = str(root_or_category)
    if (
        isinstance(root_or_category, str)
        and "/" not in text
        and "\\" not in text
        and not Path(text).expanduser().exists()
    ):
        raise DatasetLayoutError(
            f"{text!r} is neither an MVTec AD category ({', '.join(layout.MVTEC_CATEGORIES)}) "
            f"nor an existing folder (relative to {Path.cwd()})."
        )
    return folder_builder(root_or_category, data_dir, name, skip_bad_images=skip_bad_images)


def prepare(
    root_or_category: str | Path,
    data_dir: str | Path | None = None,
    manual_dir: str | Path | None = None,
    skip_bad_images: bool = False,
    *,
    name: str | None = None,
) -> _LayoutBuilder:
    """Build (once) an MVTec AD category or an MVTec-layout folder; return the builder.

    A second call with the same arguments reuses the build without reading any image. If the
    folder changed since it was built, a warning says so (delete the build to rebuild).

    Args:
        root_or_category: an MVTec AD category name ('bottle', ...) or a folder path.
        data_dir: where tfds writes the build (default ~/tensorflow_datasets).
        manual_dir: for MVTec AD categories, where the archive or extracted folder lies
            (default <data_dir>/downloads/manual).
        skip_bad_images: leave out unreadable images instead of raising; they are logged and
            listed in `skipped_images(builder)`.
        name: for folders, a label replacing the folder name (see `folder_builder`).

    Returns:
        The prepared builder; `builder.as_data_source()` gives {'train', 'test'} data sources.

    Raises:
        DatasetLayoutError: the data is missing or not in the MVTec layout (message says how to
            fix it); BadImageError (a subclass) for an unreadable image without skip_bad_images.
    """
    builder = make_builder(root_or_category, data_dir, name=name, skip_bad_images=skip_bad_images)
    # Not builder.is_prepared(): in tfds 4.9.10 it logs a warning for a missing folder.
    was_prepared = (Path(builder.data_dir) / "dataset_info.json").exists()
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=_dir(manual_dir), try_download_gcs=False
        )
    )
    if was_prepared:
        logger.info("Reusing %s built in %s.", builder.info.full_name, builder.data_dir)
        _warn_if_changed(builder)
    skipped = skipped_images(builder)
    if skipped:
        logger.warning(
            "%s: %d bad image(s) were skipped: %s",
            builder.info.full_name,
            len(skipped),
            ", ".join(item["file"] for item in skipped),
        )
    return builder


def skipped_images(builder: tfds.core.DatasetBuilder) -> list[dict[str, str]]:
    """The images left out of a build by skip_bad_images: [{'file', 'path', 'reason'}, ...]."""
    metadata = builder.info.metadata or {}
    return list(metadata.get("skipped_images", []))


def _warn_if_changed(builder: _LayoutBuilder) -> None:
    """Warn when the source folder no longer matches the build (files added/removed/resized)."""
    metadata = builder.info.metadata or {}
    root, built = metadata.get("root"), metadata.get("fingerprint")
    if not root or not built or not Path(root).is_dir():
        return
    try:
        current = layout.scan_category(root).fingerprint()
    except DatasetLayoutError as err:
        logger.warning("%s no longer scans cleanly (%s); using the earlier build.", root, err)
        return
    if current != built:
        logger.warning(
            "%s changed since it was built into %s; delete that directory to rebuild.",
            root,
            builder.data_dir,
        )


def _dir(path: str | Path | None) -> str | None:
    """tfds wants str paths; expand '~' here because tfds does not."""
    return None if path is None else str(Path(path).expanduser())
