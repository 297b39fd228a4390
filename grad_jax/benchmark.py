"""Throughput benchmark: `python -m grad_jax.benchmark --config=configs/unified.py --batch=8`.

Measures, on whatever backend JAX runs on, with the config's model and dtype:
- inference images/s: backbone, neck, head, anomaly map, smoothing and score, jitted;
- training images/s from images (backbone every step) and from cached backbone features;
- FLOPs per image from XLA's cost analysis, and the FLOP/s achieved;
- peak memory (device peak where the backend reports it, else the process's peak RSS);
- with `--parts=latency`: batch-1 latency (p50, p95 in ms) of one image from its encoded file
  bytes to the decision (decode + resize + predict) for `Predictor` and for the exported model
  (`grad_jax.export` of the same weights, loaded with `grad_jax.inference.exported_model`).
Weights are random unless --pretrained: throughput does not depend on their values. Prints one
JSON object, which names the CPU model and its vector extensions; --out=FILE writes it too.
"""

from __future__ import annotations

import io
import json
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from PIL import Image

from grad_jax import cli, export
from grad_jax.config import tiling_on
from grad_jax.data import images
from grad_jax.devices import sharding
from grad_jax.inference import device_program, exported_model
from grad_jax.inference.predictor import Predictor
from grad_jax.models.model import ModelVariables
from grad_jax.runs import run_folder
from grad_jax.runs.run_folder import TrainedModel
from grad_jax.runs.train_state import TrainState
from grad_jax.training import feature_cache, loop
from grad_jax.training.optim import make_optimizer
from tfds_mvtec.mvtec_ad import layout


def define_flags(values: flags.FlagValues) -> None:
    """The flags of `python -m grad_jax.benchmark` (--config comes with `cli.run_command`)."""
    v = values
    flags.DEFINE_integer("batch", 8, "Images per step (global).", flag_values=v)
    flags.DEFINE_integer(
        "steps", 5, "Timed iterations after warm-up (the median is reported).", flag_values=v
    )
    flags.DEFINE_bool(
        "pretrained", False, "Load the configured pretrained backbone.", flag_values=v
    )
    flags.DEFINE_string("out", None, "Also write the JSON here.", flag_values=v)
    parts = ["infer", "train", "train_cached", "latency"]
    flags.DEFINE_list("parts", parts, "What to time.", flag_values=v)
    flags.DEFINE_integer(
        "latency_images", 40, "Batch-1 latency: images per pass (2 passes).", flag_values=v
    )


def time_call(fn, steps: int, warm_up: bool = True) -> float:
    """Median seconds per call of `fn` (which must block until done), after one warm-up."""
    if warm_up:
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _flops(jitted, *args) -> float | None:
    try:
        analysis = jitted.lower(*args).compile().cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports costs
        return None
    if isinstance(analysis, list):
        analysis = analysis[0] if analysis else {}
    value = (analysis or {}).get("flops")
    return float(value) if value else None


_VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512", "amx", "neon", "asimd", "sve")


def cpu_info() -> dict[str, Any]:
    """The CPU model and vector extensions (from /proc/cpuinfo where there is one)."""
    model, flags_ = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model") and model in ("", platform.machine(), "x86_64"):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags_:
                    flags_ = value.split()
    except OSError:
        pass
    vector = sorted({f for f in flags_ if f.startswith(_VECTOR_FLAGS)})
    return {"cpu_model": model, "cpu_vector_extensions": vector, "cpu_count": os.cpu_count()}


