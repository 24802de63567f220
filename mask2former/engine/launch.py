"""Detectron2's ``launch`` with an orderly end for each worker process.

Detectron2's worker returns from ``main`` and lets the interpreter exit with the process
group still open. With the gloo backend (CPU training) a worker whose peer has already
exited can then abort in the group's destructor ("terminate called without an active
exception", SIGABRT), so a run that finished its work still fails with a non-zero status
about one time in four. Here every worker waits for the others once ``main`` has
returned and closes the group itself before exiting.
"""

import functools

import torch.distributed as dist
from detectron2.engine import launch as detectron2_launch
from detectron2.engine.launch import DEFAULT_TIMEOUT
from detectron2.utils import comm

__all__ = ["launch"]


def _main_then_close_group(main_func, *args):
    """Run ``main_func`` in a worker; after it returns, wait for the other workers and close
    the process group. An exception is raised as is (the launcher stops the other workers),
    without waiting on peers that may never arrive."""
    result = main_func(*args)
    if dist.is_available() and dist.is_initialized():
        comm.synchronize()
        dist.destroy_process_group()
    return result


def launch(
    main_func,
    num_gpus_per_machine,
    num_machines=1,
    machine_rank=0,
    dist_url=None,
    args=(),
    timeout=DEFAULT_TIMEOUT,
):
    """The arguments and behaviour of ``detectron2.engine.launch``; each worker closes its
    process group after ``main_func`` returns. With one process ``main_func`` runs in this
    process, as in Detectron2."""
    detectron2_launch(
        functools.partial(_main_then_close_group, main_func),
        num_gpus_per_machine,
        num_machines=num_machines,
        machine_rank=machine_rank,
        dist_url=dist_url,
        args=args,
        timeout=timeout,
    )
