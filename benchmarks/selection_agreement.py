"""Does label-free selection rank candidates as the test split would? Rank agreement per dataset.

    python benchmarks/selection_agreement.py --out=OUT \
        --candidates=lite0@224,lite1@224,lite2@224 --probe_epochs=3 NAME=PATH [NAME=PATH ...]

Each PATH is an MVTec-layout category folder, or a folder of them (one unified model), laid out
by the scripts in `benchmarks/datasets/`. The config is `configs/folder.py` unless --config says
otherwise; `--config.*` overrides apply as in `grad_jax.main` (`--config.selection.kinds=...`,
`--config.selection.defect_kinds=...`).

For each dataset this does what `--config.select=CANDIDATES` does before its final run (the
functions of `grad_jax.selection.select`: the same synthetic validation from the held-out normal
training images, every recipe probed for `--probe_epochs` epochs through the training loop, each
scored as every model kind of `selection.kinds`, the winning (recipe, kind) pair chosen by
`budget.choose`), without a time budget, so that every candidate is probed. Only then, with
selection done, it opens the dataset's test split and scores the same probe models (the state
after the probe, the same memory bank, 'grad+knn' standardised by the same held-out normal
statistics) on it with `evaluation.evaluate.evaluate_categories` and an all-kinds program, and
computes the same figure (the mean of image AUROC and pixel AUPRO, means over categories; a
split without defect masks has no AUPRO, and its figure is then the image AUROC alone, which the
results say).

Per dataset it reports, over the (recipe, kind) pairs: the Spearman and Kendall (tau-b) rank
correlations between validation and test figures (and between validation and test image
AUROC), whether the validation winner is a test winner (its test figure equals the best), and
its test-figure loss against the test best. Results go to `OUT/selection_agreement.json` (and
`OUT/NAME/agreement.json` per dataset: a rerun skips finished datasets); a Markdown table is
printed. Probe logs and each dataset's selection.json are under `OUT/NAME/`.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Sequence

import numpy as np
from absl import flags

from grad_jax import cli
from grad_jax.config import validate_config
from grad_jax.data import input_pipeline
from grad_jax.errors import UsageError
from grad_jax.evaluation import evaluate
from grad_jax.inference import device_program
from grad_jax.models.model import ModelVariables, build_model
from grad_jax.selection import budget, select
from grad_jax.selection.candidates import competing_kinds
from grad_jax.selection.validation import figures

RESULTS = "selection_agreement.json"

# ---------------------------------------------------------------------------------------------
# The agreement arithmetic
# ---------------------------------------------------------------------------------------------


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks of `values` (smallest first), tied values sharing their mean rank."""
    x = np.asarray(values, np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), np.float64)
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: the Pearson correlation of the average ranks (nan when
    either side is constant or there are fewer than 2 values)."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} and {len(y)} values")
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / denominator) if denominator > 0 else float("nan")


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b: (concordant - discordant) / sqrt((n0 - ties in x) (n0 - ties in y))
    over the n0 = n (n - 1) / 2 pairs (nan when either side is constant)."""
    if len(x) != len(y):
        raise ValueError(f"kendall: {len(x)} and {len(y)} values")
    concordant = discordant = tied_x = tied_y = pairs = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
            pairs += 1
            tied_x += dx == 0
            tied_y += dy == 0
            concordant += dx * dy > 0
            discordant += dx * dy < 0
    denominator = math.sqrt((pairs - tied_x) * (pairs - tied_y))
    return float((concordant - discordant) / denominator) if denominator > 0 else float("nan")


def first_best(values: Sequence[float]) -> int:
    """The index of the largest value, ties going to the earliest (selection's rule)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def agreement(
    pairs: Sequence[dict], winner: int, key: str = "figure"
) -> dict[str, float | int | bool | str]:
    """How the validation's ranking of `pairs` ({'recipe', 'kind', 'validation': {...},
    'test': {...}}, in candidate order: recipe, then kind) agrees with the test split's, by
    `key`; `winner` is the index of the validation winner (as selection chose it)."""
    val = [p["validation"][key] for p in pairs]
    test = [p["test"][key] for p in pairs]
    best = first_best(test)
    name = "{recipe} {kind}".format
    return {
        "pairs": len(pairs),
        "spearman": spearman(val, test),
        "kendall_tau_b": kendall_tau_b(val, test),
        "validation_winner": name(**pairs[winner]),
        "test_best": name(**pairs[best]),
        "winner_is_test_best": bool(test[winner] == test[best]),
        "test_loss": float(test[best] - test[winner]),
    }


# ---------------------------------------------------------------------------------------------
# Probing as selection does, then the test split
# ---------------------------------------------------------------------------------------------


def _test_figures(values: dict[str, float]) -> dict[str, float]:
    """The validation's figure; without test masks (AUPRO undefined) the image AUROC alone."""
    out = dict(values)
    if math.isnan(out["pixel_aupro"]):
        out["figure"] = out["image_auroc"]
    return out


