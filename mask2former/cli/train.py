"""Train / evaluate Mask2Former, SeMask and DiNAT models for semantic segmentation.

m2f-train --config-file configs/m2f_dinat_l.yaml --num-gpus 1 [KEY VALUE ...]
m2f-train --config-file ... --eval-only MODEL.WEIGHTS out/model_final.pth
m2f-train --config-file ... --resume
"""

import logging
import sys

from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from mask2former.cli.command import project_cfg
from mask2former.data import register_datasets_from_cfg
from mask2former.engine import (
    SafeCheckpointer,
    Trainer,
    check_num_classes,
    launch,
    run_training_checks,
    setup_cpu_runtime,
)


def setup(args):
    """Config from the command line (Mask2Former + SeMask + DiNAT keys), registered datasets,
    logging, output dir and this process's CPU runtime settings."""
    cfg = project_cfg(args)
    default_setup(cfg, args)
    for name in ("mask2former", "semask", "dinat"):
        setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name=name)
    setup_cpu_runtime(cfg)
    register_datasets_from_cfg(cfg)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        check_num_classes(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, cfg.DATASETS.TEST)
        model = Trainer.build_model(cfg)
        # save_to_disk=False: evaluation never writes into (or cleans) a training's folder
        checkpointer = SafeCheckpointer(
            model,
            save_dir=cfg.OUTPUT_DIR,
            save_to_disk=False,
            allow_code_execution=cfg.MODEL.WEIGHTS_ALLOW_CODE_EXECUTION,
        )
        # refuses weights that leave any model tensor unloaded
        checkpointer.load_for_inference(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:  # as the official trainer: both scores, TTA keys end in _TTA
            results.update(Trainer.test_with_TTA(cfg, model))
        verify_results(cfg, results)
        return results

    run_training_checks(cfg)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def console_main(argv=None) -> int:
    """The ``m2f-train`` command: :func:`main` on the command line (errors raise), exit
    status 0."""
    args = default_argument_parser().parse_args(argv)
    logging.getLogger(__name__).info("Command line arguments: %s", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
    return 0


if __name__ == "__main__":
    sys.exit(console_main())
