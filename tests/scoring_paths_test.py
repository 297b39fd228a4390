"""One scorer, every way of running a model: the matrix {plain, tiled, non-square, unified with two
classes} x {Predictor, exported model, service (run folder and exported), predict command (run
folder and exported)} on the same images of several sizes and modes.

Every path must give the same classes, thresholds and decisions as `Predictor`, scores within
float32 rounding, and maps of the same shape and values. Adding a way of running a model means
adding a column (`PATHS`); adding a data feature means adding a row (`MODELS`).

The models are tiny random-weight models written as run folders (no training: what is compared is
what happens around the program), with per-class thresholds set between the images' own scores so
that both decisions occur, and (unified) class centres from each class's images.
"""

from __future__ import annotations

import csv
import pathlib

import numpy as np
import pytest
from grad_jax.configs import tiny
from PIL import Image

from grad_jax import export, predict
from grad_jax.data.images import read_image
from grad_jax.inference import exported_model
from grad_jax.inference.loader import load_scorer
from grad_jax.inference.predictor import Predictor
from grad_jax.models.model import ModelVariables
from grad_jax.runs import checkpointing, run_folder
from grad_jax.runs.train_state import TrainState
from grad_jax.training.optim import make_optimizer

BATCH = 3  # images per call: the 7 images take three calls, the last one padded


def _config(name: str):
    config = tiny.get_config()
    config.eval.smooth_size, config.eval.score_pool = 5, 8
    if name in ("nonsquare", "knn"):
        config.data.image_size = (48, 80)  # (height, width)
    elif name in ("tiled", "grad+knn"):
        config.data.image_size = (32, 32)  # the tile
        config.data.tile.size, config.data.tile.overlap, config.data.tile.scale = 32, 8, 0.5
    if name in ("knn", "grad+knn"):
        config.model.kind = name
    return config


#: The rows: a run folder's model, and the classes of its images.
MODELS = {
    "plain": ("part",),
    "tiled": ("part",),
    "nonsquare": ("part",),
    "unified": ("stripes", "blobs"),
    "knn": ("part",),  # the nearest-neighbour kind, non-square
    "grad+knn": ("part",),  # both maps standardised and averaged, tiled
}


def _image(kind: str, seed: int, hw: tuple[int, int]) -> np.ndarray:
    """`[H, W, 3]` uint8: stripes or blobs with a seeded bright defect in some of them."""
    rng = np.random.default_rng(seed)
    h, w = hw
    y, x = np.mgrid[0:h, 0:w]
    if kind == "blobs":
        base = 128 + 60 * np.sin(x / 5.0) * np.cos(y / 7.0)
    else:
        base = 128 + 70 * np.sign(np.sin(x / 3.0 + seed))
    image = np.stack([base, base * 0.9, base * 0.8], -1) + rng.normal(0, 8, (h, w, 3))
    if seed % 2:  # a defect
        cy, cx = rng.integers(h // 4, 3 * h // 4), rng.integers(w // 4, 3 * w // 4)
        image[cy - 4 : cy + 4, cx - 4 : cx + 4] = 255
    return np.clip(image, 0, 255).astype(np.uint8)


def _write_images(folder: pathlib.Path, classes) -> list[pathlib.Path]:
    """Seven files of several sizes and modes: RGB, gray and RGBA PNG, 16-bit gray PNG, JPEG,
    BMP and a palette PNG, alternating between the classes."""
    folder.mkdir(parents=True)
    specs = [
        ("rgb.png", (64, 64), "RGB", "PNG"),
        ("gray.png", (70, 100), "L", "PNG"),
        ("rgba.png", (53, 37), "RGBA", "PNG"),
        ("deep.png", (90, 120), "I;16", "PNG"),
        ("photo.jpg", (96, 72), "RGB", "JPEG"),
        ("wide.bmp", (40, 130), "RGB", "BMP"),
        ("palette.png", (66, 66), "P", "PNG"),
    ]
    paths = []
    for i, (name, hw, mode, fmt) in enumerate(specs):
        rgb = _image(classes[i % len(classes)], i, hw)
        if mode == "RGB":
            image = Image.fromarray(rgb)
        elif mode == "L":
            image = Image.fromarray(rgb).convert("L")
        elif mode == "RGBA":
            alpha = np.full((*hw, 1), 200, np.uint8)
            image = Image.fromarray(np.concatenate([rgb, alpha], -1), "RGBA")
        elif mode == "I;16":
            gray = np.asarray(Image.fromarray(rgb).convert("L"), np.uint16) * 257
            image = Image.fromarray(gray)
        else:
            image = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=32)
        path = folder / name
        image.save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        paths.append(path)
    return paths


