#!/usr/bin/env python
"""The end-to-end CPU demo (``make demo``): synthetic data -> training -> LB score -> submission.

1. writes a deterministic synthetic trash dataset in the competition format (128x128 images),
2. trains the tiny Mask2Former of configs/tiny/m2f_swin_tiny_cpu.yaml on CPU with train_net.py
   (multi-scale jitter, colour jitter, flip, LB-style evaluation every 300 iterations; with
   ``--copy-paste`` also the copy-paste bank regenerated at every evaluation),
3. scores the val split LB-style with tools/predict.py (and writes overlay pictures), also with
   test-time augmentation (multi-scale + flip), and compares with the all-background predictor,
4. writes the submission CSV of the test split, with TTA if it scored higher on val.

Every step is a command a user can run by hand; they are printed before they run. Training is
seeded (``SEED`` of the config), so a rerun gives the same figure up to the non-determinism of
multi-threaded CPU kernels.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny" / "m2f_swin_tiny_cpu.yaml"


def run(cmd):
    print("\n$ " + " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)


def train_seed(config: Path) -> int:
    """The SEED training runs with (the config's)."""
    from mask2former.engine import get_project_cfg

    cfg = get_project_cfg()
    cfg.merge_from_file(str(config))
    return cfg.SEED


def all_background_score(data_root: Path):
    """LB mIoU of predicting background everywhere on the val split."""
    from detectron2.data import DatasetCatalog

    from mask2former.data import register_trash_dataset
    from mask2former.data.masks.rasterize import record_to_label_map
    from mask2former.evaluation import confusion_matrix, metrics_from_confusion_matrix

    register_trash_dataset(str(data_root), prefix="demo_baseline")
    total = np.zeros((11, 11), dtype=np.int64)
    for record in DatasetCatalog.get("demo_baseline_val"):
        gt = record_to_label_map(record)
        total += confusion_matrix(gt, np.zeros_like(gt), 11, ignore_label=255)
    return metrics_from_confusion_matrix(total)["mIoU"]


def val_miou(score_dir: Path) -> float:
    """The LB-style mIoU tools/predict.py --score wrote into ``score_dir``."""
    return json.loads((score_dir / "lb_metrics.json").read_text())["metrics"]["mIoU"]


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="output/demo", help="everything is written below this folder")
    p.add_argument("--iters", type=int, default=900, help="training iterations (batch 4)")
    p.add_argument("--num-train", type=int, default=300)
    p.add_argument("--num-val", type=int, default=50)
    p.add_argument("--num-test", type=int, default=50)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument(
        "--copy-paste",
        action="store_true",
        help="train with the copy-paste bank (regenerated at every evaluation)",
    )
    args = p.parse_args(argv)

    out = (ROOT / args.out).resolve()
    data, model_dir = out / "data", out / "model"
    py = sys.executable
    t0 = time.time()

    if (data / "test.json").is_file():
        print(f"synthetic dataset found in {data}")
    else:
        run(
            [
                py,
                "datasets/prepare_synthetic_trash.py",
                "--output",
                data,
                "--num-train",
                args.num_train,
                "--num-val",
                args.num_val,
                "--num-test",
                args.num_test,
                "--image-size",
                args.image_size,
                "--seed",
                0,
            ]
        )
    t_data = time.time()

    run(
        [
            py,
            "train_net.py",
            "--config-file",
            CONFIG,
            "--num-gpus",
            1,
            "DATASETS.TRASH_ROOT",
            data,
            "OUTPUT_DIR",
            model_dir,
            "SOLVER.MAX_ITER",
            args.iters,
            "TEST.EVAL_PERIOD",
            max(args.iters // 3, 1),
            "SOLVER.CHECKPOINT_PERIOD",
            max(args.iters // 3, 1),
            "INPUT.COPY_PASTE.ENABLED",
            args.copy_paste,
            "INPUT.COPY_PASTE.BANK_SIZE",
            100,
        ]
    )
    t_train = time.time()

    weights = model_dir / "model_final.pth"

    def predict(*args):
        """tools/predict.py with the trained weights on the demo data."""
        run([py, "tools/predict.py", "--config-file", CONFIG, "--weights", weights, *args,
             "DATASETS.TRASH_ROOT", data])  # fmt: skip

    predict("--dataset", "trash_val", "--score", "--score-dir", out / "val_score",
            "--overlays", out / "overlays", "--num-overlays", 8)  # fmt: skip
    # the same with test-time augmentation (TEST.AUG.MIN_SIZES of the config + flip)
    predict("--dataset", "trash_val", "--tta", "--score", "--score-dir", out / "val_score_tta")
    miou = val_miou(out / "val_score")
    miou_tta = val_miou(out / "val_score_tta")
    # the submission with whichever scored higher on val
    use_tta = miou_tta > miou
    predict("--dataset", "trash_test", "--submission", out / "submission.csv",
            *(["--tta"] if use_tta else []))  # fmt: skip
    t_end = time.time()

    baseline = all_background_score(data)
    print("\n================ demo summary ================")
    print(f"val mIoU (LB-style)          : {miou:.4f} (seed {train_seed(CONFIG)})")
    print(f"val mIoU with TTA            : {miou_tta:.4f} (multi-scale + flip)")
    print(f"all-background predictor     : {baseline:.4f}")
    print(
        f"data {t_data - t0:.0f} s, training {t_train - t_data:.0f} "
        f"s, scoring + submission {t_end - t_train:.0f} s"
    )
    print(
        f"submission CSV               : {out / 'submission.csv'} "
        f"({'with' if use_tta else 'without'} TTA, the better on val)"
    )
    print(f"overlays (image | GT | pred) : {out / 'overlays'}")
    print(f"confusion matrix             : {out / 'val_score' / 'confusion_matrix.png'}")
    print(f"training log / TensorBoard   : {model_dir}")


if __name__ == "__main__":
    main()
