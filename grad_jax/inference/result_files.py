"""The files of scoring a set of images: which images a list of paths names, and the results
written for them (scores.csv, maps.npz, overlays/, README.txt), through the one scorer.

`collect_inputs` turns command-line PATHs into `(path, key)` pairs with unique keys (no result
ever carries another input's name); `write_outputs` scores them with a `Scorer` and writes every
output under a temporary name, renamed when complete (a used or interrupted output folder is
never left half-written). `python -m grad_jax.predict` is the command around them; its docstring
describes the files.
"""

from __future__ import annotations

import csv
import math
import os
import pathlib
import posixpath
import sys
import zipfile
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
from tqdm import auto as tqdm

from grad_jax.data.images import read_image
from grad_jax.errors import UsageError
from grad_jax.files import atomic_write_bytes, remove, temp_name, unique_name
from grad_jax.inference import heatmap
from grad_jax.inference.decisions import Prediction
from grad_jax.inference.scorer import Scorer, colour_range
from tfds_mvtec.mvtec_ad import layout

OVERLAY_DIR = "overlays"
CSV_COLUMNS = [
    "file",
    "path",
    "score",
    "decision",
    "threshold",
    "category",
    "calibrated",
    "overlay",
]
#: scores.csv's decision for an image of a kind of part the model does not know.
UNKNOWN_CLASS_DECISION = "unknown class"
#: First characters that make a spreadsheet read a cell as a formula (or hide it).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _image_files(
    folder: str, exclude: str | None = None, extensions: frozenset[str] = layout.IMAGE_EXTENSIONS
) -> list[tuple[str, str]]:
    """`(path, key)` of the images below `folder`, key = POSIX path relative to it, sorted.

    Images are the visible files whose suffix (any case) is in `extensions`. Hidden files and
    folders are skipped, and so is the folder `exclude` (the output folder).
    """
    found = []
    skip = None if exclude is None else os.path.realpath(exclude)
    for top, dirs, files in os.walk(folder):
        dirs[:] = sorted(
            d
            for d in dirs
            if not layout.is_hidden(pathlib.Path(d))
            and os.path.realpath(os.path.join(top, d)) != skip
        )
        rel = os.path.relpath(top, folder)
        for name in files:
            if os.path.splitext(name)[1].lower() in extensions and not layout.is_hidden(
                pathlib.Path(name)
            ):
                parts = [] if rel == os.curdir else rel.split(os.sep)
                found.append((os.path.join(top, name), posixpath.join(*parts, name)))
    return sorted(found, key=lambda item: item[1])


