"""MLA's rotary embedding as one Triton custom op: rotate the rope slice of every query head and the
shared rotary key, copy the queries' no-rope part, in one pass over memory.

Layout as in titan_mla.models.rope.apply_rope (DeepSeek-V3): consecutive pairs (x[2i], x[2i+1])
rotate by position * inv_freq[i]; ``rope_cache`` is the float32 (max_seq_len, rope_dim) table of the
cosines then the sines of those angles. The backward is the rotation by the opposite angle, the same
kernel with the sines negated. Device branch: titan_mla.ops.dispatch.runs_triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from titan_mla.models.rope import apply_rope

from .dispatch import runs_triton


@triton.jit
def _mla_rope_kernel(
    q_ptr,
    k_pe_ptr,
    rope_cache_ptr,
    positions_ptr,
    q_out_ptr,
    k_pe_out_ptr,
    seq_len,
    n_heads,
    q_stride_batch,
    q_stride_seq,
    q_stride_head,
    k_pe_stride_batch,
    k_pe_stride_seq,
    rope_cache_stride,
    positions_stride_batch,
    positions_stride_seq,
    NOPE_DIM: tl.constexpr,
    ROPE_DIM: tl.constexpr,
    INVERSE: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_NOPE: tl.constexpr,
    BLOCK_ROPE: tl.constexpr,
):
    # One program per token: all its query heads and its shared key share one position's table row.
    token = tl.program_id(0)
    batch = token // seq_len
    seq = token % seq_len
    position = tl.load(
        positions_ptr + batch * positions_stride_batch + seq * positions_stride_seq
    ).to(tl.int64)

    rope_cols = tl.arange(0, BLOCK_ROPE)
    rope_mask = rope_cols < ROPE_DIM
    table_row = rope_cache_ptr + position * rope_cache_stride + rope_cols // 2
    cos = tl.load(table_row, mask=rope_mask, other=0.0)
    sin = tl.load(table_row + ROPE_DIM // 2, mask=rope_mask, other=0.0)
    # out[2i] = x[2i] cos - x[2i+1] sin and out[2i+1] = x[2i+1] cos + x[2i] sin: every element takes
    # its pair partner (index ^ 1) times a signed sine; the inverse rotation flips that sign.
    is_even = (rope_cols % 2) == 0
    signed_sin = tl.where(is_even, -sin, sin)
    if INVERSE:
        signed_sin = -signed_sin
    partner_cols = rope_cols ^ 1

    heads = tl.arange(0, BLOCK_HEADS)
    head_mask = heads < n_heads
    head_dim = NOPE_DIM + ROPE_DIM
    q_rows = (
        q_ptr
        + batch.to(tl.int64) * q_stride_batch
        + seq.to(tl.int64) * q_stride_seq
        + heads[:, None] * q_stride_head
    )
    q_out_rows = q_out_ptr + token.to(tl.int64) * n_heads * head_dim + heads[:, None] * head_dim

    if NOPE_DIM > 0:
        nope_cols = tl.arange(0, BLOCK_NOPE)
        nope_mask = head_mask[:, None] & (nope_cols < NOPE_DIM)[None, :]
        q_nope = tl.load(q_rows + nope_cols[None, :], mask=nope_mask)
        tl.store(q_out_rows + nope_cols[None, :], q_nope, mask=nope_mask)

    q_rope_mask = head_mask[:, None] & rope_mask[None, :]
    q_pe = tl.load(q_rows + NOPE_DIM + rope_cols[None, :], mask=q_rope_mask, other=0.0)
    q_pe_partner = tl.load(q_rows + NOPE_DIM + partner_cols[None, :], mask=q_rope_mask, other=0.0)
    q_pe_out = (
        q_pe.to(tl.float32) * cos[None, :] + q_pe_partner.to(tl.float32) * signed_sin[None, :]
    )
    tl.store(
        q_out_rows + NOPE_DIM + rope_cols[None, :],
        q_pe_out.to(q_out_ptr.dtype.element_ty),
        mask=q_rope_mask,
    )

    k_pe_row = (
        k_pe_ptr + batch.to(tl.int64) * k_pe_stride_batch + seq.to(tl.int64) * k_pe_stride_seq
    )
    k_pe = tl.load(k_pe_row + rope_cols, mask=rope_mask, other=0.0)
    k_pe_partner = tl.load(k_pe_row + partner_cols, mask=rope_mask, other=0.0)
    k_pe_out = k_pe.to(tl.float32) * cos + k_pe_partner.to(tl.float32) * signed_sin
    tl.store(
        k_pe_out_ptr + token.to(tl.int64) * ROPE_DIM + rope_cols,
        k_pe_out.to(k_pe_out_ptr.dtype.element_ty),
        mask=rope_mask,
    )


def _check_shapes(q: Tensor, k_pe: Tensor, rope_cache: Tensor, positions: Tensor) -> None:
    rope_dim = rope_cache.shape[-1]
    batch, seq_len, _, head_dim = q.shape
    if rope_dim % 2 or head_dim < rope_dim:
        raise ValueError(f"rope_dim {rope_dim} must be even and <= q's head dim {head_dim}")
    if k_pe.shape != (batch, seq_len, rope_dim):
        raise ValueError(f"k_pe shape {tuple(k_pe.shape)} != {(batch, seq_len, rope_dim)}")
    if positions.shape != (batch, seq_len):
        raise ValueError(f"positions shape {tuple(positions.shape)} != {(batch, seq_len)}")


def _unit_last_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _mla_rope_launch(
    q: Tensor, k_pe: Tensor, rope_cache: Tensor, positions: Tensor, inverse: bool
) -> tuple[Tensor, Tensor]:
    """Launch the rotation kernel over (batch * seq) tokens; outputs are contiguous."""
    q, k_pe, rope_cache = (
        _unit_last_stride(q),
        _unit_last_stride(k_pe),
        _unit_last_stride(rope_cache),
    )
    batch, seq_len, n_heads, head_dim = q.shape
    rope_dim = rope_cache.shape[-1]
    nope_dim = head_dim - rope_dim
    q_out = torch.empty((batch, seq_len, n_heads, head_dim), dtype=q.dtype, device=q.device)
    k_pe_out = torch.empty((batch, seq_len, rope_dim), dtype=k_pe.dtype, device=k_pe.device)
    block_heads = triton.next_power_of_2(n_heads)
    torch.library.wrap_triton(_mla_rope_kernel)[(batch * seq_len,)](
        q,
        k_pe,
        rope_cache,
        positions,
        q_out,
        k_pe_out,
        seq_len,
        n_heads,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k_pe.stride(0),
        k_pe.stride(1),
        rope_cache.stride(0),
        positions.stride(0),
        positions.stride(1),
        NOPE_DIM=nope_dim,
        ROPE_DIM=rope_dim,
        INVERSE=inverse,
        BLOCK_HEADS=block_heads,
        BLOCK_NOPE=triton.next_power_of_2(max(nope_dim, 1)),
        BLOCK_ROPE=triton.next_power_of_2(rope_dim),
        num_warps=4 if block_heads * head_dim <= 4096 else 8,
    )
    return q_out, k_pe_out


def mla_rope_reference(
    q: Tensor, k_pe: Tensor, rope_cache: Tensor, positions: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The model's own rotation (apply_rope) of q's last rope_dim values and of k_pe."""
    rope_dim = rope_cache.shape[-1]
    q_nope, q_pe = q.split([q.shape[-1] - rope_dim, rope_dim], dim=-1)
    q_out = torch.cat([q_nope, apply_rope(q_pe, rope_cache, positions)], dim=-1)
    k_pe_out = apply_rope(k_pe.unsqueeze(2), rope_cache, positions).squeeze(2)
    return q_out, k_pe_out


