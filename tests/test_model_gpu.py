"""GPU-only checks of the model (skipped without CUDA)."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from titan_mla.models import MLAModelArgs
from titan_mla.models.model import MultiHeadLatentAttention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_1b_attention_runs_on_a_fused_sdpa_backend_never_math():
    args = MLAModelArgs()  # the 1B shapes: qk head dim 192, v head dim 128
    attention = MultiHeadLatentAttention(args).cuda().bfloat16()
    rope_cache = torch.zeros(4096, args.qk_rope_head_dim, device="cuda")
    x = torch.randn(2, 4096, args.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        attention(x, rope_cache).sum().backward()
    ops = {event.key for event in prof.key_averages()}
    assert any(op.startswith("aten::_scaled_dot_product_cudnn_attention") for op in ops), sorted(
        ops
    )
    assert not any("math" in op for op in ops), sorted(op for op in ops if "attention" in op)
