"""COCO polygons -> label map: the pycocotools loop baseline vs ``polygons_to_label_map``.

Uses the real annotations of TACO (``../shared/data/taco/annotations.json``, full-resolution
sizes up to 4000 px; no images needed: label maps are built at the json's sizes).

* baseline (the competition baseline's loop): per image, annotations sorted by area (largest
  first), ``mask = coco.annToMask(ann); label[mask == 1] = label_id``;
* ours: ``mask2former.data.masks.rasterize.polygons_to_label_map(anns, h, w, "area_desc")``,
  with the scan and fill of each ``--impls`` entry: "cpu" (the compiled kernels), "numpy".

Prints images/s and Mpx/s of each (median over repeats), the speed-ups over the loop and the
agreement with it (fraction of identical pixels over all images).

    python benchmarks/bench_rasterize.py [--images 300] [--repeats 3] [--json PATH]
        [--impls cpu numpy]
"""

import argparse
import contextlib
import io
import json
import statistics
import time
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

from mask2former.data.masks.rasterize import RASTERIZE_IMPLS, polygons_to_label_map

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


def baseline(coco, images, label_of):
    out = []
    for img in images:
        label = np.zeros((img["height"], img["width"]), dtype=np.uint8)
        for ann in sorted(coco.imgToAnns[img["id"]], key=lambda a: -a["area"]):
            mask = coco.annToMask(ann)
            label[mask == 1] = label_of[ann["category_id"]]
        out.append(label)
    return out


def ours(per_image_annotations, images, impl):
    return [
        polygons_to_label_map(anns, img["height"], img["width"], "area_desc", impl=impl)
        for anns, img in zip(per_image_annotations, images)
    ]


def timed(fn, repeats):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


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

    t_base, ref = timed(lambda: baseline(coco, images, label_of), args.repeats)
    rows = [("pycocotools loop", t_base, None)]
    for impl in args.impls:
        t_ours, res = timed(lambda impl=impl: ours(per_image, images, impl), args.repeats)
        rows.append((f"polygons_to_label_map {impl}", t_ours, res))
    for name, t, res in rows:
        line = f"{name:>27}: {len(images) / t:7.1f} images/s  {megapixels / t:7.1f} Mpx/s  "
        line += f"({t:.2f} s)"
        if res is not None:
            same = sum(int((a == b).sum()) for a, b in zip(ref, res))
            total = sum(a.size for a in ref)
            differing = sum(int(not np.array_equal(a, b)) for a, b in zip(ref, res))
            line += f"  {t_base / t:.1f}x; {same / total:.9f} of pixels identical "
            line += f"({differing} images differ)"
        print(line)


if __name__ == "__main__":
    main()
