"""The HTML report (mask2former.report): structure, numbers, worst images, and rendering in a
real headless browser (Chromium), on a tiny synthetic dataset and a randomly initialised tiny
Mask2Former checkpoint."""

import base64
import html.parser
import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model

from mask2former.data.catalog.common import dataset_file_names
from mask2former.data.catalog.labelmap import register_labelmap_semseg
from mask2former.data.masks.rasterize import record_to_label_map
from mask2former.data.offline.synthetic import generate_synthetic_trash
from mask2former.engine import SafeCheckpointer, build_cfg
from mask2former.inference.predictor import SemSegPredictor, predict_records
from mask2former.inference.sinks import ScoreSink
from mask2former.report import EvaluationSink, build_report, dataset_statistics
from mask2former.report.dataset_stats import label_map_objects

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
DATASET = "trash_val"
WORST = 2
VOID = {"meta", "img", "br", "hr", "link", "input"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    root = tmp / "data"
    generate_synthetic_trash(str(root), num_train=1, num_val=3, num_test=1, image_size=SIZE, seed=3)
    opts = ["DATASETS.TRASH_ROOT", str(root), "MODEL.DEVICE", "cpu"]
    opts += ["INPUT.MIN_SIZE_TEST", str(SIZE), "INPUT.SIZE_DIVISIBILITY", str(SIZE)]
    cfg = build_cfg(str(ROOT / "configs" / "tiny" / "m2f_swin_tiny_cpu.yaml"), opts)
    torch.manual_seed(0)
    weights = tmp / "random.pth"
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    full = build_report(cfg, DATASET, str(tmp / "full.html"), str(weights), worst_k=WORST)
    dataset_only = build_report(cfg, DATASET, str(tmp / "dataset.html"), progress=False)
    return {"cfg": cfg, "weights": str(weights), "full": full, "dataset_only": dataset_only}


class PageParser(html.parser.HTMLParser):
    """Checks that every element is closed in order; collects tables, images and cell text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.tables, self.images, self.tags = [], {}, [], []
        self._table, self._row, self._cell = None, None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        assert tag not in VOID, f"<{tag}> must be written self-closed"
        self.stack.append(tag)
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id", f"table{len(self.tables)}"), [])
        elif tag == "tr" and "tbody" in self.stack:
            self._row = []
            self._table.append(self._row)
        elif tag == "td" and self._row is not None:
            self._cell = []
            self._row.append(self._cell)

    def handle_startendtag(self, tag, attrs):
        assert tag in VOID, f"<{tag} /> is not a void element"
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs))

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()
        if tag == "td":
            self._cell = None
        elif tag == "tr":
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(path):
    parser = PageParser()
    parser.feed(Path(path).read_text(encoding="utf-8"))
    parser.close()
    assert parser.stack == [], f"unclosed elements {parser.stack}"
    return parser


def decode_data_uri(src):
    match = re.fullmatch(r"data:image/(png|jpeg);base64,([A-Za-z0-9+/=]+)", src)
    assert match, f"not a base64 PNG / JPEG data URI: {src[:40]}"
    image = cv2.imdecode(
        np.frombuffer(base64.b64decode(match.group(2)), np.uint8), cv2.IMREAD_COLOR
    )
    assert image is not None and image.size > 0
    return image


def column(rows, index):
    return ["".join(row[index]).strip() for row in rows]


def test_report_is_well_formed_self_contained_and_has_a_row_per_class(setup):
    classes = MetadataCatalog.get(DATASET).stuff_classes
    page = parse(setup["full"])
    assert not {"script", "link", "iframe", "object"} & set(page.tags)
    assert "http" not in Path(setup["full"]).read_text(encoding="utf-8")
    assert len(page.tables["class-distribution"]) == len(classes)
    assert len(page.tables["class-iou"]) == len(classes)
    assert column(page.tables["class-iou"], 0) == list(classes)
    # two histograms, the worst images, the confusion matrix; all decode as pictures
    assert len(page.images) == 2 + WORST + 1
    for image in page.images:
        decode_data_uri(image["src"])

    dataset_only = parse(setup["dataset_only"])
    assert "class-iou" not in dataset_only.tables and len(dataset_only.images) == 2
    assert len(dataset_only.tables["class-distribution"]) == len(classes)


def test_report_numbers_match_the_dataset_and_the_lb_evaluator(setup):
    records = DatasetCatalog.get(DATASET)
    rows = parse(setup["full"]).tables["class-distribution"]
    pixels = [int(v) for v in column(rows, 1)]
    images = [int(v) for v in column(rows, 5)]
    assert sum(pixels) == sum(r["height"] * r["width"] for r in records)
    assert images[0] == len(records)  # every synthetic image has background
    for label in range(1, len(pixels)):
        with_label = sum(np.any(record_to_label_map(r) == label) for r in records)
        assert images[label] == with_label

    cfg = setup["cfg"]
    model = build_model(cfg)
    SafeCheckpointer(model).load_for_inference(setup["weights"])
    (score,) = predict_records(
        SemSegPredictor(cfg, model),
        records,
        dataset_file_names(DATASET),
        [ScoreSink(DATASET)],
        progress=False,
    )
    iou_rows = parse(setup["full"]).tables["class-iou"]
    for name, text in zip(MetadataCatalog.get(DATASET).stuff_classes, column(iou_rows, 1)):
        expected = score[f"IoU-{name}"]
        assert text == ("n/a" if np.isnan(expected) else f"{expected:.4f}")
    assert f"{score['mIoU']:.4f}" in Path(setup["full"]).read_text(encoding="utf-8")


def test_worst_images_are_the_lowest_per_image_miou(setup):
    records = DatasetCatalog.get(DATASET)
    names = dataset_file_names(DATASET)
    sink = EvaluationSink(DATASET, worst_k=1)
    for index, record in enumerate(records):
        gt = record_to_label_map(record)
        # image 1 predicted all background, the others perfectly
        sink.add(names[record["image_id"]], np.zeros_like(gt) if index == 1 else gt)
    result = sink.close()
    gt = record_to_label_map(records[1])
    present = np.unique(gt)
    # background IoU = its pixel share; every other class present in the image scores 0
    expected = np.mean([(gt == 0).mean() if c == 0 else 0.0 for c in present])
    assert [m for _, m in result.per_image] == pytest.approx([1.0, expected, 1.0])
    ((file_name, _, miou, labels),) = result.worst
    assert file_name == names[records[1]["image_id"]] and miou == pytest.approx(expected)
    assert not labels.any()


def test_label_map_objects_are_connected_components_without_the_ignore_label():
    label_map = np.zeros((6, 8), dtype=np.uint8)
    label_map[0:2, 0:2] = 1
    label_map[4:6, 5:8] = 1
    label_map[3, 3] = 2
    label_map[2, 2] = 2  # diagonal neighbour: same 8-connected object
    label_map[5, 0] = 255
    objects = sorted(label_map_objects(label_map, num_classes=3, ignore_label=255))
    assert objects == [(0, 48 - 4 - 6 - 2 - 1), (1, 4), (1, 6), (2, 2)]


def chromium_screenshot(page, tmp_path):
    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("Chromium is not installed: apt-get install chromium")
    png = tmp_path / "screenshot.png"
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--force-color-profile=srgb",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={png}",
        "--window-size=1200,3000",
        "--enable-logging=stderr",
        "--v=0",
        Path(page).resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console
    screenshot = cv2.imread(str(png), cv2.IMREAD_COLOR)
    assert screenshot is not None, proc.stderr[-3000:]
    return screenshot


def test_report_renders_in_headless_chromium(setup, tmp_path):
    screenshot = chromium_screenshot(setup["full"], tmp_path)  # BGR
    meta = MetadataCatalog.get(DATASET)
    rows = parse(setup["full"]).tables["class-distribution"]
    pixels = [int(v) for v in column(rows, 1)]
    flat = screenshot.reshape(-1, 3)
    # the bars and swatches of the class table, in the classes' exact palette colours
    for label, (r, g, b) in enumerate(meta.stuff_colors):
        if pixels[label] and (r, g, b) != (0, 0, 0):
            count = int(np.all(flat == (b, g, r), axis=1).sum())
            assert count >= 100, f"{meta.stuff_classes[label]}: {count} pixels of its colour"
    # the worst image panels are displayed: each is found in the screenshot
    page = parse(setup["full"])
    panels = [decode_data_uri(i["src"]) for i in page.images if "image/jpeg" in i["src"][:20]]
    assert len(panels) == WORST
    for panel in panels:
        match = cv2.matchTemplate(screenshot, panel, cv2.TM_CCOEFF_NORMED)
        assert match.max() > 0.95, f"panel not visible (best match {match.max():.3f})"


def test_label_map_dataset_statistics_and_out_of_range_labels(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    label_map = np.zeros((8, 8), dtype=np.uint8)
    label_map[1:3, 1:3] = 1
    label_map[5:7, 5:8] = 1
    label_map[0, 7] = 255
    cv2.imwrite(str(images / "a.png"), np.full((8, 8, 3), 128, np.uint8))
    cv2.imwrite(str(labels / "a.png"), label_map)
    register_labelmap_semseg("report_labelmap", str(images), str(labels), ["bg", "thing"], 255)
    stats = dataset_statistics("report_labelmap", progress=False)
    assert stats.pixels_per_class.tolist() == [64 - 4 - 6 - 1, 10]
    assert stats.objects_per_image.tolist() == [3] and stats.object_source == "connected components"
    assert sorted(stats.object_areas.tolist()) == [4, 6, 64 - 4 - 6 - 1]

    label_map[0, 0] = 2  # not a class of the dataset
    cv2.imwrite(str(labels / "a.png"), label_map)
    register_labelmap_semseg("report_labelmap_bad", str(images), str(labels), ["bg", "thing"], 255)
    with pytest.raises(ValueError, match=r"a\.png: label 2 is outside the dataset's 2 classes"):
        dataset_statistics("report_labelmap_bad", progress=False)
