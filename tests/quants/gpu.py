"""Marks for tests that need a CUDA GPU."""

import pytest
import torch

#: Skips a test where torch sees no CUDA GPU, saying why that is acceptable.
requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA GPU on this machine: the torch reference is checked byte for byte on the CPU here "
    "and on CUDA where a GPU exists",
)
