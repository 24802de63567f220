"""The competition's submission CSV.

Format::

    image_id,PredictionString
    batch_01_vt/0021.jpg,0 0 0 10 10 ...     <- 65536 space-separated labels
    ...

* ``image_id`` is the image's ``file_name`` exactly as written in test.json (relative path);
* rows follow the order of the images in test.json;
* ``PredictionString`` is the argmax label map at the original size, resized to 256x256 with
  nearest-neighbour sampling (:func:`resize_nearest`, the convention of ``cv2.resize`` with
  ``INTER_NEAREST`` used by the competition baseline through albumentations), flattened row-major.

:class:`SubmissionWriter` collects the predictions as they arrive (in any order, optionally from
several processes) and writes the file atomically when closed; :func:`read_submission` reads one
back for checks.
"""

import csv
import functools

import numpy as np
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

from ..utils.io import atomic_write

__all__ = [
    "HEADER",
    "SubmissionWriter",
    "format_prediction",
    "nearest_indices",
    "read_submission",
    "resize_nearest",
]

HEADER = "image_id,PredictionString"
# Largest label the writer accepts (masks are kept as uint8 / uint16).
_MAX_LABEL = np.iinfo(np.uint16).max


def nearest_indices(src_size, dst_size):
    """Source index sampled by each of ``dst_size`` output positions (nearest-neighbour resize).

    ``index[i] = min(floor(i * s), src_size - 1)`` with ``s = 1 / (dst_size / src_size)`` computed
    in IEEE double precision, which is exactly what ``cv2.resize(..., INTER_NEAREST)`` does (pixel
    corners aligned, no half-pixel offset; for 512 -> 256 this takes every other pixel starting at
    0). It equals the exact ``floor(i * src_size / dst_size)`` except where the double product
    rounds just below an integer; those cases follow OpenCV too.
    """
    if src_size < 1 or dst_size < 1:
        raise ValueError(f"sizes must be positive, got {src_size} -> {dst_size}")
    scale = 1.0 / (dst_size / src_size)
    index = np.floor(np.arange(dst_size, dtype=np.float64) * scale).astype(np.int64)
    return np.minimum(index, src_size - 1)


def resize_nearest(label_map, size=256):
    """Resize a (H, W) label map to ``size`` (int: square, or (height, width)), see
    :func:`nearest_indices`. Works for any dtype; labels are copied, never interpolated."""
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise ValueError(f"label map must be 2-D (H, W), got shape {label_map.shape}")
    height, width = (size, size) if np.isscalar(size) else size
    rows = nearest_indices(label_map.shape[0], height)
    cols = nearest_indices(label_map.shape[1], width)
    return label_map.take(rows, axis=0).take(cols, axis=1)


@functools.cache
def _token_table(dtype_name):
    """Every value of uint8 / uint16 -> its decimal digits and a space, NUL-padded to 4 / 8 bytes,
    viewed as one uint32 / uint64 per value (so a gather copies a whole token at once)."""
    num_values, width, item = {"uint8": (256, 4, np.uint32), "uint16": (65536, 8, np.uint64)}[
        dtype_name
    ]
    table = np.zeros((num_values, width), dtype=np.uint8)
    for value in range(num_values):
        token = f"{value} ".encode()
        table[value, : len(token)] = np.frombuffer(token, dtype=np.uint8)
    return table.view(item).ravel()


def _compact(mask):
    """``mask`` as uint8 (labels < 256) or uint16, after checking it holds labels in range."""
    mask = np.asarray(mask)
    if not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {mask.dtype}")
    if mask.size == 0:
        return mask.astype(np.uint8)
    low, high = int(mask.min()), int(mask.max())
    if low < 0 or high > _MAX_LABEL:
        raise ValueError(f"labels must lie in [0, {_MAX_LABEL}], found [{low}, {high}]")
    return mask.astype(np.uint8 if high < 256 else np.uint16, copy=False)


def format_prediction(mask):
    """Row-major flattening of an integer mask as ASCII bytes: labels separated by one space.

    Equal to ``" ".join(str(v) for v in mask.ravel()).encode()``, computed with a lookup table of
    the byte tokens of every label (one gather, then the padding bytes dropped).
    """
    flat = _compact(mask).ravel()
    if flat.size == 0:
        return b""
    tokens = _token_table(flat.dtype.name).take(flat)
    return tokens.view(np.uint8).tobytes().translate(None, b"\0")[:-1]


def _csv_field(text):
    """CSV quoting of one field (quotes only when needed, like pandas / the csv module)."""
    if any(c in text for c in ',"'):
        return '"' + text.replace('"', '""') + '"'
    return text