def collect_inputs(
    paths: Sequence[str], exclude: str | None = None, allow_formats: Sequence[str] = ()
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """`([(file, key)], [(path, reason)])` for the command-line PATHs.

    A folder contributes its images (key: the path relative to it; images: the training
    formats' extensions and those of `allow_formats`), except those under the folder `exclude`
    (the output folder, whose overlays are images too); a file is taken whatever its name (key:
    its base name). A file reached twice is scored once. Keys are unique, compared
    case-insensitively (so the overlays can live on any file system): of the inputs with the
    same key, the first in argument order keeps it and the others get `_2`, `_3`, ... before
    the extension, skipping every key an input has of its own, so that no result is ever named
    like another input.
    """
    extensions = layout.IMAGE_EXTENSIONS | layout.format_extensions(allow_formats)
    files: list[tuple[str, str]] = []
    failed: list[tuple[str, str]] = []
    for arg in paths:
        if os.path.isdir(arg):
            found = _image_files(arg, exclude, extensions)
            if not found:
                kinds = ", ".join(sorted(extensions))
                failed.append((arg, f"the folder holds no image file ({kinds})"))
            files += found
        elif os.path.lexists(arg):
            files.append((arg, os.path.basename(arg)))
        else:
            failed.append((arg, "no such file or folder"))
    unique, seen = [], set()
    for path, key in files:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            unique.append((path, key))
    own = {key.lower() for _, key in unique}  # every input's own name: never given to another
    out, taken = [], set()
    for path, key in unique:
        if key.lower() in taken:
            stem, ext = posixpath.splitext(key)
            key = unique_name(stem, taken | own, ext)
        taken.add(key.lower())
        out.append((path, key))
    return out, failed


class Written(NamedTuple):
    """What `write_outputs` wrote: images scored, `(path, reason)` of those not scored, and
    how many of the scored ones are of an unknown class."""

    scored: int
    failed: list[tuple[str, str]]
    unknown: int


class _NpzWriter:
    """Writes arrays one by one into an .npz (a zip of .npy files, as numpy.savez does)."""

    def __init__(self, path: str):
        self.zip = zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True)

    def add(self, key: str, array: np.ndarray) -> None:
        with self.zip.open(key + ".npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)

    def close(self) -> None:
        self.zip.close()


def _write_overlay(path: str, image: np.ndarray, anomaly_map: np.ndarray, vmin, vmax) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    overlay = heatmap.overlay_image(image, anomaly_map, vmin, vmax)
    atomic_write_bytes(path, heatmap.png_bytes(overlay))


def overlay_names(keys: Sequence[str]) -> dict[str, str]:
    """The overlay file of each result key (a relative path): the key itself when it names a
    PNG, else the key with its extension replaced by `.png`; `<key>.png` (then `_2`, `_3`, ...)
    when that name is taken by another input. Unique without regard to letter case."""
    taken = {k.lower() for k in keys if k.lower().endswith(".png")}
    names = {k: k for k in keys if k.lower().endswith(".png")}
    for key in keys:
        if key in names:
            continue
        stem = posixpath.splitext(key)[0]
        candidates = [stem + ".png", key + ".png"]
        k = 2
        while all(c.lower() in taken for c in candidates):
            candidates.append(f"{stem}_{k}.png")
            k += 1
        name = next(c for c in candidates if c.lower() not in taken)
        taken.add(name.lower())
        names[key] = name
    return names


def _fmt(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def resolve_threshold(
    scorer: Scorer, threshold: float | None, category: str | None
) -> tuple[float | None, str]:
    """(threshold, where it comes from) for README.txt and the summary line: --threshold, else
    --category's (the scorer's rule for that class), else the run's; with several classes and
    neither flag, each image's own class decides (the value is then the run's, for reference)."""
    if threshold is not None and category is not None:
        raise UsageError("give either --threshold or --category, not both")
    if threshold is not None and not math.isfinite(threshold):
        raise UsageError(f"--threshold must be a finite number, got {threshold}")
    if category is not None and category not in scorer.categories:
        have = ", ".join(scorer.categories) or "none (the model stores no class names)"
        raise UsageError(f"--category={category}: the model has no such class; known: {have}")
    value, source = scorer.threshold_for(category, threshold)
    if threshold is not None:
        source = "given with --threshold"
    elif category is None and len(scorer.categories) > 1:
        source = "per image: the threshold of its class (recognised from the image)"
    return value, source


def write_outputs(
    scorer: Scorer,
    files: Sequence[tuple[str, str]],
    out: str,
    threshold_line: tuple[float | None, str],
    report_failure: Callable[[str, str], None],
    progress: bool = True,
    missing: Sequence[tuple[str, str]] = (),
    category: str | None = None,
    threshold: float | None = None,
    allow_formats: Sequence[str] = (),
) -> Written:
    """Score `files` (`(path, key)`) and write scores.csv, maps.npz, overlays/ and README.txt.

    `threshold_line`: (value, where it comes from) for README.txt (`resolve_threshold`).
    `report_failure(path, reason)` is called for each file that cannot be read or scored
    (`reason` is a `ScoringFailure` when the model gave no finite result).
    `missing`: `(path, reason)` of inputs that failed before (listed in README.txt too).
    `category`: the class of every image (None: each image's is recognised); `threshold`:
    decide every image with it (None: the stored thresholds); `allow_formats`: image formats
    read beyond PNG, JPEG, BMP and TIFF. Overlays follow the scorer's colour rule
    (`scorer.colour_range`): an image decided with a positive threshold at once, the others in
    a second pass over the range of all their maps. Outputs of an earlier run in `out` are
    replaced. Every output is written under a temporary name and renamed when complete.
    Returns what was written (`Written`).
    """
    os.makedirs(out, exist_ok=True)
    final = {name: os.path.join(out, name) for name in ("scores.csv", "maps.npz", "README.txt")}
    final[OVERLAY_DIR] = os.path.join(out, OVERLAY_DIR)
    temps = {name: temp_name(path) for name, path in final.items()}
    old_overlays = temp_name(final[OVERLAY_DIR]) + ".old"
    failed: list[tuple[str, str]] = []
    scored: list[tuple[str, str]] = []
    npz = None
    try:
        for tmp in temps.values():
            remove(tmp)
        os.makedirs(temps[OVERLAY_DIR])
        npz = _NpzWriter(temps["maps.npz"])
        anomalous = unknown = 0
        unscaled: list[tuple[str, str]] = []  # (path, key) of images decided without threshold
        any_decision = False
        used: set[float] = set()  # the positive thresholds that colour overlays
        with open(temps["scores.csv"], "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(CSV_COLUMNS)
            keys = dict(files)
            overlay_of = overlay_names([key for _, key in files])
            bar = tqdm.tqdm(total=len(files), unit="img", desc="predict", disable=not progress)
            paths = [p for p, _ in files]
            results = scorer.iter_files(paths, category, threshold, allow_formats)
            for path, image, p, reason in results:
                bar.update(1)
                if p is None:
                    failed.append((path, reason))
                    report_failure(path, reason)
                    continue
                key = keys[path]
                scored.append((path, key))
                anomalous += bool(p.is_anomalous)
                unknown += p.unknown_class
                any_decision = any_decision or p.is_anomalous is not None
                writer.writerow(_csv_row(key, path, p, overlay_of[key]))
                npz.add(key, p.anomaly_map)
                if p.threshold is not None and p.threshold > 0:
                    overlay = os.path.join(temps[OVERLAY_DIR], overlay_of[key])
                    vmin, vmax = colour_range(p.threshold, [p.anomaly_map])
                    used.add(p.threshold)
                    _write_overlay(overlay, image, p.anomaly_map, vmin, vmax)
                else:
                    unscaled.append((path, key))
            bar.close()
        npz.close()
        npz = None
        shared = None
        if unscaled:
            shared = _overlays_from_maps(unscaled, temps, overlay_of, progress, allow_formats)
        decided = anomalous if scored and any_decision else None
        readme = _readme(
            scorer,
            scored,
            [*missing, *failed],
            (decided, unknown),
            threshold_line,
            sorted(used),
            shared,
            len(unscaled),
        )
        with open(temps["README.txt"], "w", encoding="utf-8") as f:
            f.write(readme)
        _publish(temps, final, old_overlays)
    finally:
        if npz is not None:
            npz.close()
        for tmp in [*temps.values(), old_overlays]:
            remove(tmp)
    return Written(len(scored), failed, unknown)


def csv_text(value: str) -> str:
    """A text cell of scores.csv: with a leading single quote when it starts like a formula
    (= + - @, a tab or a carriage return), so a spreadsheet shows it as text, never runs it."""
    return "'" + value if value.startswith(_FORMULA_STARTS) else value


def _csv_row(key: str, path: str, p: Prediction, overlay: str) -> list[str]:
    """One row of scores.csv (`CSV_COLUMNS`)."""
    if p.unknown_class:
        decision = UNKNOWN_CLASS_DECISION
    else:
        decision = {None: "", True: "anomalous", False: "normal"}[p.is_anomalous]
    return [
        csv_text(key),
        csv_text(path),
        _fmt(p.score),
        decision,
        _fmt(p.threshold),
        csv_text(p.category or ""),
        _fmt(p.calibrated),
        csv_text(overlay),
    ]


def _publish(temps: dict[str, str], final: dict[str, str], old_overlays: str) -> None:
    """Rename the complete temporary outputs onto their names, scores.csv last."""
    os.replace(temps["maps.npz"], final["maps.npz"])
    if os.path.lexists(final[OVERLAY_DIR]):
        os.replace(final[OVERLAY_DIR], old_overlays)
    os.replace(temps[OVERLAY_DIR], final[OVERLAY_DIR])
    os.replace(temps["README.txt"], final["README.txt"])
    os.replace(temps["scores.csv"], final["scores.csv"])  # last: the run is complete


def _overlays_from_maps(scored, temps, overlay_of, progress, allow_formats) -> tuple[float, float]:
    """Overlays of the images decided without a (positive) threshold: their colour range spans
    all their maps (the scorer's rule), so image and map are read again once it is known.
    Returns that range."""
    with np.load(temps["maps.npz"]) as maps:
        vmin, vmax = colour_range(None, (maps[key] for _, key in scored))
        bar = tqdm.tqdm(total=len(scored), unit="img", desc="overlays", disable=not progress)
        for path, key in scored:
            bar.update(1)
            try:
                image = read_image(path, allow_formats)
            except layout.BadImageError as err:  # changed on disk since it was scored
                print(f"grad_jax: no overlay for {path}: {err.reason}", file=sys.stderr)
                continue
            overlay = os.path.join(temps[OVERLAY_DIR], overlay_of[key])
            _write_overlay(overlay, image, maps[key], vmin, vmax)
        bar.close()
    return vmin, vmax


def _readme(scorer, scored, failed, counts, threshold, thresholds, shared, n_shared) -> str:
    """README.txt; `counts`: (images flagged anomalous or None without decisions, images of an
    unknown class); `threshold`: (value, where it comes from), see `resolve_threshold`;
    `thresholds`: the positive thresholds the overlays were coloured by."""
    h, w = scorer.image_size
    anomalous, unknown = counts
    value, source = threshold
    parts = []
    if thresholds:
        parts.append(
            "images decided with a positive threshold: vmin = 0, vmax = 2 x their threshold "
            "(the threshold sits in the middle of the scale, so colours mean the same across "
            "images; " + ", ".join(f"2 x {t:.6g} = {2 * t:.6g}" for t in thresholds) + ")"
        )
    if shared is not None:
        parts.append(
            f"the {n_shared} image(s) decided without one: the minimum and maximum over their "
            f"raw maps, vmin = {shared[0]:.6g}, vmax = {shared[1]:.6g} (comparable among them "
            "only)"
        )
    colour = "; ".join(parts) or "none (no image scored)"
    if scorer.meta.get("source") == "run folder":
        model = f"run folder {getattr(scorer, 'workdir', None)}"
    else:
        model = f"exported model folder {getattr(scorer, 'model_dir', None)}"
    step = scorer.meta.get("checkpoint_step")
    lines = [
        "grad_jax predictions",
        "",
        f"Model: {model}, checkpoint step {step}, input size {h}x{w}"
        + (" (one tile)." if scorer.tiled else "."),
        f"Images: {len(scored)} scored, {len(failed)} not scored"
        + (f", {anomalous} flagged anomalous" if anomalous is not None else "")
        + (f", {unknown} of an unknown class" if unknown else "")
        + ".",
        f"Decision threshold: {_fmt(value) or 'none'} ({source}).",
        "",
        "Files:",
        "  scores.csv   " + ",".join(CSV_COLUMNS) + "; one row per scored image.",
        "               'file' is the image's name in these results: its path relative to the",
        "               folder it was found in (or its name when it was given directly), with",
        "               _2, _3, ... before the extension when another input has that name;",
        "               'path' is the input file as given. decision is 'anomalous' when",
        "               score >= threshold, 'normal' otherwise, empty when no threshold is",
        "               known, and 'unknown class' (no category, no threshold) when the image",
        "               lies farther from every class the model knows than that class's own",
        "               training images do (times a margin): a kind of part it was not trained",
        "               on. category is the class the decision was made for (given with",
        "               --category, or recognised from the image); calibrated is the fraction of",
        "               that class's held-out normal images that scored lower; overlay is the",
        "               overlay's file name in overlays/. A text cell that starts with = + - @,",
        "               a tab or a carriage return is written with a leading single quote (a",
        "               spreadsheet then shows it as text instead of running it as a formula);",
        "               maps.npz and overlays/ use the names without it.",
        *(
            [
                "  maps.npz     one float32 array per image at its original size, keyed like",
                f"               'file': the raw maps of its {h}x{w} tiles, stitched (overlaps",
                "               averaged) and resized to the image (per-pixel distance, before",
                "               the smoothing the score is computed from).",
            ]
            if scorer.tiled
            else [
                f"  maps.npz     one float32 array of {h}x{w} per image, keyed like 'file':",
                "               the raw anomaly map at the model input size (per-pixel distance,",
                "               before the smoothing the score is computed from).",
            ]
        ),
        "  overlays/    one PNG per image, named like the input (extension .png; see 'overlay'",
        "               in scores.csv): the raw map, upsampled (bilinear) to the image's",
        "               original size, in jet colours (blue = low, red = high) over the image.",
        "",
        f"Overlay colour range: {colour}. Values outside it are clipped.",
    ]
    if failed:
        lines += ["", "Files not scored (unreadable, or no finite score from the model):"]
        lines += [f"  {path}: {reason}" for path, reason in failed]
    return "\n".join(lines) + "\n"
