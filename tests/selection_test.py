"""Label-free recipe selection: synthetic defects, the choice, the test split left unread."""

import inspect
import json
import pathlib
import re
import shutil

import jax
import numpy as np
import pytest
from grad_jax.configs import tiny

from grad_jax import errors
from grad_jax.data import input_pipeline
from grad_jax.data import synthetic_defects as sd
from grad_jax.errors import SelectionError
from grad_jax.evaluation import evaluate
from grad_jax.inference import device_program
from grad_jax.models.model import ModelVariables, build_model
from grad_jax.runs import checkpointing, run_folder
from grad_jax.runs.train_state import TrainState
from grad_jax.selection import budget, probes, select, validation
from grad_jax.selection import candidates as cands
from grad_jax.training import feature_cache, knn_bank, loop, run_records
from grad_jax.training.optim import make_optimizer
from tests.conftest import tiny_category
from tests.synthetic_defects_test import EASY, texture_std


@pytest.mark.parametrize("kind", sd.KINDS)
def test_defect_changes_exactly_its_mask(kind):
    rng = np.random.default_rng(0)
    base = (sd.smooth_noise((96, 128), 5, rng) * 80 + 90).astype(np.uint8)
    image = np.repeat(base[..., None], 3, axis=-1)
    donor = np.full((70, 50, 3), 30, np.uint8)
    for seed in range(5):
        out, mask = sd.make_defect(image, donor, kind, np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == np.uint8
        assert mask.shape == (96, 128) and set(np.unique(mask)) <= {0, 1}
        changed = np.any(out != image, axis=-1)
        assert not np.any(changed & (mask == 0)), "pixels changed outside the mask"
        # ... and the mask is no wider than the change: only a noise texture may, by chance,
        # put back a pixel's own value (a mask one pixel too wide leaves 4-17% unchanged).
        assert 1.0 - changed[mask == 1].mean() <= 0.025, "mask pixels left unchanged"
        inside = np.abs(out.astype(float) - image)[mask == 1].mean()
        # easy kinds: 12 grey levels; the texture kinds: 0.75 local std, at least 3 levels
        need = 12.0 if kind in EASY else max(0.75 * texture_std(image, mask), 3.0)
        assert mask.sum() > 0 and inside >= need
    again = sd.make_defect(image, donor, kind, np.random.default_rng(4))
    assert np.array_equal(again[0], out) and np.array_equal(again[1], mask)


def test_parse_candidates():
    layers = (3, 4)
    assert cands.parse_candidate("lite1@224", layers) == cands.Candidate(
        "efficientnet-lite1", (224, 224), (3, 4)
    )
    c = cands.parse_candidate("efficientnet-lite0@288x224:2-3", layers)
    assert c == cands.Candidate("efficientnet-lite0", (288, 224), (2, 3))
    assert c.name == "lite0@288x224:2-3"
    with pytest.raises(SelectionError, match="BACKBONE@SIZE"):
        cands.parse_candidate("lite1-224", layers)
    config = tiny.get_config()
    config.select = "auto"
    config.selection.candidates = "lite0@64,lite1@96"
    names = [c.name for c in cands.candidates(config)]
    assert names == ["lite0@64:3-4", "lite1@96:3-4"]  # the config's own recipe first, once


_FIGURE_KEYS = ("image_auroc", "pixel_auroc", "pixel_aupro", "figure")


def _fake_probe(figures, seconds_per_epoch, calls=None):
    """probe() replaced by recorded figures: name -> figure; (candidate, source, val) of each
    call go to `calls`. It takes no time on the clock."""

    def probe(candidate, config, source, val, shared, log_dir, deadline=None):
        if calls is not None:
            calls.append((candidate.name, source, val))
        figure = figures[candidate.name]
        record = {
            "name": candidate.name,
            "backbone": candidate.backbone,
            "image_size": list(candidate.image_size),
            "out_layers": list(candidate.out_layers),
            "probe_epochs": config.selection.probe_epochs,
            "curve": [{"epoch": 1, **dict.fromkeys(_FIGURE_KEYS, figure)}],
            "image_auroc": figure,
            "pixel_auroc": figure,
            "pixel_aupro": figure,
            "figure": figure,
            "seconds_per_epoch": seconds_per_epoch.get(candidate.name, 0.0),
            "cache_seconds": 0.0,
            "val_seconds": 0.0,
            "seconds": 0.0,
            "steps_per_epoch": 1,
        }
        return probes.Probe(candidate, record)

    return probe


class _FrozenClock:
    """The `time` module of select and budget in a test: the clock does not move, so nothing
    depends on how fast this machine builds the validation set."""

    def time(self):
        return 5000.0


@pytest.fixture(scope="module")
def category(tmp_path_factory):
    base = tmp_path_factory.mktemp("selection_data")
    return tiny_category(base / "data", num_train=16, num_test_good=3, num_test_defect=2)


def _config(root, data_dir, candidates="lite0@96"):
    config = tiny.get_config()
    config.data.root = str(root)
    config.data.data_dir = str(data_dir)
    config.train.epochs = 2
    config.threshold.holdout_fraction = 0.25
    config.select = "auto"
    config.selection.candidates = candidates
    config.selection.probe_epochs = 1
    config.selection.eval_epochs = ()
    return config


def test_the_best_figure_wins_within_budget(category, tmp_path, monkeypatch):
    monkeypatch.setattr(select, "time", _FrozenClock())
    monkeypatch.setattr(budget, "time", _FrozenClock())
    config = _config(category, tmp_path / "tfds", "lite0@96,lite0@128,lite1@64")
    config.selection.probe_epochs = 1
    figures = {"lite0@64:3-4": 0.6, "lite0@96:3-4": 0.8, "lite0@128:3-4": 0.7, "lite1@64:3-4": 0.5}
    calls = []
    monkeypatch.setattr(probes, "probe", _fake_probe(figures, {}, calls))
    record = select.select(config, str(tmp_path / "run"))
    assert record["winner"] == "lite0@96:3-4"
    assert [c["name"] for c in record["candidates"]] == list(figures)
    on_disk = json.loads((tmp_path / "run" / run_folder.SELECTION_FILE).read_text())
    assert on_disk["winner"] == "lite0@96:3-4" and not on_disk["reused_probe"]

    # The probes train on the training images the full run trains on, and are scored on the
    # other (held-out) images as they are, plus 2 defects in each.
    folder = validation.TrainFolder(category)
    shells = [input_pipeline.CategoryData("hex_nut", folder, None)]
    train, held = input_pipeline.split_holdout(shells, 0.25, config.seed)
    assert len(held) == 4 and not set(train) & set(held)
    for _, source, val in calls:
        assert source.items == train and source.masks is False
        assert val.kinds == [["normal"] * 4 + list(sd.KINDS)]  # 8 defects: each kind once
        for image, it in zip(val.images[0][:4], held, strict=True):
            assert np.array_equal(image, folder.load(it.index))

    # A better candidate whose full run cannot fit in the budget is not chosen: lite0@128 costs
    # 4x the config's recipe per epoch. lite1@64 costs the same as the recipe; its probe was
    # merely slowed by load, which must not count against it. With the clock stopped, 60 s
    # are left: at 10 s an epoch (the fastest rate), 2 epochs of overhead leave 4 more epochs
    # for the recipe and lite1@64 (2 in all, the configured number), none for lite0@96 (22.5 s,
    # overhead 45 s) or lite0@128 (40 s): 1 epoch, below the floor of 0.8 x 2.
    config.selection.budget_minutes = 1.0
    times = {
        "lite0@64:3-4": 10.0,
        "lite0@96:3-4": 22.5,
        "lite0@128:3-4": 40.0,
        "lite1@64:3-4": 99.0,
    }
    figures = {"lite0@64:3-4": 0.6, "lite0@96:3-4": 0.5, "lite0@128:3-4": 0.8, "lite1@64:3-4": 0.7}
    monkeypatch.setattr(probes, "probe", _fake_probe(figures, times))
    record = select.select(config, str(tmp_path / "run2"))
    by_name = {c["name"]: c for c in record["candidates"]}
    assert [c["affordable_epochs"] for c in record["candidates"]] == [2, 1, 1, 2]
    assert [c["fits_budget"] for c in record["candidates"]] == [True, False, False, True]
    assert by_name["lite1@64:3-4"]["seconds_per_epoch_estimate"] == pytest.approx(10.0)
    assert record["winner"] == "lite1@64:3-4"
    assert record["final_epochs"] == 2 and record["selection_seconds"] == 0.0


def _hide_test_split(root: pathlib.Path, stash: pathlib.Path) -> None:
    """Move test/ and ground_truth/ away and leave decoys whose every image is garbage."""
    for name in ("test", "ground_truth"):
        shutil.move(str(root / name), str(stash / name))
        for path in (stash / name).rglob("*.png"):
            decoy = root / path.relative_to(stash)
            decoy.parent.mkdir(parents=True, exist_ok=True)
            decoy.write_bytes(b"not an image: the test split was read during selection")


def _restore_test_split(root: pathlib.Path, stash: pathlib.Path) -> None:
    for name in ("test", "ground_truth"):
        shutil.rmtree(root / name)
        shutil.move(str(stash / name), str(root / name))


def test_selection_never_reads_the_test_split(category, tmp_path, monkeypatch):
    root = tmp_path / "data" / "hex_nut"
    shutil.copytree(category, root)
    stash = tmp_path / "stash"
    stash.mkdir()
    _hide_test_split(root, stash)

    def no_dataset(config):
        raise AssertionError("the dataset (with its test split) was opened during selection")

    real_open = input_pipeline.open_categories
    monkeypatch.setattr(input_pipeline, "open_categories", no_dataset)
    real_train = loop.train_and_evaluate
    phases = []

    def final_run(config, workdir, extra_info=None):
        # Selection is over: the test split comes back for the final run and evaluation.
        phases.append(extra_info["selection"]["winner"])
        _restore_test_split(root, stash)
        monkeypatch.setattr(input_pipeline, "open_categories", real_open)
        return real_train(config, workdir, extra_info)

    monkeypatch.setattr(loop, "train_and_evaluate", final_run)
    workdir = tmp_path / "run"
    values = select.select_and_train(_config(root, tmp_path / "tfds"), str(workdir))

    assert len(phases) == 1 and np.isfinite(values["mean/image_auroc"])
    saved = json.loads((workdir / "metrics.json").read_text())
    record = saved["selection"]
    assert [c["name"] for c in record["candidates"]] == ["lite0@64:3-4", "lite0@96:3-4"]
    assert record["winner"] == phases[0]
    kinds = ["grad", "knn", "grad+knn"]
    assert record["kinds"] == kinds and record["winner_kind"] in kinds
    for c in record["candidates"]:
        assert [p["epoch"] for p in c["curve"]] == [1]
        assert sorted(c["kinds"]) == sorted(kinds) and c["bank_seconds"] > 0
        for f in c["kinds"].values():
            assert 0.0 <= f["image_auroc"] <= 1.0 and 0.0 <= f["pixel_aupro"] <= 1.0
    # the winning pair, as the table shows it, is what the full run deploys
    best = max(
        (f["figure"], -i, -kinds.index(k), c["name"], k)
        for i, c in enumerate(record["candidates"])
        for k, f in c["kinds"].items()
    )
    assert (record["winner"], record["winner_kind"]) == best[3:]
    assert saved["kind"] == record["winner_kind"]
    assert run_folder.read_config(str(workdir)).model.kind == record["winner_kind"]
    # the report lists every pair, kinds in tie order (metrics.json sorts them), the winner's
    report = (workdir / "report" / "index.html").read_text()
    cells = re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td><td>1</td>", report)
    winner = (f"{record['winner']} (winner)", record["winner_kind"])
    assert [(n.replace(" (winner)", ""), k) for n, k in cells] == [
        (c["name"], k) for c in record["candidates"] for k in kinds
    ]
    assert [cell for cell in cells if "winner" in cell[0]] == [winner]
    assert record["validation"]["images"]["normal"] == 4  # 25% of 16 held out
    assert sum(record["validation"]["images"].values()) == 4 * 3  # 2 defects in each
    report = (workdir / "report" / "index.html").read_text()
    assert "Recipe selection" in report and record["winner"] in report


def _state_at(workdir, step, config, tmp_path):
    """The training state (a flat {path: array}) of checkpoint `step` of `workdir`, read from a
    copy whose later checkpoints are deleted (restore_training reads the newest)."""
    copy = tmp_path / f"{pathlib.Path(workdir).name}_at_{step}"
    shutil.copytree(workdir, copy)
    ckpt = checkpointing.Checkpoints(str(copy))
    assert step in ckpt.steps(), ckpt.steps()
    for later in [s for s in ckpt.steps() if s > step]:
        ckpt.delete(later)
    variables = ModelVariables.from_model(build_model(config))
    tx, _ = make_optimizer(config.train, 1, variables.params)
    template = TrainState.create(variables.params, variables.batch_stats, tx)
    try:
        got, state, _, _ = ckpt.restore_training(template, variables.backbone, config)
    finally:
        ckpt.close()
    assert got == step
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def test_winner_continues_from_its_probe(category, tmp_path):
    """The winner's probe is the start of its full run: its state after the probe is, bit for
    bit, the state of a plain run of the winning recipe after as many epochs (parameters, BN
    statistics, optimiser state), and selection + the rest of the epochs gives the plain run's
    model."""
    config = _config(category, tmp_path / "tfds", candidates="")  # only the config's recipe
    selected = tmp_path / "selected"
    select.select_and_train(config, str(selected))
    record = json.loads((selected / run_folder.SELECTION_FILE).read_text())
    assert record["winner"] == "lite0@64:3-4" and record["reused_probe"]

    plain = config.copy_and_resolve_references()
    plain.select = ""
    loop.train_and_evaluate(plain, str(tmp_path / "plain"))

    probe_step = record["candidates"][0]["steps_per_epoch"] * config.selection.probe_epochs
    got = _state_at(selected, probe_step, plain, tmp_path)  # written from the probe's state
    want = _state_at(tmp_path / "plain", probe_step, plain, tmp_path)  # the plain run's
    assert sorted(got) == sorted(want)
    assert any("opt_state" in k for k in want) and any("batch_stats" in k for k in want)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)

    a = run_folder.load_trained(str(selected)).variables
    b = run_folder.load_trained(str(tmp_path / "plain")).variables
    for key, value in b.params.items():
        np.testing.assert_allclose(np.asarray(a.params[key]), np.asarray(value), rtol=1e-5)
    losses = [json.loads(x)["loss"] for x in (selected / "metrics.jsonl").read_text().splitlines()]
    want = [
        json.loads(x)["loss"]
        for x in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()
    ]
    np.testing.assert_allclose(losses, want, rtol=1e-5)