class SubmissionWriter:
    """Collect argmax label maps and write the submission CSV atomically when closed.

    Example::

        names = list(coco_image_names("data/test.json").values())
        with SubmissionWriter("out/submission.csv", names) as writer:
            for name, label_map in predictions:        # any order
                writer.add(name, label_map)           # (H, W) labels at the original size
        # the file exists now, rows in test.json order; nothing is written if the block raised

    Each label map is resized to ``size`` x ``size`` at :meth:`add` and kept in memory as uint8
    (64 KB per image for 256x256; 53 MB for the 819 test images). :meth:`close` checks that every
    image was given exactly once, formats the rows in the order of ``image_names``, checks each row
    holds ``size * size`` values and moves the file into place. With ``distributed=True``, every
    process adds its share and calls :meth:`close`; the masks are gathered to the main process,
    which alone validates and writes (every process must reach :meth:`close`, as for any
    collective call).
    """

    def __init__(self, path, image_names, size=256, distributed=False):
        """
        Args:
            path (str): output CSV path (local).
            image_names (sequence of str): the ``image_id`` of every row, in output order (the
                ``file_name`` values of test.json, see
                :func:`~mask2former.data.coco.coco_image_names`).
            size (int): side of the resized masks.
            distributed (bool): gather the masks of all processes at :meth:`close`.
        """
        self._path = path
        self._size = int(size)
        self._distributed = distributed
        self._image_names = list(image_names)
        self._positions = {name: i for i, name in enumerate(self._image_names)}
        if len(self._positions) != len(self._image_names):
            raise ValueError("image_names contains duplicates")
        bad = [name for name in self._image_names if "\n" in name or "\r" in name]
        if bad:
            raise ValueError(f"image names cannot contain line breaks: {bad[:3]}")
        self._masks = {}
        self._closed = False

    @property
    def path(self):
        return self._path

    def __len__(self):
        """Number of masks added in this process."""
        return len(self._masks)

    def add(self, image_name, label_map):
        """Add the (H, W) argmax label map of ``image_name`` (numpy array or CPU tensor)."""
        if self._closed:
            raise RuntimeError("SubmissionWriter is closed")
        if image_name not in self._positions:
            raise KeyError(f"{image_name!r} is not one of the submission's images")
        if image_name in self._masks:
            raise ValueError(f"{image_name!r} was added twice")
        self._masks[image_name] = _compact(resize_nearest(label_map, self._size))

    def close(self):
        """Validate and write the file (main process). Returns the path on the main process,
        None on the others. Raises ValueError (and writes nothing) if images are missing or
        given twice."""
        if self._closed:
            raise RuntimeError("SubmissionWriter is already closed")
        self._closed = True
        masks = self._gather()
        if masks is None:
            return None
        missing = [name for name in self._image_names if name not in masks]
        if missing:
            raise ValueError(
                f"submission {self._path}: {len(missing)} of {len(self._image_names)} images have "
                f"no prediction, e.g. {missing[:5]}"
            )
        num_values = self._size * self._size
        with atomic_write(self._path, "wb") as f:
            f.write(HEADER.encode() + b"\n")
            for name in self._image_names:
                row = format_prediction(masks[name])
                if row.count(b" ") != num_values - 1:
                    raise ValueError(f"row of {name!r} does not hold {num_values} values")
                f.write(_csv_field(name).encode() + b"," + row + b"\n")
        return self._path

    def _gather(self):
        """All masks on the main process (None elsewhere), refusing an image given twice."""
        if not (self._distributed and comm.get_world_size() > 1):
            return self._masks
        gathered = comm.gather(self._masks, dst=0)
        if not comm.is_main_process():
            return None
        merged = {}
        for part in gathered:
            twice = merged.keys() & part.keys()
            if twice:
                raise ValueError(f"images predicted by more than one process: {sorted(twice)[:5]}")
            merged.update(part)
        return merged

    def discard(self):
        """Drop everything without writing (the previous file at ``path``, if any, is kept)."""
        self._masks = {}
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback):
        if exc_type is None:
            self.close()
        else:
            self.discard()
        return False


def read_submission(path, size=256):
    """Read a submission CSV back.

    Returns:
        (image_ids, masks): the list of ``image_id`` strings in file order and a
        (N, size, size) uint8 array (uint16 if a label exceeds 255).

    Raises:
        ValueError: wrong header, or a row that does not hold ``size * size`` labels in
            [0, 65535].
    """
    with PathManager.open(path, "r") as f:
        lines = f.read().splitlines()
    if not lines or lines[0] != HEADER:
        raise ValueError(f"{path}: header must be {HEADER!r}, got {lines[0] if lines else ''!r}")
    num_values = size * size
    image_ids, masks = [], []
    for line_number, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        if "," not in line:
            raise ValueError(f"{path}:{line_number}: no ',' between image_id and PredictionString")
        name_field, prediction = line.rsplit(",", 1)
        name = next(csv.reader([name_field]))[0] if name_field else ""
        try:
            values = np.fromstring(prediction, dtype=np.int64, sep=" ")
        except ValueError as e:
            raise ValueError(f"{path}:{line_number} ({name!r}): unreadable labels") from e
        if values.size != num_values:
            raise ValueError(
                f"{path}:{line_number} ({name!r}): {values.size} labels, expected {num_values}"
            )
        if values.min() < 0 or values.max() > _MAX_LABEL:
            raise ValueError(f"{path}:{line_number} ({name!r}): labels outside [0, {_MAX_LABEL}]")
        image_ids.append(name)
        masks.append(_compact(values.reshape(size, size)))
    if not masks:
        return image_ids, np.zeros((0, size, size), dtype=np.uint8)
    dtype = np.uint16 if any(m.dtype == np.uint16 for m in masks) else np.uint8
    return image_ids, np.stack(masks).astype(dtype, copy=False)
