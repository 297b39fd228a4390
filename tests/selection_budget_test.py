"""Recipe selection's arithmetic, by hand: candidates and their head cost, the probing share of
the budget, affordable epochs, the 80% floor, ties, the learning-rate step of a cut run, the
reuse of the winner's probe, and the order in which selection.json and the checkpoint are
written.

Time is a fake clock (`FakeClock`) put in place of the `time` module of `select`, `budget` and
`probes`, and probes are fakes that advance it: no expectation here depends on how fast the
machine is.
"""

import json
import re
import types

import pytest
from grad_jax.configs import tiny

from grad_jax.data import input_pipeline
from grad_jax.data import synthetic_defects as sd
from grad_jax.errors import SelectionError, UserError
from grad_jax.evaluation.report import selection as report_selection
from grad_jax.runs import run_folder
from grad_jax.selection import budget, probes, select, validation
from grad_jax.selection import candidates as cands
from grad_jax.selection.validation import ValidationSet
from grad_jax.training import loop

# The config's own recipe in the tiny config: lite0 at 64 px, stages 3 and 4, stride 8.
# EfficientNet-Lite0 (width 1.0) ends stage 3 with 40 channels and stage 4 with 112, so its head
# sees 8 x 8 positions x 152 channels.
C = 8 * 8 * (40 + 112)


class FakeClock:
    """Stands in for the `time` module: `time()` reads a number the test advances."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def time(self) -> float:
        return self.now

    monotonic = time

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    for module in (select, budget, probes):
        monkeypatch.setattr(module, "time", fake)
    return fake


def _config(candidates="", epochs=50, lr_step=40, probe_epochs=2, budget_minutes=0.0):
    config = tiny.get_config()
    config.select = candidates or ""
    config.selection.candidates = ""
    config.train.epochs = epochs
    config.train.lr_step_epochs = lr_step
    config.threshold.holdout_fraction = 0.25
    config.selection.probe_epochs = probe_epochs
    config.selection.eval_epochs = ()
    config.selection.budget_minutes = budget_minutes
    config.selection.max_share = 0.5
    return config


def _record(name, figure, seconds_per_epoch, probe_epochs=2, cache=0.0, val=0.0, kinds=None):
    """A probe's record; with `kinds` ({kind: figure}) the figures of each kind, else (as a
    record from before kinds competed) one figure at the top level, GRAD's."""
    c = cands.parse_candidate(name, (3, 4))
    if kinds is not None:
        return {
            **_record(name, figure, seconds_per_epoch, probe_epochs, cache, val),
            "kinds": {k: dict.fromkeys(cands.FIGURE_KEYS, f) for k, f in kinds.items()},
            "curve": [
                {
                    "epoch": probe_epochs,
                    "kinds": {k: dict.fromkeys(cands.FIGURE_KEYS, f) for k, f in kinds.items()},
                }
            ],
        }
    return {
        "name": c.name,
        "backbone": c.backbone,
        "image_size": list(c.image_size),
        "out_layers": list(c.out_layers),
        "probe_epochs": probe_epochs,
        "curve": [{"epoch": probe_epochs, "figure": figure}],
        "image_auroc": figure,
        "pixel_auroc": figure,
        "pixel_aupro": figure,
        "figure": figure,
        "seconds_per_epoch": seconds_per_epoch,
        "cache_seconds": cache,
        "val_seconds": val,
        "seconds": cache + val + probe_epochs * seconds_per_epoch,
        "steps_per_epoch": 3,
    }


def _probe(name, figure, seconds_per_epoch, **kw):
    record = _record(name, figure, seconds_per_epoch, **kw)
    return probes.Probe(cands.from_record(record), record)


# ---------------------------------------------------------------------------------------------
# Candidates
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, backbone, size, layers, name",
    [
        ("lite1@224", "efficientnet-lite1", (224, 224), (3, 4), "lite1@224:3-4"),
        ("efficientnet-lite0@288x224:2-3", "efficientnet-lite0", (288, 224), (2, 3),
         "lite0@288x224:2-3"),
        (" b4@380 ", "efficientnet-b4", (380, 380), (3, 4), "b4@380:3-4"),
        ("lite2@96x128:4", "efficientnet-lite2", (96, 128), (4,), "lite2@96x128:4"),
    ],
)  # fmt: skip
def test_a_candidate_is_read_height_first_with_the_configs_stages(
    text, backbone, size, layers, name
):
    c = cands.parse_candidate(text, (3, 4))
    assert (c.backbone, c.image_size, c.out_layers) == (backbone, size, layers)
    assert c.name == name
    assert cands.parse_candidate(c.name, (1, 2)) == c  # a name reads back as itself
    if ":" not in text:  # no stages given: the config's own
        assert cands.parse_candidate(text, (2, 5)).out_layers == (2, 5)


@pytest.mark.parametrize(
    "text, match",
    [
        ("lite1-224", "BACKBONE@SIZE"),
        ("lite1@", "BACKBONE@SIZE"),
        ("lite1@224x", "BACKBONE@SIZE"),
        ("lite1@224:3,4", "BACKBONE@SIZE"),
        ("resnet50@224", "BACKBONE@SIZE"),
        ("lite9@224", "unknown backbone"),
    ],
)
def test_an_unreadable_candidate_is_a_user_error_naming_the_key(text, match):
    with pytest.raises(SelectionError, match=match) as err:
        cands.parse_candidate(text, (3, 4))
    assert isinstance(err.value, UserError) and "config.select" in str(err.value)
    assert repr(text) in str(err.value)