@pytest.fixture(scope="module")
def spied_probe(category, tmp_path_factory):
    """The one real probe here (the config's own recipe, 2 epochs, also scored after the
    first, as every model kind), with spies on the loop's functions, on the memory bank and on
    every validation: (record, calls, validations, probe), where each validation is (val,
    config, kinds, [{'raw_grad', 'raw_knn'}] per predict call, what it returned) and probe the
    `probes.Probe` it gave."""
    tmp = tmp_path_factory.mktemp("spied_probe")
    config = _config(category, tmp / "tfds", candidates="")
    config.model.precision = "float32"  # not the default: a dropped setting shows
    config.selection.probe_epochs = 2
    config.selection.eval_epochs = (1,)
    calls = {"train_epochs": [], "make_train_step": [], "make_extract_fn": [], "build_bank": []}
    validations = []
    with pytest.MonkeyPatch.context() as mp:

        def spy(module, name, *keys):
            """Records the arguments `keys` of every call of `module.name`."""
            original = getattr(module, name)
            signature = inspect.signature(original)

            def wrapped(*args, **kwargs):
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                calls[name].append(tuple(bound.arguments[k] for k in keys))
                return original(*args, **kwargs)

            mp.setattr(module, name, wrapped)

        spy(loop, "train_epochs", "on_epoch_end", "cache")
        spy(loop, "make_train_step", "from_features", "precision")
        spy(feature_cache, "make_extract_fn", "precision")
        spy(knn_bank, "build_bank", "cache", "source")
        real_validate = probes.validate

        def recording_validate(predict, val, cfg, kinds):
            outputs = []

            def recording_predict(batch):
                out = predict(batch)
                outputs.append({k: np.asarray(out[k]) for k in ("raw_grad", "raw_knn")})
                return out

            result = real_validate(recording_predict, val, cfg, kinds)
            validations.append((val, cfg, kinds, outputs, result))
            return result

        mp.setattr(probes, "validate", recording_validate)
        kept = []
        real_probe = probes.probe
        mp.setattr(probes, "probe", lambda *a, **k: kept.append(real_probe(*a, **k)) or kept[-1])
        record = select.select(config, str(tmp / "run"))
    return record, calls, validations, kept