def measure(name: str, root: str, config, out: pathlib.Path) -> dict:
    """Probe every candidate on `root` as selection does, then score the probes on its test
    split; the dataset's pairs and their agreement."""
    config = config.copy_and_resolve_references()
    config.data.root = root
    config.selection.budget_minutes = 0.0  # every candidate is probed and trains fully
    validate_config(config)
    select.validate_selection_config(config)
    workdir = out / name
    started = time.time()
    data = select.selection_data(config)
    config = data.config
    record = select.new_record(config, data)
    probes, _ = select.probe_all(data, str(workdir), record, started)
    winner, winner_kind = budget.choose(probes, config, float("inf"))
    selection_seconds = time.time() - started
    kinds = competing_kinds(config)

    # Selection is over: only now is the test split opened.
    categories = input_pipeline.open_categories(config)
    pairs = []
    for probe in probes:
        cfg = probe.candidate.apply(config)
        cfg.model.kind = "grad"  # only the per-kind raw maps are read
        variables = ModelVariables.from_model(build_model(cfg)).replace(
            backbone=probe.backbone, params=probe.state.params,
            batch_stats=probe.state.batch_stats, bank=probe.bank,
        )  # fmt: skip
        stats = probe.record.get("map_stats")
        predict = device_program.make_predict_fn(variables, cfg, None, stats, all_kinds=True)
        results = evaluate.evaluate_categories(predict, categories, cfg, stats)
        for kind in kinds:
            test = _test_figures(figures({r.name: r.as_kind(kind) for r in results}))
            pairs.append(
                {
                    "recipe": probe.candidate.name,
                    "kind": kind,
                    "validation": probe.record["kinds"][kind],
                    "test": test,
                }
            )
    index = next(
        i for i, p in enumerate(pairs)
        if p["recipe"] == winner.candidate.name and p["kind"] == winner_kind
    )  # fmt: skip
    no_masks = any(math.isnan(p["test"]["pixel_aupro"]) for p in pairs)
    return {
        "name": name,
        "root": root,
        "probe_epochs": config.selection.probe_epochs,
        "kinds": kinds,
        "validation_images": record["validation"]["images"],
        "test_figure": "image AUROC (no test masks)" if no_masks else "as the validation's",
        "selection_seconds": selection_seconds,
        "seconds": time.time() - started,
        "pairs": pairs,
        "agreement": agreement(pairs, index),
        "agreement_image_auroc": agreement(pairs, index, "image_auroc"),
    }


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _num(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def table(results: Sequence[dict]) -> str:
    """Markdown: one summary row per dataset, then each dataset's pairs."""
    rows = [
        "| dataset | pairs | Spearman | Kendall | Spearman (image AUROC) | validation winner "
        "| test best | same | test loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        a, i = r["agreement"], r["agreement_image_auroc"]
        rows.append(
            f"| {r['name']} | {a['pairs']} | {_num(a['spearman'])} | {_num(a['kendall_tau_b'])} "
            f"| {_num(i['spearman'])} | {a['validation_winner']} | {a['test_best']} "
            f"| {'yes' if a['winner_is_test_best'] else 'no'} | {_num(a['test_loss'])} |"
        )
    for r in results:
        rows += [
            "",
            f"{r['name']} (test figure: {r['test_figure']}; {r['probe_epochs']} probe epochs)",
            "",
            "| recipe | kind | validation figure | test figure | validation image AUROC "
            "| test image AUROC |",
            "|---|---|---|---|---|---|",
        ]
        for p in r["pairs"]:
            v, t = p["validation"], p["test"]
            rows.append(
                f"| {p['recipe']} | {p['kind']} | {_num(v['figure'])} | {_num(t['figure'])} "
                f"| {_num(v['image_auroc'])} | {_num(t['image_auroc'])} |"
            )
    return "\n".join(rows)


def _as_json(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _as_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_as_json(v) for v in value]
    if isinstance(value, np.generic):
        return _as_json(value.item())
    return value


def define_flags(values: flags.FlagValues) -> None:
    flags.DEFINE_string("out", None, "Folder for the results and probe logs.", flag_values=values)
    flags.DEFINE_string(
        "candidates", "lite0@224,lite1@224,lite2@224",
        "Recipes, BACKBONE@SIZE[xWIDTH][:STAGES], comma-separated (the config's own competes).",
        flag_values=values,
    )  # fmt: skip
    flags.DEFINE_integer(
        "probe_epochs", None, "Probe epochs (default: the config's selection.probe_epochs).",
        flag_values=values,
    )  # fmt: skip


def body(values: flags.FlagValues, args: list[str]) -> int:
    if not values.out:
        raise UsageError("--out is required (the folder for the results)")
    if not args:
        raise UsageError("give at least one dataset as NAME=PATH")
    config = values.config.copy_and_resolve_references()
    config.select = values.candidates
    if values.probe_epochs is not None:
        config.selection.probe_epochs = values.probe_epochs
    out = pathlib.Path(values.out)
    out.mkdir(parents=True, exist_ok=True)
    datasets = []
    for spec in args:
        name, _, root = spec.partition("=")
        if not name or not root or not os.path.isdir(root):
            raise UsageError(f"{spec}: give NAME=PATH with an existing folder")
        datasets.append((name, root))
    results = []
    for name, root in datasets:
        done = out / name / "agreement.json"
        if done.exists():
            result = json.loads(done.read_text())
        else:
            result = _as_json(measure(name, root, config, out))
            done.parent.mkdir(parents=True, exist_ok=True)
            done.write_text(json.dumps(result, indent=1))
        results.append(_restore_nan(result))
        (out / RESULTS).write_text(json.dumps(_as_json(results), indent=1))
    print(table(results))
    return cli.EXIT_OK


def _restore_nan(value):
    """JSON's null back to nan for the numbers of a result read from disk."""
    if value is None:
        return float("nan")
    if isinstance(value, dict):
        return {k: _restore_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_restore_nan(v) for v in value]
    return value


def main(argv: Sequence[str]) -> int:
    return cli.run_command(
        argv, __doc__, define_flags, body, config="configs/folder.py", positional_args=True
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv))
