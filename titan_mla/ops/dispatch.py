"""Which implementation a titan_mla op body runs.

CUDA tensors take the Triton kernels. CPU tensors take the PyTorch reference, except under
``TRITON_INTERPRET=1``, where eager calls on real data run the Triton kernels in Triton's
interpreter: that is how tests without a GPU check the kernels' numerics.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when the op modules are imported,
# which is when this module is imported too. Tests set it to False to check the reference branch.
KERNELS_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def reference_dtype(x: Tensor) -> torch.dtype:
    """The PyTorch references' compute dtype: float32, or float64 for float64 inputs (so the
    references can serve as float64 ground truth)."""
    return torch.promote_types(x.dtype, torch.float32)


def runs_triton(x: Tensor) -> bool:
    """Whether an op body given ``x`` launches its Triton kernels (else: the PyTorch reference).

    CUDA tensors always do. CPU tensors do only when KERNELS_INTERPRETED and the call is eager on
    real data: fake or functional tensors (torch.compile, opcheck's AOT tests) have no storage the
    interpreter can read.
    """
    if x.device.type == "cuda":
        return True
    return (
        x.device.type == "cpu"
        and KERNELS_INTERPRETED
        and not torch.compiler.is_compiling()
        and not isinstance(x, (FakeTensor, FunctionalTensor))
    )