def test_probes_train_through_the_training_loop(spied_probe):
    """A probe builds no step or feature extractor of its own: it runs `loop.train_epochs`,
    whose step comes from `loop.make_train_step` with the config's `model.precision`, from a
    cache extracted at that precision (on a CPU the precision changes no number, so the
    bit-for-bit test above cannot see it). Its memory bank is built once, before training,
    from that same cache of the training images (never the held-out ones)."""
    record, calls, _, (kept,) = spied_probe
    assert [c["name"] for c in record["candidates"]] == ["lite0@64:3-4"]
    ((hook, cache),) = calls["train_epochs"]  # one probe, trained by the loop, with its hook
    assert hook is not None and cache is not None
    # Its step: from the cache, at the config's precision; the cache: at that precision too.
    assert calls["make_train_step"] == [(True, "float32")]
    assert calls["make_extract_fn"] == [("float32",)]
    ((features, source),) = calls["build_bank"]
    assert features is cache[0]  # the training cache's features, not a second extraction
    folder = validation.TrainFolder(pathlib.Path(record["config"]["data"]["root"]))
    shells = [input_pipeline.CategoryData("hex_nut", folder, None)]
    train, held = input_pipeline.split_holdout(shells, 0.25, 0)
    assert source.items == train and not set(source.items) & set(held)
    assert kept.bank is not None and kept.bank.shape[1] == 152  # Lite0 stages 3 + 4