def sample_files(n: int, seed: int = 0) -> list[bytes]:
    """`n` PNG files of 600-1000 px (MVTec-like sizes): smooth shapes plus sensor-like noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = (int(v) for v in rng.integers(600, 1001, 2))
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = 128 + 60 * np.sin(rng.uniform(3, 12) * xx + rng.uniform(3, 12) * yy)
        image = base[..., None] + rng.normal(0, 6, (h, w, 3)) + rng.uniform(-30, 30, 3)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def decode(data: bytes) -> np.ndarray:
    """Encoded image bytes -> `[H, W, 3]` uint8, as grad_jax reads files."""
    return images.to_rgb8(layout.open_image(data, "<bytes>"))


def summarise_ms(times: Sequence[float]) -> dict[str, float]:
    t = np.asarray(times, np.float64)
    return {
        "p50_ms": float(np.percentile(t, 50)),
        "p95_ms": float(np.percentile(t, 95)),
        "mean_ms": float(t.mean()),
        "samples": int(t.size),
    }


def export_untrained(variables: ModelVariables, config, out: str) -> str:
    """Export `variables` (e.g. random weights) as `grad_jax.export` would a run, for the cpu;
    returns `out`."""
    export.write_model_folder(TrainedModel(config, variables, 0, {}), out, ("cpu",))
    return out


def _peak_memory() -> dict[str, float]:
    out = {"host_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001
        stats = {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_gb"] = stats["peak_bytes_in_use"] / 2**30
    return out


def _latency_part(variables: ModelVariables, config, latency_images: int) -> dict[str, Any]:
    """Batch-1 latency, encoded file -> decision, of `Predictor` and of the exported model."""
    files = sample_files(latency_images)
    predictor = Predictor(variables, config, batch_size=1)
    with tempfile.TemporaryDirectory() as tmp:
        exported = exported_model.load_model(export_untrained(variables, config, tmp), batch_size=1)
    cases = {"predictor": predictor, "exported": exported}
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for m in cases.values():
        m.predict([decode(files[0])])  # compile
    for _ in range(2):  # alternate, so drifting load hits both alike
        for name, m in cases.items():
            for data in files:
                t = time.perf_counter()
                m.predict([decode(data)])
                samples[name].append((time.perf_counter() - t) * 1e3)
    return {
        "what": "one encoded PNG (600-1000 px) -> decode, resize, predict, decision",
        **{k: summarise_ms(v) for k, v in samples.items()},
    }


def _infer_part(variables: ModelVariables, config, mesh, images: np.ndarray, steps: int) -> dict:
    """Inference images/s of the jitted predict function on `images` `[B, H, W, 3]` uint8."""
    batch = images.shape[0]
    predict = device_program.make_predict_fn(variables, config, mesh)
    seconds = time_call(lambda: predict(images), steps)
    result = {"infer_images_per_s": batch / seconds}

    def program(backbone, params, stats, x):
        m = variables.merge(backbone, params, stats)
        return m(x).anomaly_map

    flops = _flops(
        jax.jit(program),
        variables.backbone,
        variables.params,
        variables.batch_stats,
        jnp.asarray(images),
    )
    if flops:
        result["flops_per_image"] = flops / batch
        result["infer_flops_per_s"] = flops / seconds
    return result


def _train_part(
    variables: ModelVariables, config, mesh, images: np.ndarray, steps: int, cached: bool, rng
) -> dict:
    """Training images/s (and FLOPs) of one step from `images` or from cached features (drawn
    from `rng`)."""
    batch = images.shape[0]
    part = "train_cached" if cached else "train"
    tx, _ = make_optimizer(config.train, 100, variables.params)
    state = sharding.replicate(TrainState.create(variables.params, variables.batch_stats, tx), mesh)
    backbone = sharding.replicate(variables.backbone, mesh)
    step = loop.make_train_step(variables, tx, mesh, cached, config.seed, config.model.precision)
    if cached:
        shapes = feature_cache.feature_shapes(variables, config)
        local = {f"feature_{i}": rng.random((batch,) + s, np.float32) for i, s in enumerate(shapes)}
    else:
        local = {"image": images}
    batch_arrays = sharding.global_batch(local, mesh)
    holder = {"state": state}

    def one_step():
        holder["state"], metrics = step(holder["state"], backbone, batch_arrays)
        jax.block_until_ready(metrics["loss"])

    seconds = time_call(one_step, steps)
    result = {f"{part}_images_per_s": batch / seconds}
    flops = _flops(step, holder["state"], backbone, batch_arrays)
    if flops:
        result[f"{part}_flops_per_image"] = flops / batch
        result[f"{part}_flops_per_s"] = flops / seconds
    return result


def run_benchmark(
    config, batch: int, steps: int, pretrained: bool, parts, latency_images: int = 40
) -> dict:
    """The benchmark's figures (see the module docstring) for `config` at global `batch`."""
    config = config.copy_and_resolve_references()
    if tiling_on(config):  # the model sees tiles
        with config.ignore_type():
            config.data.image_size = (config.data.tile.size, config.data.tile.size)
    config.model.random_backbone = not pretrained
    config.model.kind = "grad"  # GRAD is what is timed; random weights hold no kNN bank
    config.eval.batch_size = batch
    sharding.check_batch_size(batch, "--batch")
    model = run_folder.create_model(config)
    variables = ModelVariables.from_model(model)
    del model
    mesh = sharding.make_mesh()
    h, w = config.data.image_size
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, h, w, 3), dtype=np.uint8)
    result: dict = {
        "config_backbone": config.model.backbone,
        "ch_exp": config.model.ch_exp,
        "dtype": config.model.dtype,
        "image_size": [h, w],
        "batch": batch,
        "random_weights": not pretrained,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        **cpu_info(),
        "jax_version": jax.__version__,
    }
    if "latency" in parts:
        result["latency_batch1"] = _latency_part(variables, config, latency_images)
    if "infer" in parts:
        result.update(_infer_part(variables, config, mesh, images, steps))
    for part, cached in (("train", False), ("train_cached", True)):
        if part in parts:
            result.update(_train_part(variables, config, mesh, images, steps, cached, rng))
    result.update(_peak_memory())
    return result


def benchmark_command(values: flags.FlagValues, args: list[str]) -> int:
    """Run the benchmark; print its JSON (and write it to --out)."""
    result = run_benchmark(
        values.config,
        values.batch,
        values.steps,
        values.pretrained,
        values.parts,
        values.latency_images,
    )
    text = json.dumps(result, indent=1, sort_keys=True)
    print(text)
    if values.out:
        with open(values.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return cli.EXIT_OK


def main(argv: Sequence[str]) -> int:
    """The command line (`argv[0]` is the program name); returns the exit status."""
    return cli.run_command(
        argv, __doc__, define_flags, benchmark_command, config="configs/unified.py"
    )


def run() -> None:
    """Console entry point: `python -m grad_jax.benchmark`."""
    sys.exit(main(sys.argv))


if __name__ == "__main__":
    run()
