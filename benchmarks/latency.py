"""Batch-1 latency of grad_jax against PyTorch eager and onnxruntime, side by side in one run.

    python benchmarks/latency.py --config=configs/unified.py [--images=30] [--passes=2]
    python benchmarks/latency.py --config=configs/folder.py

One image at a time, as on an inspection line: from the encoded file's bytes to the image score
(decode + resize + predict, with the 21x21 smoothing and the 32x32 score pooling), on the same
PNG files (600-1000 px) and the same thread count (GRAD_JAX_BENCH_THREADS, default all cores),
measurements alternating between the contestants image by image so drifting load hits all
alike. Contestants:

- `grad_jax_exported`: `python -m grad_jax.export`'s model loaded with
  `grad_jax.inference.exported_model`;
- `grad_jax_predictor`: `grad_jax.Predictor` (batch_size=1);
- `torch_eager_official`: the PyTorch model of the parity tests (tests/torch_reference.py) run
  as the official code runs it, the whole EfficientNet (every block, conv head, classifier)
  with the unused part thrown away;
- `torch_eager`: the same model stopped at the last block used (what grad_jax computes);
- `onnxruntime`: that truncated model exported with `torch.onnx` and run by onnxruntime (its
  default graph optimisations), the usual way such a model is deployed.

With `--batch8` it also times batch-8 inference (prepared images) of the exported model,
Predictor, the truncated PyTorch model and onnxruntime. Random weights (time does not depend on
their values). Prints one JSON object naming the CPU model and its vector extensions.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from grad_jax.config import CONFIG_DIR, resolve_config_flags
from grad_jax.inference.predictor import Predictor
from grad_jax.models.model import ModelVariables
from grad_jax.runs import run_folder

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

config_flags.DEFINE_config_file("config", os.path.join(CONFIG_DIR, "unified.py"), "Config.")
flags.DEFINE_integer("images", 30, "Distinct image files per pass.")
flags.DEFINE_integer("passes", 2, "Passes over the images (all contestants per image).")
flags.DEFINE_bool("batch8", True, "Also time batch-8 inference.")
flags.DEFINE_integer("rounds", 3, "Batch-8: alternating rounds (median).")
flags.DEFINE_string("out", None, "Also write the JSON here.")
FLAGS = flags.FLAGS


def torch_predictor(config, torch, full: bool):
    """The PyTorch model + smoothing + score: normalised NCHW -> (raw, smoothed, score)."""
    import torch.nn.functional as F

    from benchmarks.side_by_side import build_torch

    model, spec = build_torch(config, torch)
    if hasattr(model.backbone, "set_swish"):
        model.backbone.set_swish(memory_efficient=False)  # plain ops (exportable to ONNX)
    model.eval()
    size, pool = config.eval.smooth_size, config.eval.score_pool

    class Scored(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            if full:  # the official code runs the whole backbone and discards the rest
                bb = self.model.backbone
                bb._fc(bb._avg_pooling(bb.extract_features(x)).flatten(1))
            raw = self.model(x)["anomaly_map"][:, None]
            smoothed = F.avg_pool2d(raw, size, 1, size // 2, count_include_pad=True)
            score = F.avg_pool2d(smoothed, pool, 1).amax(dim=(1, 2, 3))
            return raw[:, 0], smoothed[:, 0], score

    return Scored().eval(), spec


def main(argv) -> int:
    del argv
    import onnxruntime as ort
    import torch
    from PIL import Image

    from grad_jax.benchmark import cpu_info, decode, export_untrained, sample_files, summarise_ms
    from grad_jax.inference import exported_model

    threads = int(os.environ.get("GRAD_JAX_BENCH_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(threads)
    config = FLAGS.config.copy_and_resolve_references()
    config.model.random_backbone = True
    config.model.kind = "grad"  # PyTorch runs GRAD; random weights hold no kNN bank
    h, w = config.data.image_size
    files = sample_files(FLAGS.images)

    variables = ModelVariables.from_model(run_folder.create_model(config))
    predictor = Predictor(variables, config, batch_size=1)
    tmp = tempfile.mkdtemp()
    exported = exported_model.load_model(export_untrained(variables, config, tmp), batch_size=1)

    official, spec = torch_predictor(config, torch, full=True)
    truncated, _ = torch_predictor(config, torch, full=False)
    truncated.load_state_dict(official.state_dict())
    mean = np.asarray(spec.normalize[0], np.float32)
    std = np.asarray(spec.normalize[1], np.float32)

    def torch_input(data: bytes) -> np.ndarray:
        image = Image.fromarray(decode(data)).resize((w, h), Image.BILINEAR)
        x = (np.asarray(image, np.float32) - mean) / std
        return np.ascontiguousarray(x.transpose(2, 0, 1)[None])

    onnx_path = os.path.join(tmp, "model.onnx")
    example = torch.from_numpy(torch_input(files[0]))
    torch.onnx.export(
        truncated,
        (example,),
        onnx_path,
        input_names=["x"],
        output_names=["raw", "smoothed", "score"],
        dynamic_axes={"x": {0: "n"}, "raw": {0: "n"}, "smoothed": {0: "n"}, "score": {0: "n"}},
        dynamo=True,
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])

    def run_torch(module):
        def score(data: bytes) -> float:
            with torch.no_grad():
                return float(module(torch.from_numpy(torch_input(data)))[2][0])

        return score

    def run_ort(data: bytes) -> float:
        return float(session.run(["score"], {"x": torch_input(data)})[0][0])

    cases = {
        "grad_jax_exported": lambda d: exported.predict([decode(d)])[0].score,
        "grad_jax_predictor": lambda d: predictor.predict([decode(d)])[0].score,
        "torch_eager_official": run_torch(official),
        "torch_eager": run_torch(truncated),
        "onnxruntime": run_ort,
    }
    # the same computation everywhere: onnxruntime and eager agree; grad_jax has other weights
    check = {k: cases[k](files[0]) for k in ("torch_eager_official", "torch_eager", "onnxruntime")}
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():
        fn(files[1 % len(files)])  # warm up / compile
    for _ in range(FLAGS.passes):
        for data in files:
            for name, fn in cases.items():
                t = time.perf_counter()
                fn(data)
                samples[name].append((time.perf_counter() - t) * 1e3)
    latency = {k: summarise_ms(v) for k, v in samples.items()}
    p50 = {k: v["p50_ms"] for k, v in latency.items()}
    p95 = {k: v["p95_ms"] for k, v in latency.items()}
    result = {
        "what": "batch-1 latency: one encoded PNG (600-1000 px) -> decode, resize, predict, "
        "smoothing, score",
        "config_backbone": config.model.backbone,
        "ch_exp": config.model.ch_exp,
        "image_size": [h, w],
        "threads": threads,
        **cpu_info(),
        "torch_version": torch.__version__,
        "onnxruntime_version": ort.__version__,
        "latency_batch1": latency,
        "speedup_p50": {
            "exported_vs_torch_eager_official": p50["torch_eager_official"]
            / p50["grad_jax_exported"],
            "exported_vs_torch_eager": p50["torch_eager"] / p50["grad_jax_exported"],
            "exported_vs_onnxruntime": p50["onnxruntime"] / p50["grad_jax_exported"],
            "predictor_vs_onnxruntime": p50["onnxruntime"] / p50["grad_jax_predictor"],
        },
        "speedup_p95": {
            "exported_vs_torch_eager": p95["torch_eager"] / p95["grad_jax_exported"],
            "exported_vs_onnxruntime": p95["onnxruntime"] / p95["grad_jax_exported"],
        },
        "torch_onnx_scores_agree": abs(check["onnxruntime"] - check["torch_eager"])
        <= 1e-3 * max(1.0, abs(check["torch_eager"])),
        "random_weights": True,
    }
    if FLAGS.batch8:
        result["batch8"] = _batch8(exported, predictor, variables, config, truncated, session)
    text = json.dumps(result, indent=1)
    print(text)
    if FLAGS.out:
        pathlib.Path(FLAGS.out).write_text(text + "\n")
    return 0


def _batch8(exported, predictor, variables, config, truncated, session) -> dict:
    """Images/s at batch 8 on prepared (resized) images, alternating rounds, medians."""
    import torch

    from grad_jax.benchmark import time_call

    b = 8
    h, w = config.data.image_size
    images = np.random.default_rng(0).integers(0, 256, (b, h, w, 3), dtype=np.uint8)
    x = np.random.default_rng(1).normal(size=(b, 3, h, w)).astype(np.float32)
    exported.batch_size = b
    batched = Predictor(variables, config, batch_size=b)
    tx = torch.from_numpy(x)

    def torch_run():
        with torch.no_grad():
            truncated(tx)

    cases = {
        "grad_jax_exported": lambda: exported.run(images),
        "grad_jax_predictor": lambda: batched.program(images),
        "torch_eager": torch_run,
        "onnxruntime": lambda: session.run(["score"], {"x": x}),
    }
    for fn in cases.values():
        fn()
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(FLAGS.rounds):
        for k, fn in cases.items():
            time.sleep(1.0)
            samples[k].append(time_call(fn, 3, warm_up=False))
    ips = {k: b / float(np.median(v)) for k, v in samples.items()}
    return {
        "images_per_s": ips,
        "exported_vs_torch_eager": ips["grad_jax_exported"] / ips["torch_eager"],
        "predictor_vs_torch_eager": ips["grad_jax_predictor"] / ips["torch_eager"],
        "exported_vs_onnxruntime": ips["grad_jax_exported"] / ips["onnxruntime"],
    }


if __name__ == "__main__":
    app.run(main, argv=resolve_config_flags(sys.argv))