def test_a_probes_figures_are_the_metrics_of_its_own_validation_maps(spied_probe):
    """The curve has one point per validation (epochs 1 and 2), each kind's figures the metrics
    computed here (numpy smoothing and scores, 'grad+knn' standardised by the statistics of the
    validation's normal images only, sklearn and the reference AUPRO) from the raw maps the
    probe's model gave on the synthetic validation; the probe's figures are those of its last
    epoch, its map statistics those of that epoch."""
    from tests.selection_validation_test import (
        reference_figures,
        reference_scores,
        reference_smooth,
    )

    record, _, validations, (kept,) = spied_probe
    (probe,) = record["candidates"]
    assert [p["epoch"] for p in probe["curve"]] == [1, 2] and len(validations) == 2
    for point, (val, cfg, kinds, outputs, result) in zip(probe["curve"], validations, strict=True):
        assert kinds == ("grad", "knn", "grad+knn")
        size = tuple(cfg.data.image_size)
        raw = {k: np.concatenate([o[k] for o in outputs]) for k in ("raw_grad", "raw_knn")}
        normal = np.array([k == "normal" for ks in val.kinds for k in ks])
        assert 0 < normal.sum() < len(normal) and raw["raw_grad"].shape[1:] == size
        stats = {
            k: (raw[f"raw_{k}"][normal].mean(dtype=np.float64), raw[f"raw_{k}"][normal].std())
            for k in ("grad", "knn")
        }
        maps = {"grad": raw["raw_grad"], "knn": raw["raw_knn"]}
        maps["grad+knn"] = sum((maps[k] - m) / sd_ for k, (m, sd_) in stats.items()) / 2
        for kind, kind_maps in maps.items():
            smoothed = reference_smooth(kind_maps, cfg.eval.smooth_size)
            scores = reference_scores(smoothed, cfg.eval.score_pool)
            per_category, start = [], 0
            for masks in val.masks:  # validate scores the categories in order, in batches
                gt = np.stack([input_pipeline.resize_mask(m, size) for m in masks])
                end = start + len(masks)
                per_category.append((scores[start:end], smoothed[start:end], gt))
                start = end
            assert start == len(scores)
            want = reference_figures(per_category)
            assert point["kinds"][kind] == pytest.approx(want, abs=1e-5), kind
            assert result["kinds"][kind] == pytest.approx(want, abs=1e-5), kind
        for k, (mean, std) in stats.items():
            assert result["map_stats"][k] == pytest.approx({"mean": mean, "std": std}, rel=1e-5)
    # the two epochs scored differently (the model was trained in between), and the last is the
    # model the probe returns (the state its full run continues from) with its memory bank
    first, last_outputs = validations[0][3], validations[1][3]
    assert not np.allclose(first[0]["raw_grad"], last_outputs[0]["raw_grad"])
    np.testing.assert_array_equal(first[0]["raw_knn"], last_outputs[0]["raw_knn"])  # no training
    val, cfg, *_ = validations[-1]
    variables = ModelVariables.from_model(build_model(cfg)).replace(
        backbone=kept.backbone, params=kept.state.params, batch_stats=kept.state.batch_stats,
        bank=kept.bank,
    )  # fmt: skip
    predict = device_program.make_predict_fn(variables, cfg, all_kinds=True)
    size = tuple(cfg.data.image_size)
    images = np.stack([input_pipeline.resize_image(x, size) for xs in val.images for x in xs])
    again = [predict(images[i : i + 4]) for i in range(0, len(images), 4)]
    for key in ("raw_grad", "raw_knn"):
        np.testing.assert_allclose(
            np.concatenate([o[key] for o in again]), np.concatenate([o[key] for o in last_outputs]),
            rtol=1e-5, atol=1e-6,
        )  # fmt: skip
    last = probe["curve"][-1]
    assert probe["kinds"] == last["kinds"]
    assert probe["map_stats"] == validations[-1][4]["map_stats"]
    for f in probe["kinds"].values():
        assert f["figure"] == pytest.approx(0.5 * (f["image_auroc"] + f["pixel_aupro"]))


