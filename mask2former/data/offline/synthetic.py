"""Deterministic synthetic trash dataset in the exact competition format.

Writes ``train_all.json`` (= train + val), ``train.json``, ``val.json``, ``test.json`` (images,
no annotations) and RGB JPEG images under batch folders (``batch_01_vt/0002.jpg``, ``file_name``
relative to the root), with the 10 competition categories (ids 1..10, exact names).

Each class has its own shape and colour / texture so that a tiny model can learn it:

==============  ==========================================================================
General trash   spiky crumpled blob, dark grey-brown with speckles
Paper           light rectangle with blue ruled lines
Paper pack      gable-top carton, tan with a dark band and a printed square
Metal           rounded can, silver with vertical metallic stripes
Glass           bottle (body + neck polygons), translucent green with a highlight
Plastic         trapezoid cup, saturated blue with white highlights
Styrofoam       smooth round blob, white with bead dots
Plastic bag     large smooth blob, translucent pale yellow with wrinkle stripes
Battery         small rounded rectangle with a cap (2 polygons), black / orange
Clothing        large soft blob with a red / purple plaid
==============  ==========================================================================

Objects lie on cluttered textured backgrounds and often overlap. Images are composed in the
``area_desc`` draw order of :mod:`.rasterize` and every object is painted exactly through its
rasterised polygons, so the ground truth rebuilt from the json matches the pixels.
Every image has its own random stream (seed, image index): the same seed gives byte-identical
output (same library versions). The output folder is built in a temporary folder next to it and
renamed into place.
"""

import json
import math
import os

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from ...utils.io import atomic_directory
from ..catalog.trash import TRASH_CLASSES
from ..masks.rasterize import draw_order_indices, polygon_mask

__all__ = ["generate_synthetic_trash", "render_synthetic_image"]

_JPEG_QUALITY = 92


# ------------------------------------------------------------------------------- shapes
# Each shape function returns polygons (list of N x 2 arrays) in an object frame centred at 0,
# for an object of nominal length L (pixels): u across, v along the object.


def _radial_blob(length, rng, roughness, spikes=0.0, n_points=28):
    angles = np.sort(rng.uniform(0, 2 * np.pi, n_points))
    radius = np.ones(n_points)
    for k in (2, 3, 5):
        radius += roughness * rng.uniform(-1, 1) * np.cos(k * angles + rng.uniform(0, 2 * np.pi))
    if spikes:
        radius += spikes * rng.uniform(-1, 1, n_points)
    radius = np.clip(radius, 0.35, None) * length / 2
    return [np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)]


def _rect(w, h, cx=0.0, cy=0.0):
    return np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]]) + (cx, cy)


def _rounded_rect(w, h, r, cx=0.0, cy=0.0, n_arc=4):
    corners = (
        (w / 2 - r, h / 2 - r, 0.0),
        (-w / 2 + r, h / 2 - r, 0.5),
        (-w / 2 + r, -h / 2 + r, 1.0),
        (w / 2 - r, -h / 2 + r, 1.5),
    )
    points = []
    for x, y, start in corners:
        for a in np.linspace(start * np.pi, (start + 0.5) * np.pi, n_arc):
            points.append((x + r * np.cos(a), y + r * np.sin(a)))
    return np.array(points) + (cx, cy)


def _shape_general_trash(length, rng):
    return _radial_blob(length, rng, roughness=0.15, spikes=0.25, n_points=36)


def _shape_paper(length, rng):
    return [_rect(length * rng.uniform(0.65, 0.85), length)]


def _shape_paper_pack(length, rng):
    w, h = length * 0.6, length
    return [
        np.array(
            [
                [-w / 2, h / 2],
                [w / 2, h / 2],
                [w / 2, -h / 2 + 0.2 * length],
                [0, -h / 2],
                [-w / 2, -h / 2 + 0.2 * length],
            ]
        )
    ]


def _shape_metal(length, rng):
    return [_rounded_rect(length * 0.55, length, length * 0.12)]


def _shape_glass(length, rng):
    body = _rounded_rect(length * 0.38, length * 0.68, length * 0.1, cy=length * 0.16)
    neck = _rect(length * 0.15, length * 0.36, cy=-length * 0.32)
    return [body, neck]


def _shape_plastic(length, rng):
    top, bottom, h = length * 0.7, length * 0.48, length
    return [
        np.array([[-top / 2, -h / 2], [top / 2, -h / 2], [bottom / 2, h / 2], [-bottom / 2, h / 2]])
    ]


def _shape_styrofoam(length, rng):
    return _radial_blob(length, rng, roughness=0.08, n_points=24)


def _shape_plastic_bag(length, rng):
    return _radial_blob(length, rng, roughness=0.22, n_points=32)


