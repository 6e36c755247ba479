"""How fused backends follow torch.autocast: the dtype an op computes in, and its inputs cast to it."""

import torch


def compute_dtype(x):
    """The dtype an op computes x in: the autocast dtype inside an autocast region, else x's."""
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def autocast_inputs(*tensors):
    """The floating-point tensors cast to the autocast dtype when autocast is on for their device (None kept)."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)
