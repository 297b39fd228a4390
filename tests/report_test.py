"""The visual report (files, HTML content, example selection) and the heat-map overlay."""

import html.parser
import json
import math
import os
import re
from html import unescape as html_unescape

import numpy as np
import pytest
from PIL import Image

from grad_jax.evaluation import metrics
from grad_jax.evaluation.evaluate import CategoryEval
from grad_jax.evaluation.report import figures, safe_name, write_report
from grad_jax.inference import heatmap

SIZE = 32


class FakeSource:
    """Random access like `input_pipeline.IndexedSource`: item i is a dict with 'image'..."""

    def __init__(self, images, masks, filenames):
        self.images, self.masks, self.filenames = images, masks, filenames

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {
            "image": self.images[i],
            "mask": self.masks[i],
            "label": np.int32(self.masks[i].any()),
            "filename": self.filenames[i],
        }


def make_category(name, n_good, n_bad, seed, scores=None):
    """Good images have flat low maps; defective ones a square defect with a hot blob on it."""
    rng = np.random.default_rng(seed)
    n = n_good + n_bad
    images = rng.integers(60, 200, (n, SIZE, SIZE, 3), dtype=np.uint8)
    masks = np.zeros((n, SIZE, SIZE), np.uint8)
    maps = rng.uniform(0.0, 0.2, (n, SIZE, SIZE)).astype(np.float32)
    filenames = []
    for i in range(n):
        if i < n_good:
            filenames.append(f"{name}/test/good/{i:03d}.png")
            continue
        y, x = rng.integers(4, SIZE - 12, 2)
        masks[i, y : y + 8, x : x + 8] = 1
        maps[i, y : y + 8, x : x + 8] += 1.0
        filenames.append(f"{name}/test/crack/{i:03d}.png")
    labels = masks.reshape(n, -1).any(1).astype(np.int32)
    if scores is None:
        scores = maps.reshape(n, -1).max(1)
    source = FakeSource(images, masks, filenames)
    return CategoryEval(
        np.asarray(scores, np.float32), labels, maps, masks,
        name=name, filenames=filenames, source=source,
    )  # fmt: skip


def all_metrics(results):
    values, _ = metrics.summarise(
        {r.name: metrics.CategoryResults(r.scores, r.labels, r.maps, r.masks) for r in results}
    )
    return values