def _shape_battery(length, rng):
    body = _rounded_rect(length * 0.42, length, length * 0.08, cy=length * 0.06)
    cap = _rect(length * 0.2, length * 0.14, cy=-length * 0.5)
    return [body, cap]


def _shape_clothing(length, rng):
    return _radial_blob(length, rng, roughness=0.18, n_points=30)


# ------------------------------------------------------------------------------- textures
# Each texture function maps object-frame pixel coordinates (u, v) to RGB (float, h x w x 3).


def _noise(rng, shape, sigma):
    return rng.normal(0.0, sigma, shape + (3,))


def _solid(color, u):
    return np.broadcast_to(np.asarray(color, dtype=np.float64), u.shape + (3,)).copy()


def _tex_general_trash(u, v, length, rng):
    tex = _solid((75, 68, 60), u) + rng.normal(0, 28, u.shape)[..., None]
    return tex + _noise(rng, u.shape, 8)


def _tex_paper(u, v, length, rng):
    tex = _solid((236, 234, 226), u)
    period = max(length / 8, 3.0)
    lines = np.mod(v, period) < max(period * 0.18, 1.0)
    tex[lines] = (95, 125, 215)
    return tex + _noise(rng, u.shape, 4)


def _tex_paper_pack(u, v, length, rng):
    tex = _solid((204, 160, 108), u)
    tex[np.abs(v - length * 0.1) < length * 0.12] = (105, 65, 38)
    printed = (np.abs(u) < length * 0.12) & (np.abs(v - length * 0.32) < length * 0.09)
    tex[printed] = rng.uniform(40, 230, 3)
    return tex + _noise(rng, u.shape, 5)


def _tex_metal(u, v, length, rng):
    shade = 150 + 75 * np.cos(u / (length * 0.55) * 2.5 * np.pi)
    tex = np.stack([shade, shade + 5, shade + 15], axis=-1)
    tex[np.abs(v + length * 0.4) < length * 0.04] = (110, 110, 120)
    return tex + _noise(rng, u.shape, 4)


def _tex_glass(u, v, length, rng):
    tex = _solid((35, 140, 65), u)
    tex[np.abs(u + length * 0.09) < length * 0.03] = (215, 245, 220)
    return tex + _noise(rng, u.shape, 3)


def _tex_plastic(u, v, length, rng):
    tex = _solid((30, 90, 230), u)
    tex[np.abs(np.mod(u + v, length * 0.35) - length * 0.05) < length * 0.025] = (240, 245, 255)
    return tex + _noise(rng, u.shape, 4)


def _tex_styrofoam(u, v, length, rng):
    tex = _solid((246, 246, 242), u)
    period = max(length / 10, 3.0)
    du, dv = np.mod(u, period) - period / 2, np.mod(v, period) - period / 2
    tex[du * du + dv * dv < (period * 0.25) ** 2] = (212, 212, 208)
    return tex + _noise(rng, u.shape, 3)


def _tex_plastic_bag(u, v, length, rng):
    wrinkle = 25 * np.sin(v / length * 14 + np.sin(u / length * 5) * 2)
    tex = _solid((232, 222, 150), u) + wrinkle[..., None]
    return tex + _noise(rng, u.shape, 4)


def _tex_battery(u, v, length, rng):
    tex = _solid((28, 28, 30), u)
    tex[v < 0] = (222, 125, 32)
    tex[v < -length * 0.43] = (175, 175, 180)
    return tex + _noise(rng, u.shape, 4)


def _tex_clothing(u, v, length, rng):
    period = max(length / 6, 4.0)
    band = max(period * 0.3, 1.5)
    tex = _solid((155, 32, 62), u)
    tex[(np.mod(u, period) < band) | (np.mod(v, period) < band)] = (70, 25, 125)
    return tex + _noise(rng, u.shape, 6)


# class id -> (shape, texture, opacity, size range as a fraction of the image side)
_CLASSES = {
    1: (_shape_general_trash, _tex_general_trash, 1.0, (0.14, 0.26)),
    2: (_shape_paper, _tex_paper, 1.0, (0.18, 0.32)),
    3: (_shape_paper_pack, _tex_paper_pack, 1.0, (0.16, 0.28)),
    4: (_shape_metal, _tex_metal, 1.0, (0.12, 0.2)),
    5: (_shape_glass, _tex_glass, 0.6, (0.2, 0.32)),
    6: (_shape_plastic, _tex_plastic, 1.0, (0.14, 0.24)),
    7: (_shape_styrofoam, _tex_styrofoam, 1.0, (0.14, 0.26)),
    8: (_shape_plastic_bag, _tex_plastic_bag, 0.8, (0.3, 0.45)),
    9: (_shape_battery, _tex_battery, 1.0, (0.07, 0.11)),
    10: (_shape_clothing, _tex_clothing, 1.0, (0.32, 0.5)),
}


