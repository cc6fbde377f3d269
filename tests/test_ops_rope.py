"""titan_mla::mla_rope / mla_rope_backward against a float64 rotation and the model's apply_rope.

On CPU the ops run their Triton kernel under TRITON_INTERPRET=1 and the PyTorch reference
otherwise; tests marked by the ``cuda`` parameter run the compiled kernel on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICES, assert_compiled_matches_eager, relative_error, requires_cuda

from titan_mla.models.args import MLAModelArgs
from titan_mla.models.rope import rope_cos_sin
from titan_mla.ops.rope import mla_rope, mla_rope_reference

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# The debug-sized MLA: YaRN on (rope_factor 40 over an original context of 64), rope dim 16.
DEBUG_ARGS = MLAModelArgs(
    rope_factor=40, original_seq_len=64, max_seq_len=256, qk_rope_head_dim=16, qk_nope_head_dim=32
)


def rotate_float64(x: torch.Tensor, rope_cache: torch.Tensor, positions: torch.Tensor):
    """x (batch, seq, ..., rope_dim): pairs (x[2i], x[2i+1]) rotated by the table's angles."""
    cos, sin = rope_cache.double()[positions].chunk(2, dim=-1)  # (batch, seq, rope_dim // 2)
    for _ in range(x.dim() - 3):
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    even, odd = x.double().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


def mla_rope_float64(q, k_pe, rope_cache, positions):
    rope_dim = rope_cache.shape[-1]
    q_nope, q_pe = q.double().split([q.shape[-1] - rope_dim, rope_dim], dim=-1)
    q_out = torch.cat([q_nope, rotate_float64(q_pe, rope_cache, positions)], dim=-1)
    return q_out, rotate_float64(k_pe, rope_cache, positions)


def make_positions(kind: str, batch: int, seq_len: int, max_seq_len: int, generator):
    """(batch, seq) positions, or the None / (seq,) forms mla_rope also takes."""
    if kind == "none":
        return None
    if kind == "shared_offset":
        return torch.arange(seq_len) + int(
            torch.randint(max_seq_len - seq_len, (), generator=generator)
        )
    if kind == "packed":
        # Each row packs documents of random lengths; positions restart at 0 in every document.
        rows = []
        for _ in range(batch):
            starts = torch.randint(1, seq_len, (3,), generator=generator).unique().tolist()
            row = torch.arange(seq_len)
            for start in starts:
                row[start:] = torch.arange(seq_len - start)
            rows.append(row)
        return torch.stack(rows)
    assert kind == "permuted"
    return torch.stack(
        [torch.randperm(max_seq_len, generator=generator)[:seq_len] for _ in range(batch)]
    )


def as_batch_seq(positions, batch: int, seq_len: int) -> torch.Tensor:
    if positions is None:
        positions = torch.arange(seq_len)
    return positions.expand(batch, seq_len)


def nan_padded_inputs(batch, seq_len, n_heads, device, dtype, generator):
    """q as a (batch, seq, heads, nope + rope) view with padded head stride, and k_pe as the tail of
    a (batch, seq, latent + rope) projection, both inside NaN-filled buffers."""
    head_dim = DEBUG_ARGS.qk_head_dim
    rope_dim, latent_dim = DEBUG_ARGS.qk_rope_head_dim, 24
    q_buffer = torch.full((batch, seq_len, n_heads, head_dim + 8), float("nan"), dtype=dtype)
    q_buffer[..., :head_dim] = torch.randn(batch, seq_len, n_heads, head_dim, generator=generator)
    kv_buffer = torch.full((batch, seq_len, latent_dim + rope_dim), float("nan"), dtype=dtype)
    kv_buffer[..., latent_dim:] = torch.randn(batch, seq_len, rope_dim, generator=generator)
    q_buffer, kv_buffer = q_buffer.to(device), kv_buffer.to(device)
    return q_buffer[..., :head_dim], kv_buffer[..., latent_dim:]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("positions_kind", ["none", "shared_offset", "packed", "permuted"])
