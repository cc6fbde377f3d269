"""Triton kernels registered as PyTorch custom ops (``torch.ops.titan_mla.*``), each with its
PyTorch reference beside it."""

from . import sharding  # noqa: F401  (DTensor sharding rules of these ops: tensor/sequence parallel)
from .dispatch import runs_triton
from .rmsnorm import RMSNorm, rms_norm, rms_norm_add, rms_norm_add_reference, rms_norm_reference
from .rope import mla_rope, mla_rope_reference

__all__ = [
    "RMSNorm",
    "mla_rope",
    "mla_rope_reference",
    "rms_norm",
    "rms_norm_add",
    "rms_norm_add_reference",
    "rms_norm_reference",
    "runs_triton",
]