# ------------------------------------------------------------------------------- composition


def _background(size, rng):
    """Muted floor-like texture: smooth shading, small colour drift, clutter lines and chips."""
    base = rng.uniform(80, 160) + rng.uniform(-25, 25, 3)
    shade = cv2.resize(rng.normal(0, 28, (6, 6)), (size, size), interpolation=cv2.INTER_CUBIC)
    tint = cv2.resize(rng.normal(0, 8, (4, 4, 3)), (size, size), interpolation=cv2.INTER_CUBIC)
    img = base + shade[..., None] + tint
    for _ in range(int(rng.integers(10, 30))):
        tone = float(rng.uniform(40, 200))
        color = tuple(float(c) for c in tone + rng.uniform(-12, 12, 3))
        p1 = tuple(int(c) for c in rng.integers(0, size, 2))
        if rng.random() < 0.5:
            p2 = tuple(int(c) for c in rng.integers(0, size, 2))
            cv2.line(img, p1, p2, color, int(rng.integers(1, max(2, size // 64) + 1)))
        else:
            half = rng.integers(2, max(3, size // 24), 2)
            cv2.rectangle(img, p1, (int(p1[0] + half[0]), int(p1[1] + half[1])), color, -1)
    return img + _noise(rng, (size, size), 6)


def _place(polygons, size, rng, center):
    """Rotate the object, move it to ``center`` and keep it inside the image."""
    angle = rng.uniform(0, 2 * np.pi)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    placed = [p @ rot.T + center for p in polygons]
    allpts = np.concatenate(placed)
    lo, hi = allpts.min(0), allpts.max(0)
    scale = min(1.0, (size - 1) / max(float((hi - lo).max()), 1e-6))
    if scale < 1.0:
        placed = [(p - center) * scale + center for p in placed]
        allpts = np.concatenate(placed)
        lo, hi = allpts.min(0), allpts.max(0)
    shift = np.maximum(0.0, 0.5 - lo) - np.maximum(0.0, hi - (size - 0.5))
    placed = [np.round(p + shift, 1) for p in placed]
    return placed, angle, center + shift, scale


def _sample_objects(size, rng, first_class, objects_per_image):
    """Annotations (json order) plus drawing parameters for one image."""
    n_objects = int(rng.integers(objects_per_image[0], objects_per_image[1] + 1))
    objects = []
    for k in range(n_objects):
        category = first_class if k == 0 else int(rng.integers(1, len(_CLASSES) + 1))
        shape, texture, opacity, (lo, hi) = _CLASSES[category]
        length = rng.uniform(lo, hi) * size
        if objects and rng.random() < 0.5:
            # Overlap a previous object.
            center = objects[int(rng.integers(len(objects)))]["center"] + rng.normal(
                0, length / 3, 2
            )
        else:
            center = rng.uniform(0.1, 0.9, 2) * size
        polygons, angle, center, scale = _place(shape(length, rng), size, rng, center)
        objects.append(
            dict(
                category_id=category,
                segmentation=[p.reshape(-1).tolist() for p in polygons],
                center=center,
                angle=angle,
                length=length * scale,
                texture=texture,
                opacity=opacity,
            )
        )
    return objects


def render_synthetic_image(size, rng, first_class=1, objects_per_image=(1, 5)):
    """One synthetic image and its annotations.

    Returns:
        (image, annotations): uint8 H x W x 3 RGB array and a list of dicts with
        ``category_id``, ``segmentation``, ``area`` (pixel count of the union of its polygons)
        and ``bbox``, in json order.
    """
    img = _background(size, rng)
    objects = _sample_objects(size, rng, first_class, objects_per_image)
    annotations = []
    for obj in objects:
        mask, box = polygon_mask(obj["segmentation"], size, size)
        annotations.append(
            dict(
                category_id=obj["category_id"], segmentation=obj["segmentation"], mask=mask, box=box
            )
        )
    for index in draw_order_indices(annotations, size, size, "area_desc"):
        obj, ann = objects[index], annotations[index]
        if ann["mask"] is None:
            continue
        r0, r1, c0, c1 = ann["box"]
        yy, xx = np.mgrid[r0:r1, c0:c1] + 0.5
        dx, dy = xx - obj["center"][0], yy - obj["center"][1]
        cos, sin = math.cos(obj["angle"]), math.sin(obj["angle"])
        u, v = cos * dx + sin * dy, -sin * dx + cos * dy
        tex = obj["texture"](u, v, obj["length"], rng)
        region = img[r0:r1, c0:c1]
        region[ann["mask"]] = (
            obj["opacity"] * tex[ann["mask"]] + (1 - obj["opacity"]) * region[ann["mask"]]
        )
    out = []
    for ann in annotations:
        flat = np.concatenate([np.asarray(p) for p in ann["segmentation"]]).reshape(-1, 2)
        lo, hi = flat.min(0), flat.max(0)
        out.append(
            dict(
                category_id=ann["category_id"],
                segmentation=ann["segmentation"],
                area=float(ann["mask"].sum()) if ann["mask"] is not None else 0.0,
                bbox=[
                    round(float(lo[0]), 1),
                    round(float(lo[1]), 1),
                    round(float(hi[0] - lo[0]), 1),
                    round(float(hi[1] - lo[1]), 1),
                ],
            )
        )
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), out


def _categories():
    return [
        {"id": i, "name": name, "supercategory": name}
        for i, name in enumerate(TRASH_CLASSES)
        if i > 0
    ]


def _coco_json(entries, with_annotations):
    """COCO dict for ``entries`` = [(file_name, size, annotations)], ids 0-based in order."""
    images, annotations = [], []
    for image_id, (file_name, size, anns) in enumerate(entries):
        images.append(
            {
                "width": size,
                "height": size,
                "file_name": file_name,
                "license": 0,
                "flickr_url": None,
                "coco_url": None,
                "date_captured": None,
                "id": image_id,
            }
        )
        if not with_annotations:
            continue
        for ann in anns:
            annotations.append(
                {
                    "id": len(annotations),
                    "image_id": image_id,
                    "category_id": ann["category_id"],
                    "segmentation": ann["segmentation"],
                    "area": ann["area"],
                    "bbox": ann["bbox"],
                    "iscrowd": 0,
                }
            )
    return {
        "info": {
            "description": "synthetic trash (mask2former.data.offline.synthetic)",
            "version": "1.0",
        },
        "licenses": [{"id": 0, "name": "CC0", "url": None}],
        "images": images,
        "categories": _categories(),
        "annotations": annotations,
    }


def _write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f, separators=(",", ":"))


def generate_synthetic_trash(
    output_dir,
    num_train=80,
    num_val=20,
    num_test=20,
    image_size=512,
    seed=0,
    objects_per_image=(1, 5),
    images_per_batch=100,
    overwrite=False,
    progress=False,
):
    """Write a synthetic dataset in the competition format to ``output_dir``.

    Args:
        output_dir (str): dataset root to create.
        num_train, num_val, num_test (int): images per split (train_all = train + val).
        image_size (int): side of the square images.
        seed (int): random seed; the same seed gives byte-identical files.
        objects_per_image (tuple[int, int]): inclusive range of objects per image.
        images_per_batch (int): images per ``batch_NN_vt`` folder.
        overwrite (bool): replace an existing ``output_dir``.
        progress (bool): show a progress bar.

    Returns:
        dict: number of images per split.
    """
    lo, hi = objects_per_image
    if not 1 <= lo <= hi:
        raise ValueError(f"objects_per_image must satisfy 1 <= min <= max, got {objects_per_image}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir) and not overwrite:
        raise FileExistsError(f"{output_dir} exists (pass overwrite=True to replace it)")
    with atomic_directory(output_dir, overwrite=True) as tmp_dir:
        splits = {"train": [], "val": [], "test": []}
        order = ["train"] * num_train + ["val"] * num_val + ["test"] * num_test
        for index, split in enumerate(tqdm(order, desc="Synthetic trash", disable=not progress)):
            rng = np.random.default_rng([seed, index])
            image, anns = render_synthetic_image(
                image_size, rng, index % len(_CLASSES) + 1, objects_per_image
            )
            file_name = (
                f"batch_{index // images_per_batch + 1:02d}_vt/{index % images_per_batch:04d}.jpg"
            )
            path = os.path.join(tmp_dir, file_name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.fromarray(image).save(path, quality=_JPEG_QUALITY)
            splits[split].append((file_name, image_size, anns))
        _write_json(
            os.path.join(tmp_dir, "train_all.json"),
            _coco_json(splits["train"] + splits["val"], True),
        )
        _write_json(os.path.join(tmp_dir, "train.json"), _coco_json(splits["train"], True))
        _write_json(os.path.join(tmp_dir, "val.json"), _coco_json(splits["val"], True))
        _write_json(os.path.join(tmp_dir, "test.json"), _coco_json(splits["test"], False))
        os.chmod(tmp_dir, 0o755)
    return {"train_all": num_train + num_val, "train": num_train, "val": num_val, "test": num_test}