def _inverse_rope_cache(rope_cache: Tensor) -> Tensor:
    """The table of the opposite angles: same cosines, negated sines."""
    cos, sin = rope_cache.chunk(2, dim=-1)
    return torch.cat([cos, -sin], dim=-1)


@torch.library.triton_op("titan_mla::mla_rope", mutates_args=())
def _mla_rope_op(
    q: Tensor, k_pe: Tensor, rope_cache: Tensor, positions: Tensor
) -> tuple[Tensor, Tensor]:
    """q (batch, seq, heads, nope + rope), k_pe (batch, seq, rope), positions (batch, seq) ->
    (q with its rope slice rotated, k_pe rotated), both contiguous."""
    _check_shapes(q, k_pe, rope_cache, positions)
    if runs_triton(q):
        return _mla_rope_launch(q, k_pe, rope_cache, positions, inverse=False)
    q_out, k_pe_out = mla_rope_reference(q, k_pe, rope_cache, positions)
    return q_out.contiguous(), k_pe_out.contiguous()


@torch.library.triton_op("titan_mla::mla_rope_backward", mutates_args=())
def _mla_rope_backward_op(
    grad_q_out: Tensor, grad_k_pe_out: Tensor, rope_cache: Tensor, positions: Tensor
) -> tuple[Tensor, Tensor]:
    """(grad_q, grad_k_pe): the gradients rotated back by the opposite angles."""
    _check_shapes(grad_q_out, grad_k_pe_out, rope_cache, positions)
    if runs_triton(grad_q_out):
        return _mla_rope_launch(grad_q_out, grad_k_pe_out, rope_cache, positions, inverse=True)
    grad_q, grad_k_pe = mla_rope_reference(
        grad_q_out, grad_k_pe_out, _inverse_rope_cache(rope_cache), positions
    )
    return grad_q.contiguous(), grad_k_pe.contiguous()


def _mla_rope_setup_context(ctx, inputs, output) -> None:
    _, _, rope_cache, positions = inputs
    ctx.save_for_backward(rope_cache, positions)


def _mla_rope_autograd(ctx, grad_q_out: Tensor, grad_k_pe_out: Tensor):
    rope_cache, positions = ctx.saved_tensors
    grad_q, grad_k_pe = torch.ops.titan_mla.mla_rope_backward(
        grad_q_out, grad_k_pe_out, rope_cache, positions
    )
    return grad_q, grad_k_pe, None, None


_mla_rope_op.register_autograd(_mla_rope_autograd, setup_context=_mla_rope_setup_context)


def mla_rope(
    q: Tensor, k_pe: Tensor, rope_cache: Tensor, positions: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Rotate MLA's queries (batch, seq, heads, nope + rope: the last rope_dim values) and shared
    rotary key k_pe (batch, seq, rope_dim) by ``positions``: None (0..seq-1), (seq,) or (batch, seq).
    Returns contiguous (q_out, k_pe_out) in the inputs' dtypes; math in float32."""
    batch, seq_len = q.shape[:2]
    if positions is None:
        positions = torch.arange(seq_len, device=q.device)
    if positions.dim() == 1:
        positions = positions.expand(batch, seq_len)
    return torch.ops.titan_mla.mla_rope(q, k_pe, rope_cache, positions)