def test_the_configs_own_recipe_comes_first_and_once():
    config = _config("lite1@96, lite0@64 ,,lite1@96,lite0@64x96:3")
    names = [c.name for c in cands.candidates(config)]
    assert names == ["lite0@64:3-4", "lite1@96:3-4", "lite0@64x96:3"]
    config = _config("auto ")
    config.selection.candidates = "lite0@128,lite0@64:3-4"
    assert [c.name for c in cands.candidates(config)] == ["lite0@64:3-4", "lite0@128:3-4"]
    config.select = ""  # no list: the config's own recipe alone
    assert [c.name for c in cands.candidates(config)] == ["lite0@64:3-4"]


def test_apply_changes_only_the_recipe():
    config = _config()
    config.data.image_size = (64, 64)
    out = cands.parse_candidate("lite1@96x128:2-3", (3, 4)).apply(config)
    assert out.model.backbone == "efficientnet-lite1"
    assert tuple(out.data.image_size) == (96, 128) and tuple(out.model.out_layers) == (2, 3)
    assert config.model.backbone == "efficientnet-lite0"  # the original is left alone
    assert tuple(config.data.image_size) == (64, 64)
    out.model.backbone, out.data.image_size = config.model.backbone, config.data.image_size
    out.model.out_layers = config.model.out_layers
    assert out.to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "text, stride, want",
    [
        ("lite0@64", 8, C),
        ("lite0@128x64", 8, 16 * 8 * 152),
        ("lite0@64x128", 8, 8 * 16 * 152),
        ("lite0@64:2-3", 8, 64 * (24 + 40)),
        ("lite0@64:5", 8, 64 * 320),
        ("lite1@64", 8, C),  # lite1 is deeper, not wider
        ("lite2@64", 8, 64 * (48 + 120)),  # width 1.1: 44 -> 48, 123.2 -> 120 (multiples of 8)
        ("b4@64", 8, 64 * (56 + 160)),  # width 1.4: the reference's 216 = 56 + 160
        ("lite0@64", 16, 4 * 4 * 152),
    ],
)
def test_head_cost_is_positions_times_channels(text, stride, want):
    config = _config()
    config.model.out_stride = stride
    assert cands.parse_candidate(text, (3, 4)).cost(config) == want


# ---------------------------------------------------------------------------------------------
# The budget: the probing share, affordable epochs, the choice, the final schedule
# ---------------------------------------------------------------------------------------------


def test_the_probing_deadline_is_the_share_of_the_budget():
    config = _config(budget_minutes=4.0)  # 240 s
    assert budget.probe_deadline(config, 1000.0) == 1120.0
    config.selection.max_share = 1.0
    assert budget.probe_deadline(config, 1000.0) == 1240.0
    config.selection.budget_minutes = 0.0
    assert budget.probe_deadline(config, 1000.0) is None


def test_a_candidate_is_skipped_when_its_probe_would_end_past_the_deadline(clock):
    """Its probe time is the config's own recipe's, scaled by head cost: 4x -> 80 s, 1/2 ->
    10 s; the deadline is 1000 + 0.5 * 240 = 1120, and ending exactly there is allowed."""
    config = _config(budget_minutes=4.0)
    base = _record("lite0@64", 0.5, 10.0)  # 20 s of probing in all
    big = cands.parse_candidate("lite0@128", (3, 4))
    small = cands.parse_candidate("lite0@64x32", (3, 4))
    for now, skip_big, skip_small in [
        (1020.0, False, False),
        (1040.0, False, False),  # 1040 + 80 = 1120: just fits
        (1040.5, True, False),
        (1110.0, True, False),  # 1110 + 10 = 1120
        (1110.5, True, True),
    ]:
        clock.now = now
        assert (budget.skip_reason(big, base, config, 1000.0) is not None) == skip_big, now
        assert (budget.skip_reason(small, base, config, 1000.0) is not None) == skip_small, now
    clock.now = 1041.0
    reason = budget.skip_reason(big, base, config, 1000.0)
    assert "about 80 s more after 41 s" in reason and "the 120 s that probes may use" in reason
    config.selection.budget_minutes = 0.0  # no budget: nothing is ever skipped
    clock.now = 1e9
    assert budget.skip_reason(big, base, config, 1000.0) is None


@pytest.mark.parametrize(
    "seconds_left, measured, want",
    [
        # overhead = cache 5 + 2 epochs x 10 + 3 validations x 1 = 28 s
        (100.0, 10.0, 2 + 7),  # 72 s more: 7 epochs of 10 s
        (98.0, 10.0, 2 + 7),  # 70 s: exactly 7
        (97.9, 10.0, 2 + 6),
        (10.0, 10.0, 2),  # less than the overhead: the probe's own epochs
        (-50.0, 10.0, 2),
        (10_000.0, 10.0, 50),  # at most train.epochs
        # the estimate (10 s), not the measured time (20 s), sets the epoch and the overhead
        (100.0, 20.0, 2 + 7),
    ],
)
def test_affordable_epochs_by_hand(seconds_left, measured, want):
    record = _record("lite0@64", 0.5, measured, cache=5.0, val=1.0)
    record["seconds_per_epoch_estimate"] = 10.0
    assert budget.affordable_epochs(record, _config(epochs=50), seconds_left) == want


