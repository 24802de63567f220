#!/usr/bin/env python
"""This project against the official Mask2Former code on CPU, measured side by side in one run.

    python benchmarks/bench_vs_official.py --official PATH [--extra-path DIR] [--rounds 4]
        [--repeats 3] [--threads 2] [--precision fp32 bf16 bf16+compile] [--skip-train]
        [--official-cpu-runtime]

PATH is a checkout of the official Mask2Former repository (github facebookresearch/Mask2Former);
it is read, never modified. Its Swin backbone imports ``timm``: give a folder holding timm with
``--extra-path`` when the environment has none (``pip install --no-deps --target DIR timm``). The
official pixel decoder imports its compiled ``MultiScaleDeformableAttention`` extension even on
CPU, where it then uses its PyTorch path: the benchmark puts an empty module of that name on the
official worker's path (a temporary folder), which is all the official code needs to run on CPU.

Both models are built from the same official YAML (ADE20K semantic, Swin-T, 11 classes, random
init, seed 0) in separate worker processes (both packages are called ``mask2former``). Rounds
alternate official / project workers, so load on the machine falls on both alike; each worker
times ``--repeats`` runs after one warm-up, and the table gives medians over all runs and the
ratio official / project.

- inference: one 512x512 image, ``model.eval()``, ``torch.no_grad()``; the project also under
  ``MODEL.PRECISION bf16`` and under ``MODEL.PRECISION bf16`` + ``MODEL.COMPILE True`` when
  ``--precision`` lists "bf16" / "bf16+compile" (the official code has no such options: its
  figure is fp32; the compiled worker compiles in its warm-up run, which is not timed).
- training step: batch 2 of 256x256 with 3 random masks each, forward + backward + optimizer
  step, each with its own optimizer recipe from the YAML (AdamW, per-parameter groups,
  full-model gradient clipping 0.01): the official trainer's ``build_optimizer`` and this
  project's.

The project worker runs with the project's CPU runtime settings (config ``FLUSH_DENORMALS``,
``REUSE_HOST_MEMORY``: ``mask2former.engine.setup_cpu_runtime``, which ``train_net.py`` and the
prediction tool apply at start-up), the official worker as the official code runs (neither).
``--official-cpu-runtime`` gives the official worker the same two settings, to show what they
alone are worth there.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

YAML = "configs/ade20k/semantic-segmentation/swin/maskformer2_swin_tiny_bs16_160k.yaml"
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON_OPTS = [
    "MODEL.WEIGHTS", "",
    "MODEL.DEVICE", "cpu",
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "11",
    "MODEL.SWIN.DROP_PATH_RATE", "0.0",
]  # fmt: skip
# --precision values other than fp32 -> (project inference task, its config overrides)
PROJECT_INFERENCE = {
    "bf16": ("infer_bf16", ["MODEL.PRECISION", "bf16"]),
    "bf16+compile": ("infer_bf16_compile", ["MODEL.PRECISION", "bf16", "MODEL.COMPILE", "True"]),
}
TASK_OPTS = dict(PROJECT_INFERENCE.values())


def _build_official(official: str, opts):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2.projects.deeplab import add_deeplab_config

    from mask2former import add_maskformer2_config

    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    cfg.merge_from_file(os.path.join(official, YAML))
    cfg.merge_from_list(COMMON_OPTS + list(opts))
    from train_net import Trainer  # the official checkout's trainer (its optimizer recipe)

    model = build_model(cfg)
    return model, lambda: Trainer.build_optimizer(cfg, model)


def _build_project(official: str, opts):
    from detectron2.modeling import build_model

    from mask2former.engine import build_cfg, build_optimizer, setup_cpu_runtime

    cfg = build_cfg(os.path.join(official, YAML), COMMON_OPTS + list(opts))
    setup_cpu_runtime(cfg)
    model = build_model(cfg)
    return model, lambda: build_optimizer(cfg, model)


def training_batch(torch, size=256, batch=2, masks=3):
    """``batch`` random images of ``size`` x ``size`` with ``masks`` blocky masks each (the
    training input of both implementations; also used by ``bench_floor.py --train``)."""
    from detectron2.structures import Instances

    generator = torch.Generator().manual_seed(1)
    inputs = []
    for _ in range(batch):
        image = torch.randint(0, 256, (3, size, size), generator=generator, dtype=torch.uint8)
        labels = torch.randint(0, masks, (size // 32, size // 32), generator=generator)
        labels = labels.repeat_interleave(32, 0).repeat_interleave(32, 1)
        instances = Instances((size, size))
        instances.gt_classes = torch.arange(masks, dtype=torch.int64)
        # a tensor, as the official semantic mapper stores it
        instances.gt_masks = torch.stack([labels == c for c in range(masks)])
        inputs.append({"image": image, "instances": instances, "sem_seg": labels})
    return inputs


def _official_cpu_runtime() -> None:
    """The project's CPU runtime settings in the official worker (which cannot import this
    project: both packages are called ``mask2former``): its module, loaded from its file."""
    import importlib.util

    path = os.path.join(PROJECT_ROOT, "mask2former", "engine", "cpu_runtime.py")
    spec = importlib.util.spec_from_file_location("project_cpu_runtime", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.flush_denormals()
    module.reuse_freed_host_memory()


def worker(args) -> None:
    """Build one implementation's model, time it, print one JSON line of seconds."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.worker == "official" and args.official_cpu_runtime:
        _official_cpu_runtime()
    opts = TASK_OPTS.get(args.task, [])
    build = _build_official if args.worker == "official" else _build_project
    model, make_optimizer = build(args.official, opts)
    times = []
    if args.task.startswith("infer"):
        model.eval()
        generator = torch.Generator().manual_seed(2)
        image = torch.randint(0, 256, (3, 512, 512), generator=generator, dtype=torch.uint8)
        inputs = [{"image": image, "height": 512, "width": 512}]
        with torch.no_grad():
            for i in range(args.repeats + 1):
                start = time.perf_counter()
                model(inputs)
                if i:  # the first run is the warm-up
                    times.append(time.perf_counter() - start)
    else:
        model.train()
        optimizer = make_optimizer()
        batch = training_batch(torch)
        for i in range(args.repeats + 1):
            start = time.perf_counter()
            losses = model(batch)
            sum(losses.values()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i:
                times.append(time.perf_counter() - start)
    print("RESULT " + json.dumps(times))


def _run_worker(args, which, task, stub_dir):
    env = dict(os.environ)
    if which == "official":
        paths = [stub_dir, os.path.abspath(args.official)] + [
            os.path.abspath(p) for p in args.extra_path
        ]
        env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [
        sys.executable, os.path.abspath(__file__), "--official", args.official,
        "--worker", which, "--task", task,
        "--repeats", str(args.repeats), "--threads", str(args.threads),
    ] + (["--official-cpu-runtime"] if args.official_cpu_runtime else [])  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{which} worker ({task}) failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--official", required=True, help="checkout of the official Mask2Former repo")
    p.add_argument("--extra-path", nargs="*", default=[], help="folders with timm (official)")
    p.add_argument("--rounds", type=int, default=4, help="official / project alternations")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per worker")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument(
        "--precision", nargs="+", default=["fp32", "bf16"], choices=("fp32", *PROJECT_INFERENCE)
    )
    p.add_argument("--skip-train", action="store_true")
    p.add_argument(
        "--official-cpu-runtime",
        action="store_true",
        help="run the official worker with the project's CPU runtime settings too",
    )
    p.add_argument("--worker", choices=("official", "project"), help=argparse.SUPPRESS)
    p.add_argument("--task", choices=("infer", *TASK_OPTS, "train"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.official, YAML)):
        p.error(f"--official {args.official}: no {YAML} in it (not a Mask2Former checkout?)")
    if args.worker:
        worker(args)
        return

    rows = [("inference 512x512, fp32", "infer", "infer")]
    for precision, (task, _) in PROJECT_INFERENCE.items():
        if precision in args.precision:
            rows.append((f"inference 512x512, project {precision} vs official fp32", "infer", task))
    if not args.skip_train:
        rows.append(("training step, batch 2 of 256x256", "train", "train"))
    with tempfile.TemporaryDirectory() as stub_dir:
        with open(os.path.join(stub_dir, "MultiScaleDeformableAttention.py"), "w") as f:
            f.write('"""Empty stand-in: the official code then runs its PyTorch path."""\n')
        jobs = []  # each (implementation, task) once per round, in the rows' order
        for _, official_task, project_task in rows:
            for job in (("official", official_task), ("project", project_task)):
                if job not in jobs:
                    jobs.append(job)
        results = {}
        for r in range(args.rounds):
            for which, task in jobs:
                times = _run_worker(args, which, task, stub_dir)
                results.setdefault((which, task), []).extend(times)
                print(
                    f"round {r + 1}/{args.rounds} {which:8s} {task:18s} "
                    f"median {statistics.median(times):.3f} s",
                    flush=True,
                )
    print(f"\n{'':58s} {'official s':>10s} {'project s':>10s} {'ratio':>7s}")
    for label, official_task, project_task in rows:
        official = statistics.median(results[("official", official_task)])
        project = statistics.median(results[("project", project_task)])
        print(f"{label:58s} {official:10.3f} {project:10.3f} {official / project:6.2f}x")
    runtime = "both with" if args.official_cpu_runtime else "the project with"
    print(
        f"(medians of {args.rounds} rounds x {args.repeats} runs, {args.threads} threads, "
        f"official / project alternating; {runtime} the project's CPU runtime settings)"
    )


if __name__ == "__main__":
    main()