def _make_run(workdir: pathlib.Path, config, classes, images: list[np.ndarray]) -> None:
    """A run folder for a random-weight model with thresholds between its images' scores and
    (several classes) class centres from each class's images."""
    model = run_folder.create_model(config)
    variables = ModelVariables.from_model(model)
    tx, _ = make_optimizer(config.train, 1, variables.params)
    state = TrainState.create(variables.params, variables.batch_stats, tx)
    labels = [i % len(classes) for i in range(len(images))]
    knn_meta = {}
    if config.model.kind != "grad":
        variables, knn_meta = _with_bank(variables, config, images)
    meta0 = {"categories": list(classes), **knn_meta}
    bare = Predictor(variables, config, batch_size=BATCH, meta=meta0)
    first = bare.predict(images)
    scores = np.array([p.score for p in first])
    prepared = [bare.prepare(im) for im in images]
    chunks = [prepared[i : i + BATCH] for i in range(0, len(prepared), BATCH)]
    pooled = np.stack([s.pooled for chunk in chunks for s in bare.score_prepared(chunk)])
    per_category, normal = {}, {}
    for c, name in enumerate(classes):
        mine = np.sort(scores[[i for i, k in enumerate(labels) if k == c]])
        # Halfway between two of the class's scores: both decisions occur, none is a tie.
        per_category[name] = float((mine[len(mine) // 2 - 1] + mine[len(mine) // 2]) / 2)
        normal[name] = sorted(float(s) for s in mine[:2])
    meta = {
        **meta0,
        "threshold": {
            "image_score": float(np.median(scores)) + 1e-3,
            "quantile": 0.99,
            "num_images": len(images),
            "per_category": per_category,
            "normal_scores": normal,
            "source": "set by the test between the images' scores",
        },
    }
    if len(classes) > 1:
        centres = [pooled[[k == c for k in labels]].mean(0).tolist() for c in range(len(classes))]
        meta["class_centres"] = {"names": list(classes), "centres": centres}
    run_folder.write_config(config, str(workdir))
    ckpt = checkpointing.Checkpoints(str(workdir))
    meta = {"step": 1, "final": True, **meta}
    ckpt.save(1, state, variables.backbone, config, meta, bank=variables.bank)
    ckpt.close()


def _with_bank(variables, config, images):
    """The model with a memory bank of half the patch features of its images mirrored (at the
    model input size: distances well above float32 rounding), and the meta entry of its map
    statistics (over the images themselves)."""
    import jax

    from grad_jax.data.images import resize_image
    from grad_jax.inference import device_program
    from grad_jax.models import knn
    from grad_jax.training import calibration, knn_bank

    x = np.stack([resize_image(im, config.data.image_size) for im in images])
    extract = jax.jit(lambda b, im: variables.merge(backbone=b).extract(im))
    mirrored = np.ascontiguousarray(x[:, ::-1, ::-1])
    stages = extract(variables.backbone, mirrored)
    patches = knn_bank.patch_fn(variables, 3)(variables.backbone, stages)
    bank, _ = knn.build_memory_bank(patches, 0.5, key=jax.random.key(0))
    variables = variables.replace(bank=np.asarray(bank))
    out = device_program.make_predict_fn(variables, config, all_kinds=True)(x)
    maps = [{k: v[i] for k, v in out.items() if k.startswith("raw_")} for i in range(len(x))]
    return variables, {"knn": {"map_stats": calibration.map_statistics(maps)}}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request, tmp_path_factory):
    """(name, run folder, exported folder, image paths, Predictor's results)."""
    name = request.param
    classes = MODELS[name]
    base = tmp_path_factory.mktemp(name)
    paths = _write_images(base / "images", classes)
    config = _config(name)
    _make_run(base / "run", config, classes, [read_image(p) for p in paths])
    export.export_workdir(str(base / "run"), str(base / "model"), platforms=("cpu",))
    predictor = Predictor.from_workdir(base / "run", batch_size=BATCH)
    # The reference: Predictor on the images as Pillow gives them (2-D gray, 16-bit, RGBA arrays,
    # the palette image itself), not on the files' RGB conversion the other paths start from.
    expected = predictor.predict([_as_given(p) for p in paths])
    return name, base, paths, predictor, expected


def _service(model_or_run: str):
    def run(base, paths):
        from fastapi.testclient import TestClient

        from grad_jax.serving import service, uploads

        if model_or_run == "model":
            scorer = load_scorer(model_dir=str(base / "model"), batch_size=BATCH)
        else:
            scorer = load_scorer(workdir=str(base / "run"), batch_size=BATCH)
        files = [("file", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]
        with TestClient(service.create_app(scorer, warm_up=False)) as client:
            r = client.post("/v1/predict", files=files, data={"raw_map": "1"})
        assert r.status_code == 200, r.text
        return [
            (
                x["score"],
                x["category"],
                x["threshold"],
                x["decision"],
                uploads.decode_map(x["raw_map"]),
            )
            for x in r.json()["results"]
        ]

    return run


def _command(model_or_run: str):
    def run(base, paths):
        out = base / f"out_{model_or_run}"
        source = (
            f"--model={base / 'model'}" if model_or_run == "model" else f"--workdir={base / 'run'}"
        )
        argv = ["predict", source, f"--out={out}", f"--batch_size={BATCH}", "--noprogress"]
        assert predict.main(argv + [str(p) for p in paths]) == 0
        with open(out / "scores.csv", newline="", encoding="utf-8") as f:
            rows = {r["file"]: r for r in csv.DictReader(f)}
        with np.load(out / "maps.npz") as maps:
            return [
                (
                    float(rows[p.name]["score"]),
                    rows[p.name]["category"] or None,
                    float(rows[p.name]["threshold"]) if rows[p.name]["threshold"] else None,
                    rows[p.name]["decision"] or None,
                    maps[p.name],
                )
                for p in paths
            ]

    return run


def _in_memory(load):
    def run(base, paths):
        scorer = load(base)
        return [
            (p.score, p.category, p.threshold, _decision(p.is_anomalous), p.anomaly_map)
            for p in scorer.predict([read_image(path) for path in paths])
        ]

    return run


def _decision(value):
    return None if value is None else ("anomalous" if value else "normal")


#: The columns: how a model is run. Each gives (score, class, threshold, decision, raw map).
PATHS = {
    "predictor on files": _in_memory(
        lambda base: Predictor.from_workdir(base / "run", batch_size=BATCH)
    ),
    "exported model": _in_memory(lambda base: exported_model.load_model(base / "model", BATCH)),
    "service, run folder": _service("run"),
    "service, exported": _service("model"),
    "predict command, run folder": _command("run"),
    "predict command, exported": _command("model"),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_every_path_gives_the_predictor_s_results(model, path):
    name, base, paths, predictor, expected = model
    got = PATHS[path](base, paths)
    assert len(got) == len(expected)
    decisions = {"anomalous": 0, "normal": 0}
    for file, want, (score, category, threshold, decision, raw) in zip(
        paths, expected, got, strict=True
    ):
        where = f"{name} / {path} / {file.name}"
        assert category == want.category, where
        assert threshold == pytest.approx(want.threshold, rel=1e-6), where
        assert decision == _decision(want.is_anomalous), where
        assert score == pytest.approx(want.score, rel=2e-5, abs=1e-6), where
        assert raw.shape == want.anomaly_map.shape, where
        scale = float(np.abs(want.anomaly_map).max()) or 1.0
        np.testing.assert_allclose(raw, want.anomaly_map, atol=5e-5 * scale, err_msg=where)
        decisions[decision] += 1
    assert min(decisions.values()) >= 1, decisions  # the thresholds split the images


def test_the_rows_are_what_they_say(model):
    """Guards the matrix itself: the tiled model scores stitched maps at each image's size, the
    non-square one maps at (48, 80), the unified one recognises both classes."""
    name, base, paths, predictor, expected = model
    sizes = [Image.open(p).size[::-1] for p in paths]
    if name in ("tiled", "grad+knn"):
        assert predictor.tiled and exported_model.load_model(base / "model").tiled
        assert [p.anomaly_map.shape for p in expected] == sizes
    elif name in ("nonsquare", "knn"):
        assert {p.anomaly_map.shape for p in expected} == {(48, 80)}
    elif name == "unified":
        assert [p.category for p in expected] == [MODELS[name][i % 2] for i in range(len(paths))]
        assert {p.category_source for p in expected} == {"recognised"}
    else:
        assert {p.anomaly_map.shape for p in expected} == {(64, 64)}


def test_the_exported_tiled_program_takes_tiles(model):
    name, base, *_ = model
    meta = exported_model.load_model(base / "model").meta
    assert meta["model_kind"] == _config(name).model.kind
    if name in ("tiled", "grad+knn"):
        assert meta["input"]["image_size"] == [32, 32]
        assert meta["scoring"]["tile_size"] == 32 and meta["scoring"]["tile_scale"] == 0.5
    else:
        assert meta["scoring"]["tile_size"] == 0
        assert meta["input"]["image_size"] == list(_config(name).data.image_size)


def _as_given(path: pathlib.Path):
    with Image.open(path) as image:
        return image.copy() if image.mode == "P" else np.asarray(image)