def test_a_probe_stops_at_the_probing_deadline(category, tmp_path):
    """With a budget already spent, the loop's hook stops the config's own probe after its
    first epoch (scored there), the other candidates are skipped, and the winner's full run
    continues from that one epoch."""
    config = _config(category, tmp_path / "tfds", candidates="lite0@96")
    config.selection.probe_epochs = 2
    config.selection.budget_minutes = 1e-6  # the probing share ends before the first epoch does
    record = select.select(config, str(tmp_path / "run"))
    (probe,) = record["candidates"]
    assert probe["probe_epochs"] == 1 and [p["epoch"] for p in probe["curve"]] == [1]
    assert "stopped after 1 of 2 epochs" in probe["stopped_early"]
    assert [s["name"] for s in record["skipped"]] == ["lite0@96:3-4"]
    assert record["final_epochs"] == 1 and record["reused_probe"]
    steps = checkpointing.Checkpoints(str(tmp_path / "run"), read_only=True).steps()
    assert steps == [probe["steps_per_epoch"]]  # one epoch of the probe, continued
    assert "probe stopped after 1 epoch(s)" in select.table(record)


def test_an_interrupted_probe_saves_nothing_and_the_rerun_selects_again(
    category, tmp_path, monkeypatch
):
    """SIGINT/SIGTERM during a probe (the loop's stop request) raises Interrupted; the probe
    keeps no checkpoint and the selection is not finished, so a rerun starts it again."""

    class StopAtOnce(run_records.StopFlag):
        def requested(self):
            return True

    monkeypatch.setattr(loop, "StopFlag", StopAtOnce)
    workdir = tmp_path / "run"
    with pytest.raises(errors.Interrupted, match="probe lite0@64:3-4.*start it again"):
        select.select(_config(category, tmp_path / "tfds", candidates=""), str(workdir))
    assert not (workdir / "checkpoints").exists() or not any((workdir / "checkpoints").iterdir())
    assert run_folder.read_selection(str(workdir)) is None


