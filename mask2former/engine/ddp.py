"""DistributedDataParallel wrapping of the model, for CPU (gloo) and GPU (NCCL) processes."""

import torch
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel


def create_ddp_model(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """The model wrapped in ``DistributedDataParallel`` when there is more than one process.

    A CUDA model is bound to its device (``device_ids=[its index]``, the local rank's GPU that
    ``launch`` selected). A CPU model gets no ``device_ids``: ``DistributedDataParallel`` rejects
    them for CPU modules (Detectron2's ``create_ddp_model`` always passes them).

    Args:
        model: the model, already on its device.
        kwargs: other arguments of ``DistributedDataParallel`` (e.g. ``broadcast_buffers``).
    """
    if comm.get_world_size() == 1:
        return model
    device = next(model.parameters()).device
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        kwargs.setdefault("device_ids", [index])
        kwargs.setdefault("output_device", index)
    elif kwargs.get("device_ids"):
        raise ValueError(f"device_ids {kwargs['device_ids']} given for a model on {device}")
    return DistributedDataParallel(model, **kwargs)
