"""The training checkpointer follows MODEL.WEIGHTS_ALLOW_CODE_EXECUTION."""

from pathlib import Path

import pytest

from mask2former.data import register_datasets_from_cfg
from mask2former.data.offline.synthetic import generate_synthetic_trash
from mask2former.engine import SafeCheckpointer, Trainer, build_cfg

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("allow", [False, True])
def test_trainer_checkpointer_allow_code_execution(tmp_path, allow):
    data = tmp_path / "data"
    generate_synthetic_trash(str(data), num_train=2, num_val=1, num_test=1, image_size=64, seed=0)
    cfg = build_cfg(
        str(ROOT / "configs" / "tiny" / "m2f_swin_tiny_cpu.yaml"),
        [
            "MODEL.DEVICE", "cpu",
            "DATALOADER.NUM_WORKERS", "0",
            "DATASETS.TRASH_ROOT", str(data),
            "OUTPUT_DIR", str(tmp_path / "out"),
            "MODEL.WEIGHTS_ALLOW_CODE_EXECUTION", str(allow),
        ],
    )  # fmt: skip
    register_datasets_from_cfg(cfg)
    trainer = Trainer(cfg)
    assert isinstance(trainer.checkpointer, SafeCheckpointer)
    assert trainer.checkpointer.allow_code_execution is allow
