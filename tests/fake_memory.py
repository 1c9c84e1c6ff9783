"""A stand-in for a GPU's allocator, for the memory budget's tests on CPUs (fastgemma.memory_budget.DeviceMemory)."""

import torch

from fastgemma.memory_budget import GiB


class FakeMemory:
    """A device memory whose every read of the peak finds a new one (each step sets it), `allocated` bytes held."""

    device = torch.device("cpu")

    def __init__(self, limit=100 * GiB, allocated=0):
        self.limit_bytes, self.allocated_bytes, self.peak_bytes = limit, allocated, allocated

    def allocated(self):
        return self.allocated_bytes

    def peak(self):
        self.peak_bytes += 1
        return self.peak_bytes

    def limit(self):
        return self.limit_bytes

    def total(self):
        return self.limit_bytes