def test_epoch_times_are_estimated_from_the_fastest_rate_per_unit_of_cost():
    """Rates per unit of cost: the recipe 10/C, lite0@128 (4C) 30/4C = 7.5/C (the fastest),
    lite1@64 (C, measured under load) 20/C; every estimate is 7.5/C x its own cost."""
    config = _config(budget_minutes=100.0)
    done = [
        _probe("lite0@64", 0.5, 10.0),
        _probe("lite0@128", 0.6, 30.0),
        _probe("lite1@64", 0.7, 20.0),
    ]
    budget.choose(done, config, seconds_left=6000.0)
    estimates = [p.record["seconds_per_epoch_estimate"] for p in done]
    assert estimates == pytest.approx([7.5, 30.0, 7.5])
    assert [p.record["seconds_per_epoch"] for p in done] == [10.0, 30.0, 20.0]  # kept as measured


@pytest.mark.parametrize(
    "figures, want",
    [
        ([0.7, 0.9, 0.9], 1),  # tied best: the earlier candidate
        ([0.9, 0.9], 0),  # a tie with the config's own recipe: the recipe
        ([0.9, 0.8, 0.9, 0.9], 0),
        ([0.5, 0.8, 0.9, 0.9, 0.8], 2),
        ([0.5, 0.6, 0.7], 2),
    ],
)
@pytest.mark.parametrize("with_budget", [False, True])
def test_ties_go_to_the_earlier_candidate(figures, want, with_budget):
    config = _config(budget_minutes=100.0 if with_budget else 0.0)
    names = ["lite0@64", "lite1@64", "lite0@64x72", "lite0@72x64", "lite2@64"]
    done = [_probe(n, f, 1.0) for n, f in zip(names, figures, strict=False)]
    winner, kind = budget.choose(done, config, seconds_left=6000.0)
    assert winner is done[want] and kind == "grad"
    assert all(p.record["fits_budget"] for p in done)


def test_the_earlier_tied_candidate_must_fit_the_budget():
    """A tie between a candidate that cannot train long enough and a later one that can: the
    later one wins. lite0@256 costs 16C: 160 s an epoch; in 105 s it trains no more epochs."""
    config = _config(budget_minutes=100.0)
    done = [_probe("lite0@64", 0.5, 10.0), _probe("lite0@256", 0.9, 160.0)]
    done.append(_probe("lite1@64", 0.9, 10.0))
    assert budget.choose(done, config, seconds_left=105.0) == (done[2], "grad")
    assert [p.record["fits_budget"] for p in done] == [True, False, True]


def test_a_candidate_competes_from_exactly_80_percent_of_the_recipes_epochs():
    """105 s left, 2 probe epochs done, no caching or validation time. The recipe (10 s an
    epoch) affords 2 + (105 - 20) // 10 = 10 epochs, so the floor is 8. lite0@64x80 (1.25 C,
    12.5 s) affords 2 + (105 - 25) // 12.5 = 8: it competes (and wins); lite0@72x80 (1.40625 C,
    14.0625 s) affords 2 + 76.875 // 14.0625 = 7: it does not, although its figure is best."""
    config = _config(budget_minutes=100.0)
    done = [
        _probe("lite0@64", 0.5, 10.0),
        _probe("lite0@64x80", 0.7, 12.5),
        _probe("lite0@72x80", 0.9, 14.0625),
    ]
    winner, _ = budget.choose(done, config, seconds_left=105.0)
    assert [p.record["affordable_epochs"] for p in done] == [10, 8, 7]
    assert [p.record["fits_budget"] for p in done] == [True, True, False]
    assert winner is done[1]


def test_without_a_budget_every_candidate_trains_the_configured_epochs():
    config = _config(epochs=50, budget_minutes=0.0)
    done = [_probe("lite0@64", 0.5, 1.0), _probe("lite0@256", 0.9, 1e6)]
    winner, _ = budget.choose(done, config, seconds_left=-1e6)
    assert [p.record["affordable_epochs"] for p in done] == [50, 50]
    assert winner is done[1]
    assert budget.final_schedule(config, winner.record) == (50, 40)


@pytest.mark.parametrize(
    "epochs, lr_step, affordable, want",
    [
        (50, 40, 20, (20, 16)),  # 40 x 20 / 50 = 16
        (50, 40, 7, (7, 6)),  # 5.6 rounds up
        (50, 40, 3, (3, 2)),  # 2.4 rounds down
        (50, 10, 2, (2, 1)),  # 0.4 would be 0: at least 1
        (50, 40, 0, (1, 1)),  # at least one epoch
        (50, 60, 20, (20, 24)),  # a step past the end moves too
        (50, 40, 50, (50, 40)),  # nothing cut: the step stays
        (10, 8, 10, (10, 8)),
    ],
)
def test_the_learning_rate_step_moves_in_proportion(epochs, lr_step, affordable, want):
    config = _config(epochs=epochs, lr_step=lr_step)
    assert budget.final_schedule(config, {"affordable_epochs": affordable}) == want