# Scores chosen so that the examples are known: in "bottle", defective image 9 is the best
# detection, defective image 5 the worst miss, good image 1 the worst false alarm.
BOTTLE_SCORES = [0.10, 0.90, 0.20, 0.15, 0.12, 0.05, 0.60, 0.70, 0.80, 0.95]
THRESHOLD = {
    "image_score": 0.4321,
    "quantile": 0.99,
    "num_images": 7,
    "per_category": {"bottle": 0.5},
    "source": "held-out normal training images (never trained on)",
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run_a")
    results = [
        make_category("bottle", n_good=5, n_bad=5, seed=0, scores=BOTTLE_SCORES),
        make_category("metal nut/v2", n_good=4, n_bad=0, seed=1),  # no defective images
        make_category("all bad", n_good=0, n_bad=3, seed=2),  # no good images
    ]
    values = all_metrics(results)
    values["bottle/image_auroc"] = 0.91234  # distinctive numbers for the table checks
    values["mean/image_auroc"] = 0.87654
    index = write_report(str(workdir), results, values, THRESHOLD)
    folder = os.path.join(workdir, "report")
    with open(index, encoding="utf-8") as f:
        page = f.read()
    with open(os.path.join(folder, "report.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    return dict(index=index, folder=folder, page=page, manifest=manifest, values=values)


class _Tables(html.parser.HTMLParser):
    """Collects every table of a page as rows of cell texts."""

    def __init__(self):
        super().__init__()
        self.tables, self._cell = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell.strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def metrics_table(page):
    parser = _Tables()
    parser.feed(page)
    for table in parser.tables:
        if table and table[0] and table[0][0] == "category" and "I-AUROC" in table[0]:
            return table
    raise AssertionError("no metrics table in the page")


def test_files_are_written_referenced_and_readable(report):
    assert os.path.basename(report["index"]) == "index.html"
    pngs = sorted(f for f in os.listdir(report["folder"]) if f.endswith(".png"))
    expected = {"roc_image.png", "pro_pixel.png"}
    expected |= {f"{kind}_{c}.png" for kind in ("scores", "examples") for c in ("bottle",)}
    expected |= {"scores_metal_nut_v2.png", "examples_metal_nut_v2.png"}
    expected |= {"scores_all_bad.png", "examples_all_bad.png"}
    assert expected <= set(pngs)
    assert sorted(report["manifest"]["figures"]) == pngs
    for name in pngs:
        assert re.fullmatch(r"[A-Za-z0-9._-]+", name), name
        assert f"src='{name}'" in report["page"], f"{name} is not shown in index.html"
        path = os.path.join(report["folder"], name)
        assert os.path.getsize(path) > 5_000, name
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == "PNG" and min(im.size) >= 200, (name, im.size)
            pixels = np.asarray(im.convert("RGB"))
            assert pixels.std() > 5, f"{name} looks blank"
    # no leftovers of the write-then-rename
    assert not [f for f in os.listdir(report["folder"]) if ".tmp" in f]
    # self-contained: no scripts, no external resources, no absolute paths
    page = report["page"]
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert report["folder"] not in page


def test_metrics_table_has_categories_and_mean_row(report):
    table = metrics_table(report["page"])
    header, rows = table[0], {row[0]: row for row in table[1:]}
    assert list(rows) == ["bottle", "metal nut/v2", "all bad", "mean"]
    column = header.index("I-AUROC")
    assert rows["bottle"][column] == "91.2"
    assert rows["mean"][column] == "87.7"  # taken from the dict, not recomputed
    aupro = header.index("P-AUPRO")
    assert rows["mean"][aupro] == f"{100 * report['values']['mean/pixel_aupro']:.1f}"
    assert rows["metal nut/v2"][column] == "n/a"  # nan: no defective images
    assert "I-F1threshold" not in header and "image_f1_threshold" not in header


def test_mean_row_computed_when_the_dict_has_none(tmp_path):
    results = [make_category("a", 3, 3, seed=3), make_category("b", 3, 3, seed=4)]
    results[1].source = None  # no images to re-read: the examples show grey images instead
    values = {"a/image_auroc": 0.5, "b/image_auroc": 0.75, "b/pixel_aupro": math.nan}
    index = write_report(str(tmp_path), results, values, None)
    assert os.path.getsize(os.path.join(tmp_path, "report", "examples_b.png")) > 5_000
    with open(index, encoding="utf-8") as f:
        table = metrics_table(f.read())
    mean = {row[0]: row for row in table[1:]}["mean"]
    assert mean[table[0].index("I-AUROC")] == "62.5"
    assert mean[table[0].index("P-AUPRO")] == "n/a"


def test_threshold_shown_when_known_and_not_when_none(report, tmp_path):
    page = report["page"]
    assert "0.4321" in page and "held-out normal training images" in page
    assert "test-set optimal, for reference only" in page
    f1 = report["values"]["bottle/image_f1_threshold"]
    assert f"{f1:.4g}" in page
    assert report["manifest"]["threshold"] == pytest.approx(0.4321)

    # 10 images of 32 x 32 pixels: over a 3,000-pixel budget the PRO curve is drawn from a sample
    assert "Every curve uses all pixels." in page and "Categories marked *" not in page
    results = [make_category("bottle", 5, 5, seed=0, scores=BOTTLE_SCORES)]
    index = write_report(str(tmp_path), results, all_metrics(results), None, max_plot_pixels=3000)
    with open(index, encoding="utf-8") as f:
        other = f.read()
    assert "Categories marked * have more than 3,000 pixels" in other
    assert "0.4321" not in other and "held-out normal training images" not in other
    assert "No decision threshold" in other
    assert "test-set optimal, for reference only" in other


#: A recipe selection's record as metrics.json holds it (the fields the report reads).
SELECTION = {
    "figure": "mean of image AUROC and pixel AUPRO on the synthetic validation",
    "validation": {"source": "normal <training> images", "images": {"normal": 4, "patch": 3}},
    "winner": "lite1@224:3-4",
    "reused_probe": True,
    "candidates": [
        {
            "name": "lite0@224:3-4",
            "seconds_per_epoch": 12.34,
            "curve": [
                {"epoch": 2, "image_auroc": 0.5, "pixel_auroc": 0.61, "pixel_aupro": 0.7,
                 "figure": 0.6},
                {"epoch": 4, "image_auroc": 0.55, "pixel_auroc": 0.66, "pixel_aupro": 0.75,
                 "figure": 0.65},
            ],
        },
        {
            "name": "lite1@224:3-4",
            "seconds_per_epoch": 20.0,
            "curve": [
                {"epoch": 4, "image_auroc": 0.9, "pixel_auroc": 0.8, "pixel_aupro": 0.70004,
                 "figure": 0.80002},
            ],
        },
    ],
    "skipped": [{"name": "lite2@224:3-4", "reason": "over budget: 300 s > 200 s"}],
}  # fmt: skip


def test_selection_section_shows_the_record(tmp_path, report):
    results = [make_category("bottle", 2, 2, seed=5)]
    index = write_report(str(tmp_path), results, all_metrics(results), None, selection=SELECTION)
    with open(index, encoding="utf-8") as f:
        page = f.read()
    parser = _Tables()
    parser.feed(page)
    (table,) = [t for t in parser.tables if t and t[0][:2] == ["candidate", "epoch"]]
    assert table == [
        ["candidate", "epoch", "image AUROC", "pixel AUROC", "AUPRO", "figure", "s/epoch"],
        ["lite0@224:3-4", "2", "0.5000", "0.6100", "0.7000", "0.6000", "12.3"],
        ["lite0@224:3-4", "4", "0.5500", "0.6600", "0.7500", "0.6500", "12.3"],
        ["lite1@224:3-4 (winner)", "4", "0.9000", "0.8000", "0.7000", "0.8000", "20.0"],
    ]
    text = re.sub(r"<[^>]+>", "", page)
    assert (
        "Ranked by the mean of image AUROC and pixel AUPRO on the synthetic validation; "
        'validation: normal <training> images ({"normal": 4, "patch": 3}). '
        "Winner: lite1@224:3-4 (its probe state continued)."
    ) in html_unescape(text)
    assert "normal &lt;training&gt; images" in page  # escaped
    assert "lite2@224:3-4: over budget: 300 s &gt; 200 s" in page
    with open(os.path.join(tmp_path, "report", "report.json"), encoding="utf-8") as f:
        assert json.load(f)["selection"] == SELECTION
    # A run that did not choose its recipe has no such section (nor manifest entry).
    assert 'id="selection"' not in report["page"] and "selection" not in report["manifest"]


def test_examples_are_the_right_images(report):
    shown = report["manifest"]["examples"]["bottle"]
    # good: 0..4, defective: 5..9 with scores .05 .60 .70 .80 .95
    assert [e["filename"] for e in shown["detected"]] == [
        "bottle/test/crack/009.png",
        "bottle/test/crack/008.png",
        "bottle/test/crack/007.png",
        "bottle/test/crack/006.png",
    ]
    assert [e["filename"] for e in shown["missed"]] == ["bottle/test/crack/005.png"]
    assert [e["filename"] for e in shown["false_alarms"]][:2] == [
        "bottle/test/good/001.png",
        "bottle/test/good/002.png",
    ]
    assert all(e["label"] == 1 for e in shown["detected"] + shown["missed"])
    assert all(e["label"] == 0 for e in shown["false_alarms"])
    assert "bottle/test/crack/009.png (0.95)" in report["page"]
    only_good = report["manifest"]["examples"]["metal nut/v2"]
    assert only_good["detected"] == only_good["missed"] == []
    assert len(only_good["false_alarms"]) == 4


def test_pick_examples_never_repeats_an_image():
    scores = np.array([0.3, 0.9, 0.1, 0.5, 0.7])
    labels = np.array([1, 1, 1, 0, 0])
    picks = figures.pick_examples(scores, labels, k=2)
    assert picks == {"detected": [1, 0], "missed": [2], "false_alarms": [4, 3]}


def test_safe_names_are_unique_and_harmless():
    taken = set()
    names = [safe_name(n, taken) for n in ["a/b c", "a b/c", "../etc", "", "A_B_C"]]
    assert names[0] == "a_b_c" and names[1] == "a_b_c_2"
    assert names[2] == "etc" and names[3] == "category"
    assert names[4] == "A_B_C_3"  # case-insensitive file systems
    assert all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", n) for n in names)


def test_interrupted_report_keeps_the_previous_index(tmp_path, monkeypatch):
    results = [make_category("a", 3, 3, seed=5), make_category("b", 3, 3, seed=6)]
    values = all_metrics(results)
    index = write_report(str(tmp_path), results, values, THRESHOLD)
    with open(index, encoding="utf-8") as f:
        before = f.read()

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(figures, "examples_figure", broken)
    with pytest.raises(KeyboardInterrupt):
        write_report(str(tmp_path), results, values, None)
    with open(index, encoding="utf-8") as f:
        assert f.read() == before
    assert not [f for f in os.listdir(os.path.dirname(index)) if ".tmp" in f]


def test_overlay_is_red_where_the_map_is_high_and_blue_where_low():
    image = np.full((8, 8, 3), 128, np.uint8)
    anomaly = np.zeros((8, 8), np.float32)
    anomaly[:, :4] = 1.0
    out = heatmap.overlay(image, anomaly, vmin=0.0, vmax=1.0)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    red, blue = out[:, :4].reshape(-1, 3), out[:, 4:].reshape(-1, 3)
    assert (red[:, 0] > red[:, 2] + 50).all()
    assert (blue[:, 2] > blue[:, 0] + 50).all()
    # alpha 0 leaves the image untouched
    np.testing.assert_array_equal(heatmap.overlay(image, anomaly, 0.0, 1.0, alpha=0.0), image)
    with pytest.raises(ValueError):
        heatmap.overlay(image, anomaly[:4], 0.0, 1.0)


def test_no_pro_plot_without_a_masked_defect_and_conformal_thresholds_per_class(tmp_path):
    """A split whose defects have no masks gets no PRO figure (nothing to show), and the
    threshold table shows each class's threshold with its guarantee, measured false alarms
    and misses."""
    r = make_category("plate", n_good=4, n_bad=4, seed=5, scores=[0.1, 0.2, 0.3, 0.9] + [0.8] * 4)
    r.has_mask = np.array([True] * 4 + [False] * 4)  # defect folders without ground truth
    threshold = {
        "image_score": 0.35,
        "rule": "conformal",
        "target_false_alarm": 0.01,
        "num_images": 9,
        "per_category": {"plate": 0.25},
        "guarantee": {
            "run": {"guarantee": 0.1, "text": "the 9th smallest of 9 held-out normal scores"},
            "per_category": {"plate": {"n": 9, "guarantee": 0.1}},
        },
        "source": "held-out normal training images (never trained on)",
    }
    values = all_metrics([r])
    # measured at the class's threshold 0.25: good 0.3 and 0.9 flagged (2 of 4), no defect missed
    values.update({"plate/false_alarm_rate": 0.5, "plate/miss_rate": 0.0})
    write_report(str(tmp_path), [r], values, threshold)
    page = (tmp_path / "report" / "index.html").read_text()
    assert not (tmp_path / "report" / "pro_pixel.png").exists()
    assert "pro_pixel.png" not in page
    assert (tmp_path / "report" / "roc_image.png").exists()
    parser = _Tables()
    parser.feed(page)
    rows = [row for table in parser.tables for row in table if row and row[0] == "plate"]
    assert ["plate", "0.25", "9", "10.0", "50.0", "0.0"] in rows
    assert "conformal quantile" in page and "1.0%" in page
