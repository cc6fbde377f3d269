"""Weight-only int8 linear for a few rows (decode), as a Triton custom op.

y = (x @ q^T) * scale: q (out_features, in_features) int8 with one float scale per output row, the
layout of torchao's ``Int8WeightOnlyConfig`` (an ``Int8Tensor``'s ``qdata`` and ``scale``). A decode
step multiplies a handful of rows (batch x new tokens) by every weight, so it is bound by reading the
weights: the kernel streams int8 tiles, converts them to the activation dtype in registers (exact:
|q| <= 127) for the tensor-core dot, and splits the input dimension over programs when the output
rows alone give too few programs to keep the memory busy; a second kernel sums the splits' fp32
partial products in a fixed order (deterministic) and applies the scales.

One row takes a matrix-vector kernel instead: at one row a tensor-core tile is mostly padding, so
the products are summed on the CUDA cores, with the row block, the inputs per step and the warps
autotuned per weight shape (int8 dynamic's batch-1 decode uses it for every linear; int8
weight-only for the narrow weights only, and sends the wide ones to torchao's matmul, whose
Inductor reduction reads them faster: see quantization.Int8WeightOnlyLinear).

Why our own kernel: for torchao's int8 matmul at 32 rows, Inductor calls ATen's fp32-loop
``_weight_int8pack_mm`` on the GPU (0.8 ms for 2048 x 8192 on H100, 100x the bf16 matmul).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .dispatch import KERNELS_INTERPRETED, runs_triton

MAX_ROWS = 64  # the kernel's largest row tile; more rows are a GEMM for the usual libraries
# Programs per SM the split over the input dimension aims for: enough loads in flight.
_PROGRAMS_PER_SM = 2
_INTERPRETER_SM_COUNT = 2  # few programs under the interpreter: fast CPU tests, splits still used
_BLOCK_N = 64
_BLOCK_K = 256
# The one-row kernel's loop bound, n_in rounded up to this, is a constexpr (a compile-time trip
# count; the interpreter cannot loop to a runtime bound): a multiple of every config's BLOCK_K.
_GEMV_K_MULTIPLE = 2048


def _gemv_configs() -> list[triton.Config]:
    """(output rows per program, inputs per step, warps) for one row: whole 2048-input rows per
    step put a program's loads in flight at once (the 1B model's inputs are 2048 or 8192 wide),
    small row blocks give the narrow weights enough programs. The interpreter takes the first
    alone (the autotuner times only when there is a choice): the largest block, since the
    interpreter's cost is per program and per loop step (CPU tests decode through it)."""
    configs = [
        triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=warps)
        for block_n, block_k, warps in (
            (16, 1024, 8),
            (4, 1024, 4),
            (1, 2048, 4),
            (2, 2048, 4),
            (4, 2048, 4),
            (4, 2048, 8),
            (8, 2048, 8),
            (8, 1024, 4),
            (8, 512, 4),
            (16, 512, 4),
        )
    ]
    return configs[:1] if KERNELS_INTERPRETED else configs