def test_the_final_config_is_the_winners_recipe_and_schedule():
    config = _config("lite1@96x128:2-3", epochs=50, lr_step=40)
    record = {
        "candidates": [_record("lite0@64", 0.5, 1.0), _record("lite1@96x128:2-3", 0.7, 1.0)],
        "winner": "lite1@96x128:2-3",
        "final_epochs": 20,
        "final_lr_step_epochs": 16,
    }
    final = budget.final_config(config, record)
    assert final.model.backbone == "efficientnet-lite1"
    assert tuple(final.data.image_size) == (96, 128) and tuple(final.model.out_layers) == (2, 3)
    assert (final.train.epochs, final.train.lr_step_epochs) == (20, 16)
    assert (config.train.epochs, config.model.backbone) == (50, "efficientnet-lite0")


# ---------------------------------------------------------------------------------------------
# Model kinds as candidates: (recipe, kind) pairs
# ---------------------------------------------------------------------------------------------


def _kinds_probe(name, seconds_per_epoch, **kinds):
    """A probe whose kinds have the given figures (keyword 'grad_knn' is 'grad+knn')."""
    figures = {k.replace("_", "+"): f for k, f in kinds.items()}
    record = _record(name, 0.0, seconds_per_epoch, kinds=figures)
    return probes.Probe(cands.from_record(record), record)


@pytest.mark.parametrize(
    "a, b, want",
    [
        # a tie between the kinds of one recipe: grad, then knn, then grad+knn
        ({"grad": 0.8, "knn": 0.8, "grad_knn": 0.8}, {"grad": 0.1}, (0, "grad")),
        ({"grad": 0.7, "knn": 0.8, "grad_knn": 0.8}, {"grad": 0.1}, (0, "knn")),
        ({"knn": 0.8, "grad_knn": 0.8}, {"grad": 0.1}, (0, "knn")),
        # across recipes the earlier recipe goes first, whatever its kind
        ({"grad": 0.5, "grad_knn": 0.9}, {"grad": 0.9, "knn": 0.9}, (0, "grad+knn")),
        # the best pair wins, whichever recipe and kind it is
        ({"grad": 0.5, "knn": 0.6, "grad_knn": 0.7}, {"grad": 0.6, "knn": 0.75}, (1, "knn")),
        ({"grad": 0.5, "knn": 0.6}, {"grad": 0.6, "knn": 0.5, "grad_knn": 0.61}, (1, "grad+knn")),
    ],
)
def test_the_best_recipe_and_kind_pair_wins_ties_by_recipe_then_kind(a, b, want):
    done = [_kinds_probe("lite0@64", 1.0, **a), _kinds_probe("lite1@64", 1.0, **b)]
    winner, kind = budget.choose(done, _config(), seconds_left=0.0)
    assert (done.index(winner), kind) == want


def test_a_kind_does_not_change_which_recipes_fit_the_budget():
    """The kinds share their recipe's training: lite0@256 (16C, 160 s an epoch) cannot train
    long enough in 105 s however good its kNN figure; the budget figures are per recipe."""
    config = _config(budget_minutes=100.0)
    done = [
        _kinds_probe("lite0@64", 10.0, grad=0.5, knn=0.6, grad_knn=0.55),
        _kinds_probe("lite0@256", 160.0, grad=0.4, knn=0.99, grad_knn=0.98),
    ]
    assert budget.choose(done, config, seconds_left=105.0) == (done[0], "knn")
    assert [p.record["fits_budget"] for p in done] == [True, False]
    assert [p.record["affordable_epochs"] for p in done] == [10, 2]


def test_the_full_runs_overhead_counts_the_memory_bank():
    """Overhead = cache 5 + bank 12 + 2 epochs x 10 + 3 validations x 1 = 40 s: 100 s leave 60
    s, 6 more epochs after the probe's 2."""
    record = _record("lite0@64", 0.5, 10.0, cache=5.0, val=1.0)
    record["bank_seconds"] = 12.0
    assert budget.affordable_epochs(record, _config(epochs=50), 100.0) == 2 + 6
    assert budget.affordable_epochs(record, _config(epochs=50), 99.9) == 2 + 5


def test_the_final_config_sets_the_winners_model_kind():
    config = _config("lite1@96", epochs=50, lr_step=40)
    record = {
        "candidates": [_record("lite0@64", 0.5, 1.0), _record("lite1@96", 0.7, 1.0)],
        "winner": "lite1@96:3-4",
        "winner_kind": "grad+knn",
        "final_epochs": 50,
        "final_lr_step_epochs": 40,
    }
    final = budget.final_config(config, record)
    assert final.model.kind == "grad+knn" and final.model.backbone == "efficientnet-lite1"
    assert config.model.kind == "grad"  # the original is left alone
    del record["winner_kind"]  # a record from before kinds competed: the config's own kind
    config.model.kind = "knn"
    assert budget.final_config(config, record).model.kind == "knn"


@pytest.mark.parametrize(
    "text, want",
    [
        ("grad,knn,grad+knn", ["grad", "knn", "grad+knn"]),
        (" grad+knn , grad", ["grad", "grad+knn"]),  # tie order, whatever the order written
        ("knn", ["knn"]),
        ("knn,knn", ["knn"]),
    ],
)
def test_the_competing_kinds_are_read_in_tie_order(text, want):
    config = _config()
    config.selection.kinds = text
    assert cands.competing_kinds(config) == want


