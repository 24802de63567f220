"""COCO polygons -> label map: the pycocotools loop baseline vs ``polygons_to_label_map``.

Uses the real annotations of TACO (``../shared/data/taco/annotations.json``, full-resolution
sizes up to 4000 px; no images needed: label maps are built at the json's sizes).

* baseline (the competition baseline's loop): per image, annotations sorted by area (largest
  first), ``mask = coco.annToMask(ann); label[mask == 1] = label_id``;
* ours: ``mask2former.data.masks.rasterize.polygons_to_label_map(anns, h, w, "area_desc")``,
  with the scan and fill of each ``--impls`` entry: "cpu" (the compiled kernels, which paint all
  polygon annotations of an image in one call), "numpy";
* with "cpu" in ``--impls``, also the compiled scan and fill called one annotation at a time
  (``polygon_mask`` of each annotation, in the same order, painted into the map by NumPy), the
  way ``polygons_to_label_map`` used them before the one-call painting.

Any COCO polygon json can be given with ``--json``, e.g. CamVid's label maps traced to polygons
(many small staircase polygons per image): ``m2f-labelmap-to-coco --labels
../shared/data/camvid/train/labels --output camvid.json --ignore-label 11 --no-background
--num-classes 11``.

Prints images/s and Mpx/s of each (median over repeats; the label maps are built and dropped
image by image, as a data loader does), the speed-ups over the loop and the agreement with it
(fraction of identical pixels over all images).

    python benchmarks/bench_rasterize.py [--images 300] [--repeats 3] [--json PATH]
        [--impls cpu numpy]
"""

import argparse
import contextlib
import functools
import io
import json
import statistics
import time
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

from mask2former.data.masks.rasterize import (
    RASTERIZE_IMPLS,
    draw_order_indices,
    polygon_mask,
    polygons_to_label_map,
)

DEFAULT_JSON = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "taco" / "annotations.json"
)


def load(json_file, n_images):
    with open(json_file) as f:
        data = json.load(f)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    label_of = {
        c["id"]: i + 1 for i, c in enumerate(sorted(data["categories"], key=lambda c: c["id"]))
    }
    images = [img for img in data["images"] if coco.imgToAnns.get(img["id"])][:n_images]
    return coco, images, label_of


def baseline(coco, label_of, img):
    label = np.zeros((img["height"], img["width"]), dtype=np.uint8)
    for ann in sorted(coco.imgToAnns[img["id"]], key=lambda a: -a["area"]):
        mask = coco.annToMask(ann)
        label[mask == 1] = label_of[ann["category_id"]]
    return label


def ours(anns, img, impl):
    return polygons_to_label_map(anns, img["height"], img["width"], "area_desc", impl=impl)


def per_annotation(anns, img):
    """The compiled scan and fill called one annotation at a time (``polygon_mask``)."""
    height, width = img["height"], img["width"]
    label = np.full((height, width), 0, dtype=np.uint8)  # as polygons_to_label_map does
    for index in draw_order_indices(anns, height, width, "area_desc"):
        mask, box = polygon_mask(anns[index]["segmentation"], height, width, "cpu")
        if mask is not None:
            r0, r1, c0, c1 = box
            np.copyto(label[r0:r1, c0:c1], anns[index]["category_id"], where=mask)
    return label


def timed(label_map, per_image, images, repeats):
    """Median seconds to build every image's label map with ``label_map(anns, img)`` (the maps
    are not kept: each run allocates as a data loader does)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for anns, img in zip(per_image, images):
            label_map(anns, img)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", default=str(DEFAULT_JSON))
    parser.add_argument("--images", type=int, default=300, help="first N annotated images")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--impls", nargs="+", default=["cpu", "numpy"], choices=RASTERIZE_IMPLS)
    args = parser.parse_args()

    coco, images, label_of = load(args.json, args.images)
    per_image = [
        [dict(a, category_id=label_of[a["category_id"]]) for a in coco.imgToAnns[img["id"]]]
        for img in images
    ]
    megapixels = sum(img["height"] * img["width"] for img in images) / 1e6
    n_anns = sum(len(a) for a in per_image)
    print(
        f"{len(images)} images, {n_anns} annotations, "
        f"{megapixels:.0f} Mpx, {args.repeats} repeats (median)"
    )

    def loop(anns, img):
        return baseline(coco, label_of, img)

    reference = [loop(anns, img) for anns, img in zip(per_image, images)]
    variants = [("pycocotools loop", loop)]
    for impl in args.impls:
        variants.append((f"polygons_to_label_map {impl}", functools.partial(ours, impl=impl)))
        if impl == "cpu":
            variants.append(("cpu, one annotation per call", per_annotation))
    rows = [
        (name, timed(label_map, per_image, images, args.repeats), label_map)
        for name, label_map in variants
    ]
    t_base = rows[0][1]
    for name, t, label_map in rows:
        line = f"{name:>30}: {len(images) / t:7.1f} images/s  {megapixels / t:7.1f} Mpx/s  "
        line += f"({t:.2f} s)"
        if name != "pycocotools loop":
            same = differing = 0
            for anns, img, expected in zip(per_image, images, reference):
                equal = label_map(anns, img) == expected
                same += int(equal.sum())
                differing += int(not equal.all())
            total = sum(a.size for a in reference)
            line += f"  {t_base / t:.1f}x; {same / total:.9f} of pixels identical "
            line += f"({differing} images differ)"
        print(line)


if __name__ == "__main__":
    main()
