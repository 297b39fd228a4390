"""Export a trained run as one self-contained model folder: `python -m grad_jax.export`.

    python -m grad_jax.export --workdir=runs/my_part --out=models/my_part

writes `model.jaxexport` (the whole predict program as `jax.export` StableHLO, weights
included, batch dimension symbolic, lowered for cpu, cuda and tpu) and `meta.json`; load it
with `grad_jax.inference.exported_model.load_model`, which needs jax, numpy and Pillow only.
The exported program is the one `Predictor` runs (`device_program.predict_program`).

It prints the folder's digest (the sha256 of meta.json, which holds the program's): pin it where
the folder is used (`load_model(..., expected_sha256=...)`, `python -m grad_jax.predict
--model_sha256=...`) and an edited threshold or swapped program is refused at load.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
from absl import flags
from jax import export as jax_export

from grad_jax import cli
from grad_jax.data import images
from grad_jax.errors import UsageError
from grad_jax.files import atomic_write_bytes, atomic_write_json
from grad_jax.inference import device_program, exported_model
from grad_jax.inference.scorer import ScoringSpec
from grad_jax.runs import checkpointing
from grad_jax.runs.run_folder import TrainedModel, load_trained


def export_program(trained: TrainedModel, platforms: Sequence[str] = exported_model.PLATFORMS):
    """The `jax.export.Exported` of the predict program of `trained`, batch dim symbolic."""
    variables = trained.variables
    stats = device_program.map_stats(trained.meta)
    program = device_program.predict_program(variables, trained.config, stats)
    weights = jax.tree.map(jnp.asarray, device_program.program_weights(variables))

    def predict(images_uint8):
        return program(*weights, images_uint8)

    (n,) = jax_export.symbolic_shape("n")
    h, w = (int(x) for x in trained.config.data.image_size)
    spec = jax.ShapeDtypeStruct((n, h, w, 3), jnp.uint8)
    return jax_export.export(jax.jit(predict), platforms=tuple(platforms))(spec)


def build_meta(trained: TrainedModel, exported: Any) -> dict[str, Any]:
    """meta.json without the model file's digest (added once the file is written)."""
    config = trained.config
    h, w = (int(x) for x in config.data.image_size)
    spec = ScoringSpec.from_config(config)
    meta = trained.meta
    threshold = meta.get("threshold")
    categories = meta.get("categories") or (
        (meta.get("class_centres") or {}).get("names")
        or sorted(((threshold or {}).get("per_category") or {}).keys())
    )
    return {
        "format": exported_model.FORMAT,
        "format_version": exported_model.FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "checkpoint_step": trained.step,
        "input": {
            "shape": ["n", h, w, 3],
            "dtype": "uint8",
            "image_size": [h, w],
            "resize": images.RESIZE_RULE
            if not spec.tiled
            else f"tiled: to_rgb8, then Pillow bilinear by the scale {spec.tile_scale:g} (raised "
            f"so that both sides hold a tile), cut into {spec.tile_size}x{spec.tile_size} tiles "
            f"overlapping by at least {spec.tile_overlap} px; the program scores tiles, the "
            "scorer stitches their raw maps (overlaps averaged), then smooths and scores the "
            "stitched map",
            "normalisation": "inside the program (the backbone's own, on 0..255 RGB)",
        },
        "scoring": spec.to_meta(),
        "outputs": {
            "raw": "[n, H, W] float32: the anomaly map (upsampled distance, before smoothing)",
            "smoothed": f"[n, H, W] float32: raw after the {config.eval.smooth_size}x"
            f"{config.eval.smooth_size} zero-padded box mean",
            "score": f"[n] float32: max of the {config.eval.score_pool}x{config.eval.score_pool} "
            "'valid' box mean of 'smoothed'",
            "pooled": "[n, D] float32: backbone stage outputs averaged over positions",
        },
        "categories": list(categories),
        "threshold": threshold,
        "model_kind": config.model.get("kind", "grad"),
        "knn": meta.get("knn"),  # the memory bank's settings and map statistics (bank inside)
        "class_centres": meta.get("class_centres"),
        "recognition": (
            "nearest class centre of the pooled features"
            if meta.get("class_centres")
            else "unavailable: the run was trained before class centres were stored"
        ),
        "config_fingerprint": checkpointing.fingerprint(config),
        "config": json.loads(config.to_json_best_effort()),
        "platforms": list(exported.platforms),
        "calling_convention_version": exported.calling_convention_version,
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "model_file": exported_model.MODEL_FILE,
    }


