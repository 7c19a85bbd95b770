"""The reference (torch) kernels are device-agnostic: the same code runs on a CUDA GPU.

Generated from the registry, so every quantizable type is covered.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from llmdeploy import quants

from .cases import CASES
from .gpu import requires_cuda

QUANTIZABLE = [GGMLQuantizationType[n] for n in quants.quantizable_type_names()]


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_reference_creates_every_tensor_on_the_input_device(qtype: GGMLQuantizationType) -> None:
    # On the meta device, a tensor made without device= (a CPU constant wider
    # than 0-d) or a host sync (.item(), Python branching on values) fails,
    # so passing here means the kernel runs unchanged on CUDA.
    cls = quants.quant_type(qtype)
    out = cls.quantize_blocks(torch.empty(3, cls.block_size, device="meta"))
    assert out.device.type == "meta" and out.dtype == torch.uint8 and tuple(out.shape) == (3, cls.type_size)


@requires_cuda
@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_reference_on_cuda_matches_ggml(qtype: GGMLQuantizationType) -> None:
    ggml = pytest.importorskip("llmdeploy.quants.ggml_reference")
    rng = np.random.default_rng(int(qtype))
    x = np.concatenate([CASES[case](rng, 9, 4096) for case in sorted(CASES)])
    ours = quants.quantize(torch.from_numpy(x).cuda(), qtype)
    np.testing.assert_array_equal(ours, ggml.quantize(x, qtype))