def test_the_default_lets_every_kind_compete():
    config = tiny.get_config()
    assert cands.competing_kinds(config) == ["grad", "knn", "grad+knn"]
    assert validation.defect_kinds(config) == sd.KINDS


@pytest.mark.parametrize("text", ["", "grad,patchcore", " , "])
def test_unreadable_kinds_are_a_user_error_naming_the_key(text):
    config = _config()
    config.selection.kinds = text
    with pytest.raises(SelectionError, match="selection.kinds=") as err:
        cands.competing_kinds(config)
    assert "grad, knn, grad+knn" in str(err.value)
    with pytest.raises(SelectionError, match="selection.kinds="):
        select.validate_selection_config(config)


def test_kinds_that_read_the_memory_bank_need_it():
    config = _config()
    config.knn.fraction = 0.0
    with pytest.raises(SelectionError) as err:
        select.validate_selection_config(config)
    assert "knn.fraction=0" in str(err.value) and "selection.kinds=grad" in str(err.value)
    config.selection.kinds = "grad"
    select.validate_selection_config(config)  # GRAD alone needs no bank
    config.selection.defect_kinds = "scratch,dent"
    with pytest.raises(SelectionError, match="selection.defect_kinds='scratch,dent'"):
        select.validate_selection_config(config)
    config.selection.defect_kinds = "faint_scratch, hole"
    assert validation.defect_kinds(config) == ("faint_scratch", "hole")


class _RecordingPredict:
    """make_predict_fn replaced: records (variables, config, all_kinds) of each call."""

    def __init__(self):
        self.calls = []

    def __call__(self, variables, config, mesh, all_kinds=False):
        self.calls.append((variables, config.model.kind, all_kinds))
        return "program"


def test_a_probe_validates_every_kind_with_its_bank_in_one_all_kinds_program(monkeypatch):
    """The hook's program holds the memory bank, gives every kind's raw map (all_kinds) and
    keeps GRAD's own kind, needing no statistics, whatever the run's model.kind; the kinds go
    to `validate`, and the curve and the map statistics come from what it returns."""
    asked = []

    def validate(predict, val, config, kinds):
        asked.append((predict, val, kinds))
        return {"kinds": {k: dict.fromkeys(cands.FIGURE_KEYS, 0.5) for k in kinds}, "map_stats": 7}

    recording = _RecordingPredict()
    monkeypatch.setattr(probes, "validate", validate)
    monkeypatch.setattr(probes.device_program, "make_predict_fn", recording)
    run = _FakeRun(2)
    run.config.model.kind = "grad+knn"
    hook = probes._EpochEnd(run, "val", {2}, None, ("grad", "knn"), bank="the bank")
    hook(1, types.SimpleNamespace(params="p1", batch_stats=None))
    hook(2, types.SimpleNamespace(params="p2", batch_stats=None))
    ((variables, kind, all_kinds),) = recording.calls
    assert variables["bank"] == "the bank" and variables["params"] == "p2"
    assert kind == "grad" and all_kinds is True
    assert asked == [("program", "val", ("grad", "knn"))]
    assert hook.curve == [{"epoch": 2, "kinds": {k: dict.fromkeys(cands.FIGURE_KEYS, 0.5)
                                                 for k in ("grad", "knn")}}]  # fmt: skip
    assert hook.map_stats == 7 and run.config.model.kind == "grad+knn"


# ---------------------------------------------------------------------------------------------
# select(): fake data, fake probes, a fake clock
# ---------------------------------------------------------------------------------------------


class _FakeProbes:
    """probe() replaced: each candidate 'trains' `probe_epochs` epochs of its given seconds and
    advances the clock by them; each call records the deadline it got and selection.json as it
    was when the probe began."""

    def __init__(self, clock, workdir, figures, seconds_per_epoch):
        self.clock, self.workdir = clock, workdir
        self.figures, self.seconds = figures, seconds_per_epoch
        self.calls = []

    def __call__(self, candidate, config, source, val, shared, log_dir, deadline=None):
        path = self.workdir / run_folder.SELECTION_FILE
        on_disk = json.loads(path.read_text()) if path.exists() else None
        self.calls.append((candidate.name, deadline, self.clock.now, on_disk, source))
        figure = self.figures[candidate.name]  # a number, or {kind: figure}
        kinds = figure if isinstance(figure, dict) else None
        record = _record(
            candidate.name, 0.0 if kinds else figure, self.seconds[candidate.name],
            probe_epochs=config.selection.probe_epochs, kinds=kinds,
        )  # fmt: skip
        self.clock.advance(record["seconds"])
        return probes.Probe(candidate, record)


def _fake_data(monkeypatch, clock, seconds):
    """select's data (training images and synthetic validation) replaced by a stand-in that
    takes `seconds` of the clock to make."""

    def make(config):
        clock.advance(seconds)
        items = [input_pipeline.Item(0, i) for i in range(12)]
        val = ValidationSet(["part"], [[]], [[]], [[]])
        return select._SelectionData(config, [], ["part"], items, val)

    monkeypatch.setattr(select, "selection_data", make)


