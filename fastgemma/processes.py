"""How many processes train together (torch.distributed's world size, 1 without it)."""

import torch


def world_size() -> int:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_world_size() if distributed else 1