def test_mla_rope_matches_float64(device, dtype, positions_kind):
    generator = torch.Generator().manual_seed(0)
    batch, seq_len, n_heads = 2, 24, 3
    q, k_pe = nan_padded_inputs(batch, seq_len, n_heads, device, dtype, generator)
    q_buffer_before, kv_buffer_before = q._base.clone(), k_pe._base.clone()
    rope_cache = rope_cos_sin(DEBUG_ARGS, device)
    positions = make_positions(positions_kind, batch, seq_len, DEBUG_ARGS.max_seq_len, generator)
    positions = None if positions is None else positions.to(device)
    grad_q_out = torch.randn(q.shape, generator=generator).to(device, dtype)
    grad_k_pe_out = torch.randn(k_pe.shape, generator=generator).to(device, dtype)

    q_ours, k_pe_ours = q.detach().requires_grad_(), k_pe.detach().requires_grad_()
    q_out, k_pe_out = mla_rope(q_ours, k_pe_ours, rope_cache, positions)
    torch.autograd.backward([q_out, k_pe_out], [grad_q_out, grad_k_pe_out])

    q64, k_pe64 = q.double().requires_grad_(), k_pe.double().requires_grad_()
    expected = mla_rope_float64(q64, k_pe64, rope_cache, as_batch_seq(positions, batch, seq_len))
    expected_grads = torch.autograd.grad(
        expected, (q64, k_pe64), (grad_q_out.double(), grad_k_pe_out.double())
    )

    tolerance = TOLERANCE[dtype]
    for ours, reference in zip(
        (q_out, k_pe_out, q_ours.grad, k_pe_ours.grad), (*expected, *expected_grads), strict=True
    ):
        assert ours.dtype == dtype and not ours.isnan().any()
        assert relative_error(ours, reference) <= tolerance
    # The no-rope part of q is copied, not recomputed.
    nope_dim = DEBUG_ARGS.qk_nope_head_dim
    assert torch.equal(q_out[..., :nope_dim], q[..., :nope_dim])
    # Functional: the inputs and the NaN padding around them are untouched.
    for before, view in ((q_buffer_before, q), (kv_buffer_before, k_pe)):
        assert torch.equal(before.isnan(), view._base.isnan())
        assert torch.equal(before.nan_to_num(), view._base.nan_to_num())


@pytest.mark.parametrize("device", DEVICES)
def test_mla_rope_matches_model_apply_rope(device):
    generator = torch.Generator().manual_seed(1)
    batch, seq_len, n_heads = 3, 17, 2
    q = torch.randn(batch, seq_len, n_heads, DEBUG_ARGS.qk_head_dim, generator=generator).to(device)
    k_pe = torch.randn(batch, seq_len, DEBUG_ARGS.qk_rope_head_dim, generator=generator).to(device)
    rope_cache = rope_cos_sin(DEBUG_ARGS, device)
    positions = make_positions("permuted", batch, seq_len, DEBUG_ARGS.max_seq_len, generator)
    for positions_form in (None, torch.arange(seq_len), positions):
        if positions_form is not None:
            positions_form = positions_form.to(device)
        ours = mla_rope(q, k_pe, rope_cache, positions_form)
        reference = mla_rope_reference(q, k_pe, rope_cache, positions_form)
        for actual, expected in zip(ours, reference, strict=True):
            torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_rope_only_head(device):
    """q without a no-rope part (nope dim 0) rotates as a whole."""
    generator = torch.Generator().manual_seed(2)
    rope_dim = DEBUG_ARGS.qk_rope_head_dim
    q = torch.randn(2, 5, 4, rope_dim, generator=generator).to(device)
    k_pe = torch.randn(2, 5, rope_dim, generator=generator).to(device)
    rope_cache = rope_cos_sin(DEBUG_ARGS, device)
    q_out, k_pe_out = mla_rope(q, k_pe, rope_cache)
    positions = as_batch_seq(None, 2, 5).to(device)
    q64, k_pe64 = mla_rope_float64(q, k_pe, rope_cache, positions)
    assert relative_error(q_out, q64) <= 1e-5
    assert relative_error(k_pe_out, k_pe64) <= 1e-5


def test_shape_checks():
    rope_cache = rope_cos_sin(DEBUG_ARGS)
    q = torch.randn(2, 5, 4, DEBUG_ARGS.qk_head_dim)
    with pytest.raises(ValueError, match="k_pe shape"):
        mla_rope(q, torch.randn(2, 5, 8), rope_cache)
    with pytest.raises(ValueError, match="positions shape"):
        mla_rope(q, torch.randn(2, 5, 16), rope_cache, torch.zeros(2, 4, dtype=torch.long))