def _spy_reuse(monkeypatch, workdir):
    """select._reuse replaced: records selection.json as it is when the checkpoint would be
    written, and says the probe was reused."""
    seen = []

    def reuse(winner, final, wd):
        seen.append((winner.candidate.name, json.loads((workdir / "selection.json").read_text())))
        return True

    monkeypatch.setattr(select, "_reuse", reuse)
    return seen


def test_a_budget_that_cuts_epochs(clock, monkeypatch, tmp_path):
    """4 minutes for the whole run. Making the validation takes 15 s and the probe 2 x 10 s,
    so 205 s are left; the rest of the run costs 2 x 10 s besides its epochs, so 185 s give 18
    more epochs: 20 of 50, and the learning-rate step moves from 40 to 40 x 20 / 50 = 16."""
    workdir = tmp_path / "run"
    _fake_data(monkeypatch, clock, 15.0)
    fake = _FakeProbes(clock, workdir, {"lite0@64:3-4": 0.5}, {"lite0@64:3-4": 10.0})
    monkeypatch.setattr(probes, "probe", fake)
    reused = _spy_reuse(monkeypatch, workdir)
    record = select.select(_config(epochs=50, lr_step=40, budget_minutes=4.0), str(workdir))
    assert record["selection_seconds"] == 35.0
    (probe,) = record["candidates"]
    assert probe["affordable_epochs"] == 20 and probe["fits_budget"]
    assert (record["final_epochs"], record["final_lr_step_epochs"]) == (20, 16)
    assert record["config"]["train"]["epochs"] == 20
    assert record["config"]["train"]["lr_step_epochs"] == 16
    # selection.json holds the choice before the probe becomes the run's first checkpoint
    ((name, before),) = reused
    assert name == "lite0@64:3-4" and before["winner"] == "lite0@64:3-4"
    assert before["final_epochs"] == 20 and before["reused_probe"] is False
    assert before["config"]["train"]["lr_step_epochs"] == 16
    after = json.loads((workdir / run_folder.SELECTION_FILE).read_text())
    assert after["reused_probe"] is True and record["reused_probe"] is True


def test_probing_stops_at_its_share_of_the_budget(clock, monkeypatch, tmp_path):
    """4 minutes, half for probing: probes must end by 120 s. The recipe's probe takes 20 s.
    lite0@128 (4C: about 80 s) ends at 100 s: probed. lite0@96 (2.25C: 45 s) would end at 145 s:
    skipped. lite1@64 (C: 20 s) ends at exactly 120 s: probed. lite0@64x32 (C/2: 10 s) would end
    at 130 s: skipped.

    lite1@64 was slowed by load to 15 s an epoch (30 s), so 240 - 130 = 110 s are left. At the
    fastest rate (10 s per C) the recipe and lite1@64 afford 2 + (110 - 20) // 10 = 11 epochs
    and lite0@128 2 + (110 - 80) // 40 = 2, below the floor of 8.8: lite1@64 wins with 11
    epochs, the step at 40 x 11 / 50 = 8.8 -> 9."""
    workdir = tmp_path / "run"
    config = _config("lite0@128,lite0@96,lite1@64,lite0@64x32", budget_minutes=4.0)
    _fake_data(monkeypatch, clock, 0.0)
    names = ["lite0@64:3-4", "lite0@128:3-4", "lite0@96:3-4", "lite1@64:3-4", "lite0@64x32:3-4"]
    figures = dict(zip(names, [0.5, 0.9, 0.95, 0.7, 0.99], strict=True))
    seconds = dict(zip(names, [10.0, 40.0, 22.5, 15.0, 5.0], strict=True))
    fake = _FakeProbes(clock, workdir, figures, seconds)
    monkeypatch.setattr(probes, "probe", fake)
    _spy_reuse(monkeypatch, workdir)
    record = select.select(config, str(workdir))

    assert [c[0] for c in fake.calls] == ["lite0@64:3-4", "lite0@128:3-4", "lite1@64:3-4"]
    assert [c[1] for c in fake.calls] == [1120.0] * 3  # every probe gets the same deadline
    assert [c[2] for c in fake.calls] == [1000.0, 1020.0, 1100.0]
    assert [s["name"] for s in record["skipped"]] == ["lite0@96:3-4", "lite0@64x32:3-4"]
    assert all("over budget" in s["reason"] for s in record["skipped"])
    on_disk = json.loads((workdir / run_folder.SELECTION_FILE).read_text())
    assert [s["name"] for s in on_disk["skipped"]] == ["lite0@96:3-4", "lite0@64x32:3-4"]
    # selection.json is rewritten after each probe: the third probe sees the first two
    assert fake.calls[0][3] is None
    assert [c["name"] for c in fake.calls[2][3]["candidates"]] == names[:2]
    # probes train on the training images only
    assert fake.calls[0][4].items == [input_pipeline.Item(0, i) for i in range(12)]

    by_name = {c["name"]: c for c in record["candidates"]}
    assert [by_name[n]["affordable_epochs"] for n in names[:2] + names[3:4]] == [11, 2, 11]
    assert not by_name["lite0@128:3-4"]["fits_budget"]
    assert record["winner"] == "lite1@64:3-4"
    assert (record["final_epochs"], record["final_lr_step_epochs"]) == (11, 9)
    assert record["config"]["model"]["backbone"] == "efficientnet-lite1"


