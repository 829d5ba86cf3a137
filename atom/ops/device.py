"""What the ops key their tuned configs by: the device's name, looked up once per device."""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def device_name(device: torch.device) -> str:
    """torch.cuda.get_device_name() for a CUDA device (cached: not a driver call per forward),
    the device type ("cpu") otherwise."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
