"""Score new images with a trained run: `python -m grad_jax.predict`, and its output files.

Python (the files: `grad_jax.inference.result_files`; the model: the one scorer)::

    from grad_jax.inference.predictor import Predictor

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

import os
import sys
from collections.abc import Sequence

from absl import flags
from tqdm import auto as tqdm

from grad_jax import cli
from grad_jax.errors import UsageError
from grad_jax.inference import result_files
from grad_jax.inference.loader import load_scorer
from grad_jax.inference.scorer import ScoringFailure
from tfds_mvtec.mvtec_ad import layout

#: The exit statuses of the command line.
EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = cli.EXIT_OK, 1, cli.EXIT_USER_ERROR


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
    files, failed = result_files.collect_inputs(paths, values.out, values.allow_formats)
    batch = max(1, min(values.batch_size, len(files)))
    scorer = load_scorer(
        values.model,
        values.workdir,
        batch_size=batch,
        step=values.step,
        expected_sha256=values.model_sha256 or None,
    )
    line = result_files.resolve_threshold(scorer, values.threshold, values.category)
    for path, reason in failed:
        _report_failure(path, reason)
    written = result_files.write_outputs(
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
