"""DTensor sharding rules for titan_mla's custom ops, so that tensor and sequence parallel can run
them on DTensors (RMSNorm under sequence parallel, the MLA rotation on head-sharded queries).

Every op here works row by row (RMSNorm: over the last dim; RoPE: per token and head), so any
sharding of a dimension other than the one it reduces over or indexes by passes straight through.
The backward ops are linear in the incoming gradients, so partial-sum gradients stay partial sums.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding

from . import rmsnorm, rope  # noqa: F401  (define the ops registered below)

ops = torch.ops.titan_mla


def _row_dims(x) -> range:
    """Dimensions of x that a row-wise op (reducing over the last dim) may be sharded on."""
    return range(x.ndim - 1)


@register_sharding(ops.rms_norm.default)
def _rms_norm_sharding(x, weight, eps):
    # Outputs (y, rstd): rstd has x's leading dims, so a leading-dim shard is the same Shard(d).
    strategies = [([Replicate(), Replicate()], [Replicate(), Replicate(), None])]
    for dim in _row_dims(x):
        strategies.append(([Shard(dim), Shard(dim)], [Shard(dim), Replicate(), None]))
    return strategies


@register_sharding(ops.rms_norm_add.default)
def _rms_norm_add_sharding(x, residual, weight, eps):
    replicate = Replicate()
    strategies = [([replicate] * 3, [replicate, replicate, replicate, None])]
    for dim in _row_dims(x):
        shard = Shard(dim)
        strategies.append(([shard] * 3, [shard, shard, replicate, None]))
    return strategies


@register_sharding(ops.rms_norm_backward.default)
def _rms_norm_backward_sharding(grad_y, x, weight, rstd, grad_residual):
    replicate, partial = Replicate(), Partial()
    # grad_residual is an optional tensor: its placement follows grad_y's, or None when absent.
    has_residual = grad_residual is not None

    def inputs(grad, saved):
        return [grad, saved, replicate, saved, grad if has_residual else None]

    # Partial gradients in, partial (grad_x, grad_weight) out: both are linear in them.
    strategies = [
        ([replicate, replicate], inputs(replicate, replicate)),
        ([partial, partial], inputs(partial, replicate)),
    ]
    for dim in _row_dims(x):
        shard = Shard(dim)
        # Each rank holds some rows: its grad_weight is the sum over its rows only.
        strategies.append(([shard, partial], inputs(shard, shard)))
    return strategies


def _mla_rope_strategies(q, grad_k_pe_partial: bool):
    """(q_out, k_pe_out) <- (q, k_pe, rope_cache, positions): replicated; batch- or
    sequence-sharded (q, k_pe and positions alike); or q sharded over heads with k_pe, shared by
    all heads, replicated."""
    replicate = Replicate()
    strategies = [([replicate, replicate], [replicate] * 4)]
    for dim in (0, 1):
        shard = Shard(dim)
        strategies.append(([shard, shard], [shard, shard, replicate, shard]))
    heads = Shard(2)
    strategies.append(([heads, replicate], [heads, replicate, replicate, replicate]))
    if grad_k_pe_partial:
        # In backward, k_pe's gradient sums over heads: a head-sharded q makes it a partial sum.
        # The rotation is linear, so partial sums stay partial.
        partial = Partial()
        strategies.append(([heads, partial], [heads, partial, replicate, replicate]))
        strategies.append(([partial, partial], [partial, partial, replicate, replicate]))
    return strategies


@register_sharding(ops.mla_rope.default)
def _mla_rope_sharding(q, k_pe, rope_cache, positions):
    return _mla_rope_strategies(q, grad_k_pe_partial=False)


@register_sharding(ops.mla_rope_backward.default)
def _mla_rope_backward_sharding(grad_q_out, grad_k_pe_out, rope_cache, positions):
    return _mla_rope_strategies(grad_q_out, grad_k_pe_partial=True)
