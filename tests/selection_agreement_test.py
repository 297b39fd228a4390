"""benchmarks/selection_agreement.py: the rank agreement arithmetic (against scipy.stats and
cases by hand), and one tiny end-to-end run (the test split opened only after every probe)."""

import importlib.util
import json

import numpy as np
import pytest
from scipy import stats

from grad_jax.data import input_pipeline
from grad_jax.selection import select
from tests.conftest import ROOT, tiny_category


def _load():
    spec = importlib.util.spec_from_file_location(
        "selection_agreement", ROOT / "benchmarks" / "selection_agreement.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sa = _load()


def test_rank_correlations_by_hand():
    """x = 1 2 3 4, y = 1 3 2 4: one swapped pair. Spearman 1 - 6 x 2 / (4 x 15) = 0.8;
    Kendall: 6 pairs, 5 concordant, 1 discordant: 4 / 6."""
    assert sa.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert sa.kendall_tau_b([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    assert sa.spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    # ties share their mean rank: (1, 2.5, 2.5, 4)
    np.testing.assert_array_equal(sa.average_ranks([0.1, 0.5, 0.5, 0.9]), [1, 2.5, 2.5, 4])
    # tau-b with ties in x: pairs 6, tied in x 1, concordant 5, discordant 0: 5 / sqrt(5 x 6)
    assert sa.kendall_tau_b([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / np.sqrt(30))
    assert np.isnan(sa.spearman([0.5, 0.5, 0.5], [1, 2, 3]))  # a constant side: undefined
    assert np.isnan(sa.kendall_tau_b([1, 2, 3], [7, 7, 7]))


def test_rank_correlations_match_scipy_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(100):
        n = int(rng.integers(3, 10))
        x = rng.integers(0, 4, n) / 4  # many ties
        y = rng.integers(0, 5, n) / 5
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            continue
        assert sa.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
        assert sa.kendall_tau_b(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)


def _pairs(validation, test):
    names = [("lite0@224:3-4", k) for k in ("grad", "knn", "grad+knn")]
    names += [("lite1@224:3-4", k) for k in ("grad", "knn", "grad+knn")]
    return [
        {"recipe": r, "kind": k, "validation": {"figure": v}, "test": {"figure": t}}
        for (r, k), v, t in zip(names, validation, test, strict=False)
    ]


def test_agreement_by_hand():
    """Validation 0.5 0.9 0.7 0.6: selection's winner is lite0 knn (index 1). Test 0.6 0.7 0.8
    0.8: the best is 0.8, first at lite0 grad+knn; the winner loses 0.1 there."""
    pairs = _pairs([0.5, 0.9, 0.7, 0.6], [0.6, 0.7, 0.8, 0.8])
    got = sa.agreement(pairs, sa.first_best([p["validation"]["figure"] for p in pairs]))
    assert got["validation_winner"] == "lite0@224:3-4 knn"
    assert got["test_best"] == "lite0@224:3-4 grad+knn"
    assert got["winner_is_test_best"] is False
    assert got["test_loss"] == pytest.approx(0.1) and got["pairs"] == 4
    assert got["spearman"] == pytest.approx(stats.spearmanr([5, 9, 7, 6], [6, 7, 8, 8])[0])
    # a winner tied with the test best is a test winner: no loss
    tied = sa.agreement(_pairs([0.5, 0.4, 0.9], [0.8, 0.7, 0.8]), 2)
    assert tied["winner_is_test_best"] is True and tied["test_loss"] == 0.0
    assert tied["test_best"] == "lite0@224:3-4 grad"  # ties: the earlier pair
    assert sa.first_best([0.2, 0.7, 0.7]) == 1


def test_a_test_split_without_masks_is_ranked_by_image_auroc():
    nan = float("nan")
    values = {"image_auroc": 0.8, "pixel_auroc": nan, "pixel_aupro": nan, "figure": nan}
    assert sa._test_figures(values)["figure"] == 0.8
    values = {"image_auroc": 0.8, "pixel_auroc": 0.9, "pixel_aupro": 0.6, "figure": 0.7}
    assert sa._test_figures(values) == values  # with masks: the validation's figure


def test_a_tiny_run_probes_first_then_reads_the_test_split(tmp_path, monkeypatch, capsys):
    root = tiny_category(tmp_path / "data", num_train=12, num_test_good=3, num_test_defect=3)
    events = []
    real_probe_all, real_open = select.probe_all, input_pipeline.open_categories

    def probe_all(*args, **kwargs):
        events.append("probe")
        return real_probe_all(*args, **kwargs)

    def open_categories(config):
        events.append("test split")
        return real_open(config)

    monkeypatch.setattr(select, "probe_all", probe_all)
    monkeypatch.setattr(input_pipeline, "open_categories", open_categories)
    out = tmp_path / "out"
    argv = [
        "selection_agreement", "--config=configs/tiny.py", f"--out={out}", "--candidates=",
        "--probe_epochs=1", "--config.threshold.holdout_fraction=0.25",
        f"--config.data.data_dir={tmp_path / 'tfds'}", f"tiny={root}",
    ]  # fmt: skip
    assert sa.main(argv) == 0
    assert events == ["probe", "test split"]
    (result,) = json.loads((out / sa.RESULTS).read_text())
    assert result["kinds"] == ["grad", "knn", "grad+knn"] and result["probe_epochs"] == 1
    pairs = result["pairs"]
    assert [(p["recipe"], p["kind"]) for p in pairs] == [
        ("lite0@64:3-4", k) for k in ("grad", "knn", "grad+knn")
    ]
    # the validation figures are the probe's, as selection recorded them
    (probe,) = json.loads((out / "tiny" / "selection.json").read_text())["candidates"]
    assert [p["validation"] for p in pairs] == [probe["kinds"][p["kind"]] for p in pairs]
    for p in pairs:
        t = p["test"]
        assert 0.0 <= t["image_auroc"] <= 1.0 and 0.0 <= t["pixel_aupro"] <= 1.0
        assert t["figure"] == pytest.approx((t["image_auroc"] + t["pixel_aupro"]) / 2)
    val = [p["validation"]["figure"] for p in pairs]
    test = [p["test"]["figure"] for p in pairs]
    a = result["agreement"]
    assert a["validation_winner"] == f"lite0@64:3-4 {pairs[sa.first_best(val)]['kind']}"
    assert a["test_loss"] == pytest.approx(max(test) - test[sa.first_best(val)])
    want = stats.spearmanr(val, test).statistic
    assert (a["spearman"] is None and np.isnan(want)) or a["spearman"] == pytest.approx(want)
    assert "| tiny | 3 |" in capsys.readouterr().out
    # a rerun reads the finished dataset instead of probing again
    monkeypatch.setattr(select, "probe_all", None)
    assert sa.main(argv) == 0
    assert json.loads((out / sa.RESULTS).read_text()) == [result]