@pytest.mark.parametrize(
    "lr_step, budget_minutes, reused",
    [
        (3, 0.0, True),  # the probe's 3 epochs end where the step is: all at the base rate
        (2, 0.0, False),  # the probe trained past the step at the base rate
        (10, 0.0, True),
        # budget cut: 120 s - 30 s probing - 20 s overhead = 70 s: 7 more, 10 epochs (of 20),
        # step 6 x 10 / 20 = 3: reused; a step of 4 becomes 2: not
        (6, 2.0, True),
        (4, 2.0, False),
    ],
)
def test_the_probe_is_reused_only_before_the_learning_rate_step(
    lr_step, budget_minutes, reused, clock, monkeypatch, tmp_path
):
    workdir = tmp_path / "run"
    config = _config(epochs=20, lr_step=lr_step, probe_epochs=3, budget_minutes=budget_minutes)
    _fake_data(monkeypatch, clock, 0.0)
    fake = _FakeProbes(clock, workdir, {"lite0@64:3-4": 0.5}, {"lite0@64:3-4": 10.0})
    monkeypatch.setattr(probes, "probe", fake)
    calls = _spy_reuse(monkeypatch, workdir)
    record = select.select(config, str(workdir))
    if budget_minutes:
        assert record["final_epochs"] == 10
    assert record["reused_probe"] is reused and len(calls) == int(reused)


def test_a_finished_selection_is_not_run_again(clock, monkeypatch, tmp_path):
    """A rerun reads selection.json and trains the winner it names (with its epochs)."""
    workdir = tmp_path / "run"
    _fake_data(monkeypatch, clock, 0.0)
    figures = {"lite0@64:3-4": 0.5, "lite1@64:3-4": 0.6}
    fake = _FakeProbes(clock, workdir, figures, dict.fromkeys(figures, 10.0))
    monkeypatch.setattr(probes, "probe", fake)
    _spy_reuse(monkeypatch, workdir)
    config = _config("lite1@64", epochs=50, lr_step=40, budget_minutes=4.0)
    record = select.select(config, str(workdir))
    # 240 - 2 x 20 s probing - 20 s overhead = 180 s: 18 more epochs
    assert record["winner"] == "lite1@64:3-4" and record["final_epochs"] == 20

    def no_selection(*args):
        raise AssertionError("the finished selection was run again")

    trained = []
    monkeypatch.setattr(select, "select", no_selection)
    monkeypatch.setattr(
        loop, "train_and_evaluate", lambda cfg, wd, extra_info: trained.append((cfg, extra_info))
    )
    select.select_and_train(config, str(workdir))
    ((final, extra),) = trained
    assert final.model.backbone == "efficientnet-lite1"
    assert (final.train.epochs, final.train.lr_step_epochs) == (20, 16)
    assert extra["selection"]["winner"] == "lite1@64:3-4"


def test_the_record_and_the_table_show_every_recipe_and_kind(clock, monkeypatch, tmp_path):
    """Two recipes x three kinds: the winner is lite1@64 as knn; selection.json names the
    recipe and the kind, the winner's config has model.kind 'knn', and the printed table has
    one row per pair in tie order (the records' kinds come sorted, as in metrics.json), the
    winner's marked."""
    workdir = tmp_path / "run"
    _fake_data(monkeypatch, clock, 0.0)
    figures = {
        "lite0@64:3-4": {"grad": 0.61, "grad+knn": 0.63, "knn": 0.62},
        "lite1@64:3-4": {"grad": 0.6, "grad+knn": 0.65, "knn": 0.7},
    }
    fake = _FakeProbes(clock, workdir, figures, dict.fromkeys(figures, 10.0))
    monkeypatch.setattr(probes, "probe", fake)
    _spy_reuse(monkeypatch, workdir)
    record = select.select(_config("lite1@64"), str(workdir))
    assert (record["winner"], record["winner_kind"]) == ("lite1@64:3-4", "knn")
    assert record["kinds"] == ["grad", "knn", "grad+knn"]
    assert record["config"]["model"]["kind"] == "knn"
    assert record["config"]["model"]["backbone"] == "efficientnet-lite1"
    on_disk = json.loads((workdir / run_folder.SELECTION_FILE).read_text())
    assert on_disk["winner_kind"] == "knn"
    assert on_disk["validation"]["defect_kinds"] == list(sd.KINDS)
    rows = [line.split() for line in select.table(record).splitlines()[1:]]
    assert [(r[0], r[1], r[5]) for r in rows] == [
        (name, kind, f"{kinds[kind]:.4f}")
        for name, kinds in figures.items()
        for kind in ("grad", "knn", "grad+knn")
    ]
    assert [r[-1] for r in rows] == ["50"] * 4 + ["winner", "50"]


def test_the_report_section_lists_the_pairs_in_tie_order_and_marks_the_winning_pair():
    """metrics.json sorts keys (grad, grad+knn, knn): the report still lists grad, knn,
    grad+knn, and marks only the winning pair."""
    figures = {"grad": 0.6, "grad+knn": 0.65, "knn": 0.7}  # sorted, as metrics.json has them
    c = _record("lite1@64", 0.0, 10.0, kinds=figures)
    record = {
        "figure": "the figure", "kinds": ["grad", "knn", "grad+knn"],
        "validation": {"source": "held-out", "images": {"normal": 1}},
        "candidates": [c], "winner": c["name"], "winner_kind": "knn",
    }  # fmt: skip
    page = report_selection.selection_section(record)
    rows = re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td><td>2</td>", page)
    assert rows == [
        ("lite1@64:3-4", "grad"), ("lite1@64:3-4 (winner)", "knn"), ("lite1@64:3-4", "grad+knn")
    ]  # fmt: skip
    assert "model kind knn" in page