def test_eval_mode_keeps_the_selection_and_the_report_renders_it(category, tmp_path, monkeypatch):
    """--mode=eval writes the selection into metrics.json and the report as training does: the
    report renders it from the record (a deleted index.html comes back with it)."""
    figures = {"lite0@64:3-4": 0.6, "lite0@96:3-4": 0.8}
    monkeypatch.setattr(probes, "probe", _fake_probe(figures, {}))
    workdir = tmp_path / "run"
    select.select_and_train(_config(category, tmp_path / "tfds"), str(workdir))
    on_disk = json.loads((workdir / run_folder.SELECTION_FILE).read_text())
    summary = {k: v for k, v in on_disk.items() if k != "config"}
    assert "config" in on_disk and summary["winner"] == "lite0@96:3-4"

    def section():
        page = (workdir / "report" / "index.html").read_text()
        found = re.findall(r'<section id="selection">.*?</section>', page, re.S)
        assert len(found) == 1, "no selection section in index.html"
        return found[0]

    trained = json.loads((workdir / "metrics.json").read_text())
    assert trained["selection"] == summary
    after_training = section()
    assert "lite0@96:3-4 (winner)" in after_training and "0.8000" in after_training
    (workdir / "report" / "index.html").unlink()
    evaluate.evaluate_workdir(str(workdir))
    evaluated = json.loads((workdir / "metrics.json").read_text())
    assert evaluated["selection"] == summary
    assert "checkpoint step" in evaluated["model"]  # written by --mode=eval
    assert section() == after_training
    manifest = json.loads((workdir / "report" / "report.json").read_text())
    assert manifest["selection"] == summary


def test_bad_selection_config_is_one_line(category, tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    cmd = [
        sys.executable, "-m", "grad_jax.main", "--config=configs/tiny.py",
        f"--config.data.root={category}", "--config.select=lite1-224",
        f"--workdir={tmp_path / 'run'}",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("grad_jax: error: config.select: cannot read candidate 'lite1-224'")
    assert "Traceback" not in done.stderr


def test_selection_refuses_tiling_with_one_line(category, tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    cmd = [
        sys.executable, "-m", "grad_jax.main", "--config=configs/tiny.py",
        f"--config.data.root={category}", "--config.select=auto",
        "--config.data.tile.size=64", f"--workdir={tmp_path / 'run'}",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "config.select does not combine with data.tile" in last
    assert "Traceback" not in done.stderr
