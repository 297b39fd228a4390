"""Score new images with a trained run: `python -m grad_jax.predict`, and its output files.

Python (the API lives in `grad_jax.inference.predictor`)::

    from grad_jax.predict import Predictor

    predictor = Predictor.from_workdir("runs/bottle")
    for p in predictor.predict([image_a, image_b]):  # numpy arrays of any size
        print(p.score, p.is_anomalous, p.anomaly_map.shape)
    ok, failed = predictor.predict_files(["a.png", "b.jpg"])

Command line::

    python -m grad_jax.predict --workdir=runs/bottle --out=results PATH [PATH ...]
    python -m grad_jax.predict --model=models/bottle --out=results PATH [PATH ...]

--workdir scores with a run folder, --model with an exported model folder
(`python -m grad_jax.export`); both through the one scorer (`grad_jax.inference.scorer`), so
they give the same results.

PATHs are image files or folders (searched recursively for .png .jpg .jpeg .bmp .tif .tiff in
any letter case, and the extensions of the formats given with --allow_formats; hidden files and
folders are skipped). --out must be a new or empty folder; --overwrite replaces the results of
an earlier run there (other files are kept). Results in --out:

- `scores.csv`: `file,path,score,decision,threshold,category,calibrated,overlay`, one row per
  scored image: `file` its name in the results (unique), `path` the input as given; decision
  `anomalous`, `normal`, empty (no threshold) or `unknown class` (a kind of part the model was
  not trained on: no category, no threshold); a text cell that starts with = + - @, a tab or a
  carriage return is written with a leading single quote, so spreadsheets show it as text;
- `maps.npz`: the raw anomaly map (float32, model input size; with tiling the stitched map at
  the original size) of every image, keyed like `file`;
- `overlays/<file>`: the heat map over the image at its original size, as a PNG named like the
  input (`a.png` -> `a.png`, `b.jpg` -> `b.png`, or `b.jpg.png` when `b.png` is an input too);
- `README.txt`: what was run, the threshold and the overlay colour range used.

`file` is the path relative to the folder argument it was found in (the base name for a file
argument). When two inputs would get the same name (`lotA/cam/p.png` and `lotB/cam/p.png` as
`cam/p.png`), the first in argument order keeps it and the others get `_2`, `_3`, ... before the
extension, skipping every name an input has of its own: no result ever carries the name of
another input; `path` says which file it is.

Images are decoded and converted exactly as the training data (`tfds_mvtec` layout rules: PNG,
JPEG, BMP or TIFF content, one frame; 16-bit scaled, grayscale replicated, alpha dropped,
palettes expanded) and resized like it (Pillow bilinear). A file that cannot be read (another
format, an animation or multi-page file, a damaged file) or that the model gives no finite
score is named on stderr and skipped; the exit status is then 1. Usage errors (no paths, a
folder that is not a run, a used --out) exit with status 2.
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
from absl import flags
from tqdm import auto as tqdm

from grad_jax import cli
from grad_jax.data.images import read_image, to_rgb8
from grad_jax.errors import UsageError
from grad_jax.files import atomic_write_bytes, remove, temp_name, unique_name
from grad_jax.inference import heatmap
from grad_jax.inference.decisions import Prediction
from grad_jax.inference.loader import load_scorer
from grad_jax.inference.predictor import Predictor
from grad_jax.inference.scorer import Scorer, ScoringFailure, colour_range
from tfds_mvtec.mvtec_ad import layout

#: The exit statuses of the command line.
EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = cli.EXIT_OK, 1, cli.EXIT_USER_ERROR
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


# The result type, image conversion and decision rules live in light modules shared with the
# exported model (grad_jax.inference.exported_model); re-exported here so
# `from grad_jax.predict import ...` works.
__all__ = ["Prediction", "Predictor", "UsageError", "read_image", "to_rgb8"]


# --------------------------------------------------------------------------------------------
# Inputs and outputs of the command line.
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------


def define_flags(values: flags.FlagValues) -> None:
    """The flags of `python -m grad_jax.predict` (the PATHs follow them)."""
    flags.DEFINE_string("workdir", None, "Run folder of a trained model.", flag_values=values)
    flags.DEFINE_string(
        "model", None, "Exported model folder (instead of --workdir).", flag_values=values
    )
    flags.DEFINE_string(
        "out", None, "Folder for scores.csv, maps.npz, overlays/.", flag_values=values
    )
    flags.DEFINE_integer("batch_size", 16, "Images per device batch.", flag_values=values)
    flags.DEFINE_float(
        "threshold",
        None,
        "Decision threshold: score >= it is anomalous (default: the run's).",
        flag_values=values,
    )
    flags.DEFINE_string(
        "category", None, "Use the run's threshold for this category.", flag_values=values
    )
    flags.DEFINE_integer(
        "step", None, "Checkpoint step (default: the latest readable).", flag_values=values
    )
    flags.DEFINE_boolean("progress", True, "Show a progress bar.", flag_values=values)
    flags.DEFINE_boolean(
        "overwrite",
        False,
        "Replace the results of an earlier run in a non-empty --out (scores.csv, maps.npz, "
        "overlays/, README.txt; other files are kept). Without it a non-empty --out is refused.",
        flag_values=values,
    )
    flags.DEFINE_list(
        "allow_formats",
        [],
        "Image formats to read beyond PNG, JPEG, BMP and TIFF (Pillow names, e.g. WEBP,GIF); "
        "their extensions are then found in folders too.",
        flag_values=values,
    )
    flags.DEFINE_string(
        "model_sha256",
        None,
        "With --model: the digest the exported folder must have (printed by "
        "python -m grad_jax.export; the sha256 of its meta.json, which holds its program's).",
        flag_values=values,
    )


USAGE = (
    "usage: python -m grad_jax.predict (--workdir=DIR | --model=DIR) --out=OUT PATH [PATH ...]\n\n"
    + "PATHs are"
    + (__doc__ or "").split("PATHs are", 1)[-1].rstrip()
)


def _check_flags(values: flags.FlagValues, paths: Sequence[str]) -> None:
    """Usage errors before any file is read or written."""
    if not values.workdir and not values.model:
        raise UsageError(
            "--workdir (a run folder) or --model (an exported model folder) is required"
        )
    if not values.out:
        raise UsageError("--out is required (the folder for the results)")
    if not paths:
        raise UsageError("no images given: pass image files or folders after the flags")
    if values.batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, got {values.batch_size}")
    if os.path.exists(values.out) and not os.path.isdir(values.out):
        raise UsageError(f"--out={values.out} is a file, not a folder")
    if values.threshold is not None and values.category is not None:
        raise UsageError("give either --threshold or --category, not both")
    if values.model_sha256 and not values.model:
        raise UsageError(
            "--model_sha256 pins an exported model folder (--model), not a run folder (--workdir)"
        )
    try:
        layout.accepted_formats(values.allow_formats)
    except ValueError as err:
        raise UsageError(f"--allow_formats: {err}") from None
    if os.path.isdir(values.out) and os.listdir(values.out) and not values.overwrite:
        raise UsageError(
            f"--out={values.out} is not empty: give a new or empty folder, or pass --overwrite "
            "to replace the results there (scores.csv, maps.npz, overlays/, README.txt)"
        )


def _report_failure(path: str, reason: str) -> None:
    """One stderr line per file that was not scored: unreadable, or no finite result."""
    what = "cannot score" if isinstance(reason, ScoringFailure) else "cannot read"
    tqdm.tqdm.write(f"grad_jax: {what} {path}: {reason}", file=sys.stderr)


def predict_paths(values: flags.FlagValues, paths: list[str]) -> int:
    """Score the images at `paths` with the run --workdir and write the results to --out."""
    _check_flags(values, paths)
    files, failed = collect_inputs(paths, values.out, values.allow_formats)
    batch = max(1, min(values.batch_size, len(files)))
    scorer = load_scorer(
        values.model,
        values.workdir,
        batch_size=batch,
        step=values.step,
        expected_sha256=values.model_sha256 or None,
    )
    line = resolve_threshold(scorer, values.threshold, values.category)
    for path, reason in failed:
        _report_failure(path, reason)
    written = write_outputs(
        scorer,
        files,
        values.out,
        line,
        _report_failure,
        values.progress,
        failed,
        values.category,
        values.threshold,
        values.allow_formats,
    )
    failed += written.failed
    flagged = "" if line[0] is None else f" (threshold {line[0]:.6g})"
    unknown = f", {written.unknown} of an unknown class" if written.unknown else ""
    print(
        f"grad_jax: scored {written.scored} image(s){flagged}{unknown}, {len(failed)} not "
        f"scored; results in {values.out}"
    )
    return EXIT_SOME_FAILED if failed else EXIT_OK


def main(argv: Sequence[str]) -> int:
    """The command line (`argv[0]` is the program name); returns the exit status."""
    return cli.run_command(argv, USAGE, define_flags, predict_paths, positional_args=True)


def run() -> None:
    """Console-script entry point (`grad-jax-predict`)."""
    sys.exit(main(sys.argv))


if __name__ == "__main__":
    run()