@triton.autotune(configs=_gemv_configs(), key=["n_out", "n_in"])
@triton.jit
def _int8_gemv_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    out_ptr,
    n_out,
    n_in,
    K_END: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One row of x against BLOCK_N weight rows: fp32 products accumulated per lane (no
    reduction, hence no barrier, inside the loop), one reduction at the end, the scales applied
    to the sums."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_out
    weight_rows = q_ptr + cols[:, None].to(tl.int64) * n_in
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k in range(0, K_END, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        k_mask = ks < n_in
        x = tl.load(x_ptr + ks, mask=k_mask, other=0.0).to(tl.float32)
        q = tl.load(weight_rows + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0)
        acc += q.to(tl.float32) * x[None, :]
    scale = tl.load(scale_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = tl.sum(acc, axis=1) * scale
    tl.store(out_ptr + cols, y.to(out_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def _int8_linear_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    out_ptr,
    partial_ptr,
    n_rows,
    n_out,
    n_in,
    x_row_stride,
    K_PER_SPLIT: tl.constexpr,
    SPLITS: tl.constexpr,
    FP32_DOTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One (BLOCK_N output features) x (K_PER_SPLIT inputs) block of every row: the scaled result
    when SPLITS == 1, else the fp32 partial product of split program_id(1)."""
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < n_out
    k_start = tl.program_id(1) * K_PER_SPLIT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # A compile-time trip count: Triton pipelines the loop's loads.
    for k in range(0, K_PER_SPLIT, BLOCK_K):
        ks = k_start + k + tl.arange(0, BLOCK_K)
        k_mask = ks < n_in
        x = tl.load(
            x_ptr + rows[:, None] * x_row_stride + ks[None, :],
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        q = tl.load(
            q_ptr + cols[:, None].to(tl.int64) * n_in + ks[None, :],
            mask=col_mask[:, None] & k_mask[None, :],
            other=0,
        )
        if FP32_DOTS:  # fp32 activations, and the interpreter (whose bf16 dots are not exact)
            acc = tl.dot(x.to(tl.float32), tl.trans(q.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(q.to(x.dtype)), acc)
    mask = row_mask[:, None] & col_mask[None, :]
    if SPLITS == 1:
        scale = tl.load(scale_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = acc * scale[None, :]
        tl.store(
            out_ptr + rows[:, None] * n_out + cols[None, :],
            y.to(out_ptr.dtype.element_ty),
            mask=mask,
        )
    else:
        partial = partial_ptr + (tl.program_id(1) * n_rows + rows[:, None]) * n_out + cols[None, :]
        tl.store(partial, acc, mask=mask)


@triton.jit
def _sum_splits_kernel(
    partial_ptr,
    scale_ptr,
    out_ptr,
    n_rows,
    n_out,
    SPLITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_out
    mask = (rows < n_rows)[:, None] & col_mask[None, :]
    offsets = rows[:, None] * n_out + cols[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for split in tl.static_range(SPLITS):
        acc += tl.load(partial_ptr + split * n_rows * n_out + offsets, mask=mask, other=0.0)
    scale = tl.load(scale_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, (acc * scale[None, :]).to(out_ptr.dtype.element_ty), mask=mask)


def split_count(n_out: int, n_in: int, device: torch.device) -> tuple[int, int]:
    """(splits of the input dimension, inputs per split, a multiple of the K tile): about
    _PROGRAMS_PER_SM programs per SM, and never a split without inputs."""
    sm_count = (
        torch.cuda.get_device_properties(device).multi_processor_count
        if device.type == "cuda"
        else _INTERPRETER_SM_COUNT
    )
    tiles = triton.cdiv(n_out, _BLOCK_N)
    wanted = max(1, min(_PROGRAMS_PER_SM * sm_count // tiles, triton.cdiv(n_in, _BLOCK_K)))
    per_split = triton.cdiv(triton.cdiv(n_in, wanted), _BLOCK_K) * _BLOCK_K
    return triton.cdiv(n_in, per_split), per_split


def _check(x: Tensor, qdata: Tensor, scale: Tensor) -> tuple[int, int, int]:
    n_out, n_in = qdata.shape
    n_rows = x.numel() // max(x.shape[-1], 1)
    if x.shape[-1] != n_in or qdata.dtype != torch.int8 or scale.numel() != n_out:
        raise ValueError(
            f"int8_weight_only_linear: x (..., {x.shape[-1]}), int8 weight (out, in) = "
            f"{tuple(qdata.shape)} {qdata.dtype} and {scale.numel()} scales do not fit"
        )
    if n_rows > MAX_ROWS:
        raise ValueError(f"int8_weight_only_linear takes at most {MAX_ROWS} rows, not {n_rows}")
    return n_rows, n_out, n_in


def int8_weight_only_linear_reference(x: Tensor, qdata: Tensor, scale: Tensor) -> Tensor:
    """The PyTorch reference (and CPU path): dequantized weight, fp32 (or x's wider) accumulation."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    weight = qdata.to(compute) * scale.reshape(-1, 1).to(compute)
    return (x.to(compute) @ weight.t()).to(x.dtype)


@torch.library.triton_op("titan_mla::int8_weight_only_linear", mutates_args=())
def int8_weight_only_linear(x: Tensor, qdata: Tensor, scale: Tensor) -> Tensor:
    """x (..., in) @ dequantized(qdata (out, in) int8, scale (out,) or (out, 1))^T -> (..., out)
    in x's dtype, for at most MAX_ROWS rows of x."""
    n_rows, n_out, n_in = _check(x, qdata, scale)
    if not runs_triton(x):
        return int8_weight_only_linear_reference(x, qdata, scale)
    x_rows = x.reshape(n_rows, n_in)
    if x_rows.stride(-1) != 1:
        x_rows = x_rows.contiguous()
    qdata = qdata.contiguous()
    out = x.new_empty(n_rows, n_out)
    scale = scale.reshape(-1)
    if n_rows == 1:
        torch.library.wrap_triton(_int8_gemv_kernel)[
            lambda meta: (triton.cdiv(n_out, meta["BLOCK_N"]),)
        ](
            x_rows,
            qdata,
            scale,
            out,
            n_out,
            n_in,
            triton.cdiv(n_in, _GEMV_K_MULTIPLE) * _GEMV_K_MULTIPLE,
        )
        return out.reshape(*x.shape[:-1], n_out)
    splits, per_split = split_count(n_out, n_in, x.device)
    block_m = max(16, triton.next_power_of_2(n_rows))
    # Only read when splits > 1; a 0-element placeholder otherwise.
    partial = x.new_empty(splits * n_rows * n_out if splits > 1 else 0, dtype=torch.float32)
    tiles = triton.cdiv(n_out, _BLOCK_N)
    torch.library.wrap_triton(_int8_linear_kernel)[(tiles, splits)](
        x_rows,
        qdata,
        scale,
        out,
        partial,
        n_rows,
        n_out,
        n_in,
        x_rows.stride(0),
        K_PER_SPLIT=per_split,
        SPLITS=splits,
        FP32_DOTS=x.dtype == torch.float32 or KERNELS_INTERPRETED,
        BLOCK_M=block_m,
        BLOCK_N=_BLOCK_N,
        BLOCK_K=_BLOCK_K,
        num_warps=4,
        num_stages=4,
    )
    if splits > 1:
        torch.library.wrap_triton(_sum_splits_kernel)[(tiles,)](
            partial,
            scale,
            out,
            n_rows,
            n_out,
            SPLITS=splits,
            BLOCK_M=block_m,
            BLOCK_N=_BLOCK_N,
            num_warps=4,
        )
    return out.reshape(*x.shape[:-1], n_out)