def test_an_invalid_selection_config_names_every_problem():
    config = _config(budget_minutes=-1.0)
    config.threshold.holdout_fraction = 0.0
    config.selection.probe_epochs = 0
    config.selection.defects_per_image = 0
    config.selection.max_share = 1.5
    with pytest.raises(SelectionError) as err:
        select.validate_selection_config(config)
    text = str(err.value)
    for key in (
        "threshold.holdout_fraction", "selection.probe_epochs=0", "selection.defects_per_image=0",
        "selection.max_share=1.5", "selection.budget_minutes=-1.0",
    ):  # fmt: skip
        assert key in text
    config = _config()
    config.selection.max_share = 1.0  # the edge is allowed
    select.validate_selection_config(config)


# ---------------------------------------------------------------------------------------------
# A probe's end-of-epoch hook: the deadline in a fake clock
# ---------------------------------------------------------------------------------------------


class _FakeRun:
    def __init__(self, epochs):
        config = tiny.get_config()
        config.train.epochs = epochs
        self.config, self.label, self.mesh, self.backbone = config, "probe x", None, None
        self.variables = types.SimpleNamespace(replace=lambda **kw: kw)
        self.steps_per_epoch = 3


def _fake_validation(monkeypatch, clock, seconds):
    """probes.validate replaced: takes `seconds` of the clock; figure = 0.1 x the epoch for
    each kind asked (+ 0.01 for knn)."""
    epochs = []

    def validate(predict, val, config, kinds):
        clock.advance(seconds)
        epochs.append(predict)
        f = 0.1 * len(epochs)
        figures = {k: dict.fromkeys(cands.FIGURE_KEYS, f + 0.01 * (k == "knn")) for k in kinds}
        return {"kinds": figures, "map_stats": {"epoch": len(epochs)}}

    monkeypatch.setattr(probes, "validate", validate)
    monkeypatch.setattr(
        probes.device_program, "make_predict_fn", lambda v, c, m, all_kinds: v["params"]
    )
    return epochs


def test_a_probe_stops_when_another_epoch_would_end_past_the_deadline(clock, monkeypatch):
    """Epochs of 30 s from 1000, validation (5 s, not counted as training) after epoch 2 of 5,
    deadline 1125. After epoch 3 (at 1095) one more ends at 1125 exactly: go on. After epoch 4
    (at 1125) it would end at 1155: stop, scored there."""
    validated = _fake_validation(monkeypatch, clock, 5.0)
    hook = probes._EpochEnd(_FakeRun(5), "val", {2, 5}, 1125.0)
    stops = []
    for epoch in range(1, 6):
        clock.advance(30.0)
        stops.append(hook(epoch, types.SimpleNamespace(params=f"state {epoch}", batch_stats=None)))
        if stops[-1]:
            break
    assert stops == [False, False, False, True]
    assert validated == ["state 2", "state 4"]
    assert [p["epoch"] for p in hook.curve] == [2, 4]
    assert "stopped after 4 of 5 epochs" in hook.stopped
    record = probes._record(
        cands.parse_candidate("lite0@64", (3, 4)), _FakeRun(5), hook, 7.0, 200.0
    )
    assert record["probe_epochs"] == 4 and record["seconds_per_epoch"] == 30.0
    assert record["kinds"] == {"grad": dict.fromkeys(cands.FIGURE_KEYS, pytest.approx(0.2))}
    assert record["map_stats"] == {"epoch": 2} and record["val_seconds"] == 5.0
    assert record["stopped_early"] == hook.stopped and record["steps_per_epoch"] == 3


def test_a_probe_never_stops_at_its_last_epoch_or_without_a_deadline(clock, monkeypatch):
    validated = _fake_validation(monkeypatch, clock, 5.0)
    hook = probes._EpochEnd(_FakeRun(3), "val", {1, 3}, 1001.0)  # the deadline is long past
    clock.advance(30.0)
    assert hook(1, types.SimpleNamespace(params="s1", batch_stats=None)) is True
    hook = probes._EpochEnd(_FakeRun(3), "val", {1, 3}, 1001.0)
    clock.advance(30.0)
    assert hook(3, types.SimpleNamespace(params="s3", batch_stats=None)) is False  # the last
    hook = probes._EpochEnd(_FakeRun(3), "val", {1, 3}, None)
    answers = []
    for epoch in (1, 2, 3):
        clock.advance(1e6)
        answers.append(hook(epoch, types.SimpleNamespace(params=f"t{epoch}", batch_stats=None)))
    assert answers == [False, False, False] and not hook.stopped
    assert validated == ["s1", "s3", "t1", "t3"]
    record = probes._record(cands.parse_candidate("lite0@64", (3, 4)), _FakeRun(3), hook, 0, 0)
    assert "stopped_early" not in record and record["probe_epochs"] == 3