def write_model_folder(
    trained: TrainedModel, out: str, platforms: Sequence[str] = exported_model.PLATFORMS
) -> dict[str, Any]:
    """Export `trained` into folder `out`: `model.jaxexport` and `meta.json`.

    Both files are written under temporary names and renamed, meta.json last, so a folder
    that holds a meta.json is complete. Returns the meta.
    """
    exported = export_program(trained, platforms)
    data = exported.serialize()
    meta = build_meta(trained, exported)
    os.makedirs(out, exist_ok=True)
    model_path = os.path.join(out, exported_model.MODEL_FILE)
    meta_path = os.path.join(out, exported_model.META_FILE)
    if os.path.exists(meta_path):
        os.remove(meta_path)  # the folder is incomplete until the new meta.json lands
    atomic_write_bytes(model_path, data)
    meta["model_sha256"] = exported_model.sha256_of(model_path)
    meta["model_bytes"] = os.path.getsize(model_path)
    atomic_write_json(meta_path, meta, indent=1)
    return meta


def export_workdir(
    workdir: str,
    out: str,
    step: int | None = None,
    platforms: Sequence[str] = exported_model.PLATFORMS,
) -> dict[str, Any]:
    """Export the run in `workdir` (its latest checkpoint, or `step`) into folder `out`
    (`write_model_folder`). Returns the meta."""
    return write_model_folder(load_trained(workdir, step=step), out, platforms)


def define_flags(values: flags.FlagValues) -> None:
    """The flags of `python -m grad_jax.export`."""
    flags.DEFINE_string("workdir", None, "Run folder of a trained model.", flag_values=values)
    flags.DEFINE_string(
        "out", None, "Folder for model.jaxexport and meta.json.", flag_values=values
    )
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", flag_values=values)
    flags.DEFINE_list(
        "platforms", list(exported_model.PLATFORMS), "Platforms to lower for.", flag_values=values
    )


def export_command(values: flags.FlagValues, args: list[str]) -> int:
    """Check the flags (every problem in one line), export, and print what was written."""
    problems = []
    if not values.workdir:
        problems.append("--workdir is required (the run folder of a trained model)")
    if not values.out:
        problems.append("--out is required (the folder for the exported model)")
    elif os.path.exists(values.out) and not os.path.isdir(values.out):
        problems.append(f"--out={values.out} is a file, not a folder")
    unknown = sorted(set(values.platforms) - {"cpu", "cuda", "rocm", "tpu"})
    if unknown:
        problems.append(f"--platforms: unknown {', '.join(unknown)} (cpu, cuda, rocm, tpu)")
    if problems:
        raise UsageError("; ".join(problems))
    meta = export_workdir(values.workdir, values.out, values.step, values.platforms)
    size = meta["model_bytes"] / 2**20
    digest = exported_model.folder_digest(values.out)
    print(
        f"grad_jax: exported step {meta['checkpoint_step']} of {values.workdir} to {values.out} "
        f"({exported_model.MODEL_FILE} {size:.1f} MiB for {', '.join(meta['platforms'])}; "
        f"classes: {', '.join(meta['categories']) or 'unknown'})\n"
        f"grad_jax: folder digest (sha256 of {exported_model.META_FILE}) {digest}: pin it with "
        f"--model_sha256={digest} (predict) or load_model(..., expected_sha256=...)"
    )
    return cli.EXIT_OK


def main(argv: Sequence[str]) -> int:
    """The command line (`argv[0]` is the program name); returns the exit status."""
    return cli.run_command(argv, __doc__, define_flags, export_command)


def run() -> None:
    """Console-script entry point (`grad-jax-export`)."""
    sys.exit(main(sys.argv))


if __name__ == "__main__":
    run()