def opcheck_samples(device: str) -> list[tuple]:
    generator = torch.Generator().manual_seed(3)
    batch, seq_len, n_heads = 2, 6, 3
    q, k_pe = (
        t.detach().requires_grad_()
        for t in nan_padded_inputs(batch, seq_len, n_heads, device, torch.float32, generator)
    )
    rope_cache = rope_cos_sin(DEBUG_ARGS, device)
    positions = make_positions("packed", batch, seq_len, DEBUG_ARGS.max_seq_len, generator).to(
        device
    )
    grad_q_out = torch.randn(q.shape, generator=generator).to(device)
    grad_k_pe_out = torch.randn(k_pe.shape, generator=generator).to(device)
    ops = torch.ops.titan_mla
    return [
        (ops.mla_rope.default, (q, k_pe, rope_cache, positions)),
        (ops.mla_rope_backward.default, (grad_q_out, grad_k_pe_out, rope_cache, positions)),
    ]


@pytest.mark.usefixtures("cpu_reference_branch")
def test_opcheck_cpu_reference_branch():
    for op, args in opcheck_samples("cpu"):
        torch.library.opcheck(op, args)


@requires_cuda
def test_opcheck_cuda_triton_branch():
    for op, args in opcheck_samples("cuda"):
        torch.library.opcheck(op, args)


def rope_then_score(q, k_pe, rope_cache, positions):
    q_out, k_pe_out = mla_rope(q, k_pe, rope_cache, positions)
    rope_dim = rope_cache.shape[-1]
    return (q_out[..., -rope_dim:] * k_pe_out.unsqueeze(2)).sum(-1) + q_out[..., 0]


def check_compiled_matches_eager(device: str, backend: str, dynamic: bool | None = None) -> None:
    generator = torch.Generator().manual_seed(4)
    batch, seq_len, n_heads = 2, 9, 2
    q = torch.randn(batch, seq_len, n_heads, DEBUG_ARGS.qk_head_dim, generator=generator)
    k_pe = torch.randn(batch, seq_len, DEBUG_ARGS.qk_rope_head_dim, generator=generator)
    rope_cache = rope_cos_sin(DEBUG_ARGS, device)
    positions = make_positions("packed", batch, seq_len, DEBUG_ARGS.max_seq_len, generator)
    positions = positions.to(device)
    grad = torch.randn(batch, seq_len, n_heads, generator=generator).to(device)
    inputs = [q.to(device), k_pe.to(device)]
    assert_compiled_matches_eager(
        rope_then_score, inputs, (rope_cache, positions), grad, backend, dynamic
    )


def test_compile_cpu_reference_branch():
    # aot_eager: dynamo, fake-tensor tracing of the op bodies and AOT autograd, as Inductor sees
    # them, without Inductor's C++ build (about 20 s cold on a 2-core CPU).
    check_compiled_matches_eager("cpu", backend="aot_eager")


@requires_cuda
@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_cuda_inductor_no_graph_breaks(dynamic):
    check_compiled_matches_eager("cuda", backend="inductor", dynamic=dynamic)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_1b_head_layout(dtype):
    """The 1B model's layout: 16 heads of 128 + 64, YaRN table, packed positions."""
    args = MLAModelArgs(rope_factor=4, original_seq_len=512, max_seq_len=2048)
    generator = torch.Generator().manual_seed(5)
    batch, seq_len = 2, 512
    q = torch.randn(batch, seq_len, args.n_heads, args.qk_head_dim, generator=generator)
    k_pe = torch.randn(batch, seq_len, args.qk_rope_head_dim, generator=generator)
    q, k_pe = (t.to("cuda", dtype).requires_grad_() for t in (q, k_pe))
    rope_cache = rope_cos_sin(args, "cuda")
    positions = make_positions("packed", batch, seq_len, args.max_seq_len, generator).cuda()
    grad_q_out, grad_k_pe_out = torch.randn_like(q), torch.randn_like(k_pe)

    q_out, k_pe_out = mla_rope(q, k_pe, rope_cache, positions)
    torch.autograd.backward([q_out, k_pe_out], [grad_q_out, grad_k_pe_out])
    q64, k_pe64 = (t.detach().double().requires_grad_() for t in (q, k_pe))
    expected = mla_rope_float64(q64, k_pe64, rope_cache, positions)
    expected_grads = torch.autograd.grad(
        expected, (q64, k_pe64), (grad_q_out.double(), grad_k_pe_out.double())
    )
    for ours, reference in zip(
        (q_out, k_pe_out, q.grad, k_pe.grad), (*expected, *expected_grads), strict=True
    ):
        assert relative_error(ours, reference) <= TOLERANCE[dtype]
