import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, so set it before titan_mla is imported:
# without a GPU the kernels then run on CPU tensors (numerics tests), and torch.compile takes the
# PyTorch reference path.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import titan_mla  # noqa: F401  (picks the device for torchtitan before anything else imports it)


@pytest.fixture
def cpu_reference_branch(monkeypatch):
    """Make the titan_mla ops take their PyTorch reference on CPU, whatever TRITON_INTERPRET says."""
    from titan_mla.ops import dispatch

    monkeypatch.setattr(dispatch, "KERNELS_INTERPRETED", False)
