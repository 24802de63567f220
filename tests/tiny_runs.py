"""Command-line overrides shared by the end-to-end tests that run ``train_net.py`` and the tools
as subprocesses on tiny synthetic images of ``size`` x ``size``."""


def run_opts(size, workers=0, confusion_matrix_plot=False):
    """CPU, ``workers`` data-loader processes, test images kept at ``size`` (no resizing,
    no padding beyond it)."""
    return [
        "MODEL.DEVICE", "cpu",
        "DATALOADER.NUM_WORKERS", str(workers),
        "TEST.CONFUSION_MATRIX_PLOT", str(confusion_matrix_plot),
        "INPUT.MIN_SIZE_TEST", str(size),
        "INPUT.SIZE_DIVISIBILITY", str(size),
    ]  # fmt: skip


def train_opts(size, batch=2):
    """Batch ``batch`` of whole ``size`` crops, 1 warm-up iteration, 256 mask points."""
    return [
        "SOLVER.IMS_PER_BATCH", str(batch),
        "SOLVER.WARMUP_ITERS", "1",
        "INPUT.MIN_SIZE_TRAIN", f"({size},)",
        "INPUT.CROP.SIZE", f"({size}, {size})",
        "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256",
    ]  # fmt: skip
