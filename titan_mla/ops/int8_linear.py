"""Weight-only int8 linear for a few rows (decode), as a Triton custom op.

y = (x @ q^T) * scale: q (out_features, in_features) int8 with one float scale per output row, the
layout of torchao's ``Int8WeightOnlyConfig`` (an ``Int8Tensor``'s ``qdata`` and ``scale``). A decode
step multiplies a handful of rows (batch x new tokens) by every weight, so it is bound by reading the
weights: the kernel streams int8 tiles, converts them to the activation dtype in registers (exact:
|q| <= 127) for the tensor-core dot, and splits the input dimension over programs when the output
rows alone give too few programs to keep the memory busy; a second kernel sums the splits' fp32
partial products in a fixed order (deterministic) and applies the scales.

One row takes a matrix-vector kernel instead: at one row a tensor-core tile is mostly padding, so
the products are summed on the CUDA cores, with the row block, the inputs per step, the warps and
the pipeline stages autotuned per weight shape. It also reads two weights of one input in one
launch: the SwiGLU's gate and up projections with silu(gate) * up as its epilogue
(``int8_weight_only_swiglu``), or two outputs side by side (``int8_weight_only_concat_linear``:
the attention's wq and wkv_a). It can add a residual row to the input as it reads it and
RMS-normalize it (the 1/rms, one number per row, applied to the sums), and add the residual stream
to the output in its epilogue: the block's norms and residual adds then need no launches of their
own. Int8 weight-only's batch-1 decode runs every layer linear through it and only the output head
through torchao's matmul (quantization.Int8WeightOnlyLinear); int8 dynamic's through it for every
linear.

Why our own kernel: for torchao's int8 matmul at 32 rows, Inductor calls ATen's fp32-loop
``_weight_int8pack_mm`` on the GPU (0.8 ms for 2048 x 8192 on H100, 100x the bf16 matmul).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.nn import functional as F

from .dispatch import KERNELS_INTERPRETED, reference_dtype, runs_triton
from .rmsnorm import rms_norm_reference

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
    """The one-row kernel's launch configurations: the interpreter takes a single one (the
    autotuner times only when there is a choice), the largest block, since the interpreter's cost
    is per program and per loop step (CPU tests decode through it)."""
    candidates = [_INTERPRETER_GEMV] if KERNELS_INTERPRETED else GEMV_CANDIDATES
    return [
        triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k, "STAGES": stages}, num_warps=warps)
        for block_n, block_k, warps, stages in candidates
    ]


_INTERPRETER_GEMV = (16, 1024, 8, 1)
# (output rows per program, inputs per step, warps, pipeline stages) for one row, the fastest at
# some 1B decode shape in sweeps on H100 and H200 (benchmarks/NOTES.md): whole 2048-input steps of
# 1-4 rows for many programs in flight, or stages that keep several steps of weight tiles in
# flight per program (asynchronous copies: the loop has no dot, so the pipeliner takes its loads
# only when asked through ``tl.range``). Every one builds for sm_90 without register spills in the
# heaviest launches, two accumulators and the block's norm (a test compiles them): pipelined
# tiles of more than 32 products per thread spill there, so none is a candidate.
GEMV_CANDIDATES = (
    (1, 2048, 4, 1),
    (2, 2048, 4, 1),
    (4, 2048, 8, 1),
    (4, 1024, 4, 1),
    (1, 2048, 4, 2),
    (2, 2048, 4, 2),
    (1, 2048, 8, 2),
    (1, 1024, 4, 4),
    (2, 1024, 4, 4),
    (4, 1024, 4, 3),
    (2, 512, 4, 4),
    (4, 512, 4, 4),
    (8, 512, 4, 4),
    (4, 256, 4, 4),
    (8, 256, 4, 4),
    (16, 256, 4, 4),
)


@triton.jit
def _input_chunk(x_row, input_residual_row, ks, k_mask, INPUT_RESIDUAL: tl.constexpr):
    """Inputs ks of the row: x, or x + the residual row rounded to x's dtype (as the model sums
    its residual stream)."""
    x = tl.load(x_row + ks, mask=k_mask, other=0.0)
    if INPUT_RESIDUAL:
        residual = tl.load(input_residual_row + ks, mask=k_mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)
    return x


@triton.autotune(
    configs=_gemv_configs(),
    key=["n_out", "n_first", "n_in", "GATED", "INPUT_RESIDUAL", "NORM", "OUTPUT_RESIDUAL"],
)
@triton.jit
def _int8_gemv_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    second_q_ptr,
    second_scale_ptr,
    input_residual_ptr,
    norm_weight_ptr,
    residual_ptr,
    update_ptr,
    out_ptr,
    n_out,
    n_first,
    n_in,
    x_row_stride,
    eps,
    K_END: tl.constexpr,
    GATED: tl.constexpr,
    INPUT_RESIDUAL: tl.constexpr,
    NORM: tl.constexpr,
    OUTPUT_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Row program_id(1) of x against BLOCK_N weight rows: fp32 products accumulated per lane
    (no reduction, hence no barrier, inside the loop), one reduction at the end, the scales
    applied to the sums.

    Two weights with one input, two ways: GATED, silu(x @ second^T) * (x @ q^T) (the SwiGLU's
    hidden activation, second = gate) from one pass over both; else outputs n_first.. n_out - 1
    come from the rows of the second weight, as if it were concatenated below the first (one
    weight alone: n_first = n_out).

    So that the block's norms and residual adds need no launches of their own: INPUT_RESIDUAL,
    the input row is x + a residual row (rounded to x's dtype); NORM, it is RMS-normalized first
    (weight norm_weight; kept in fp32, where ops.rmsnorm rounds its output to x's dtype);
    OUTPUT_RESIDUAL 1, the output (rounded to its dtype) plus a residual row, 2: plus (residual +
    update) rounded, the residual stream after an update the kernel's input came from.
    """
    row = tl.program_id(1)
    x_row = x_ptr + row * x_row_stride
    input_residual_row = input_residual_ptr + row * n_in
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_out
    cols_64 = cols.to(tl.int64)
    if GATED:
        weight_rows = q_ptr + cols_64 * n_in
        scale = tl.load(scale_ptr + cols, mask=col_mask, other=0.0)
        gate_rows = second_q_ptr + cols_64 * n_in
        gate_scale = tl.load(second_scale_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    else:
        first = cols < n_first
        weight_rows = tl.where(
            first, q_ptr + cols_64 * n_in, second_q_ptr + (cols_64 - n_first) * n_in
        )
        scale = tl.where(
            first,
            tl.load(scale_ptr + cols, mask=col_mask & first, other=0.0),
            tl.load(second_scale_ptr + cols - n_first, mask=col_mask & ~first, other=0.0),
        )
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    gate_acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k in tl.range(0, K_END, BLOCK_K, num_stages=STAGES):
        ks = k + tl.arange(0, BLOCK_K)
        k_mask = ks < n_in
        mask = col_mask[:, None] & k_mask[None, :]
        x = _input_chunk(x_row, input_residual_row, ks, k_mask, INPUT_RESIDUAL)
        x = x.to(tl.float32)
        if NORM:
            squares += x * x
            x *= tl.load(norm_weight_ptr + ks, mask=k_mask, other=0.0).to(tl.float32)
        q = tl.load(weight_rows[:, None] + ks[None, :], mask=mask, other=0)
        acc += q.to(tl.float32) * x[None, :]
        if GATED:
            gate_q = tl.load(gate_rows[:, None] + ks[None, :], mask=mask, other=0)
            gate_acc += gate_q.to(tl.float32) * x[None, :]
    # The norm's 1/rms is one number per row: applied to the sums, it needs no pass over the
    # input before the weights stream (a prologue pass made every launch wait for it).
    rstd = 1.0
    if NORM:
        rstd = tl.rsqrt(tl.sum(squares) / n_in + eps)
    y = tl.sum(acc, axis=1) * (scale.to(tl.float32) * rstd)
    if GATED:
        gate = tl.sum(gate_acc, axis=1) * (gate_scale * rstd)
        y = gate * tl.sigmoid(gate) * y
    y = y.to(out_ptr.dtype.element_ty)
    if OUTPUT_RESIDUAL > 0:
        residual = tl.load(residual_ptr + row * n_out + cols, mask=col_mask, other=0.0)
        if OUTPUT_RESIDUAL == 2:
            update = tl.load(update_ptr + row * n_out + cols, mask=col_mask, other=0.0)
            residual = (update.to(tl.float32) + residual.to(tl.float32)).to(y.dtype)
        y = (residual.to(tl.float32) + y.to(tl.float32)).to(y.dtype)
    tl.store(out_ptr + row * n_out + cols, y, mask=col_mask)


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


def _check(op: str, x: Tensor, *weights: tuple[Tensor, Tensor]) -> tuple[int, int]:
    """(rows, in) of x (..., in), which every (qdata (out, in) int8, scale (out,)) of ``weights``
    multiplies."""
    n_in = x.shape[-1]
    n_rows = x.numel() // max(n_in, 1)
    for qdata, scale in weights:
        if (
            qdata.ndim != 2
            or qdata.shape[1] != n_in
            or qdata.dtype != torch.int8
            or scale.numel() != qdata.shape[0]
        ):
            raise ValueError(
                f"{op}: x (..., {n_in}), int8 weight (out, in) = "
                f"{tuple(qdata.shape)} {qdata.dtype} and {scale.numel()} scales do not fit"
            )
    if n_rows > MAX_ROWS:
        raise ValueError(f"{op} takes at most {MAX_ROWS} rows, not {n_rows}")
    return n_rows, n_in


def _check_block_input(
    op: str, x: Tensor, residual: Tensor | None, norm_weight: Tensor | None
) -> None:
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"{op}: residual {tuple(residual.shape)} is not x's {tuple(x.shape)}")
    if norm_weight is not None and norm_weight.shape != x.shape[-1:]:
        raise ValueError(
            f"{op}: norm weight {tuple(norm_weight.shape)} for inputs of {x.shape[-1]}"
        )


def _dequantized_product(x: Tensor, qdata: Tensor, scale: Tensor) -> Tensor:
    """x @ dequantized weight^T in float32 (or x's wider dtype)."""
    compute = reference_dtype(x)
    weight = qdata.to(compute) * scale.reshape(-1, 1).to(compute)
    return x.to(compute) @ weight.t()


def int8_weight_only_linear_reference(
    x: Tensor,
    qdata: Tensor,
    scale: Tensor,
    residual: Tensor | None = None,
    update: Tensor | None = None,
) -> Tensor:
    """The PyTorch reference (and CPU path): dequantized weight, fp32 (or x's wider) accumulation;
    ``residual`` (or ``update`` + ``residual``) added to the product rounded to x's dtype."""
    return _plus_residual(_dequantized_product(x, qdata, scale).to(x.dtype), residual, update)


def _plus_residual(x: Tensor, residual: Tensor | None, update: Tensor | None = None) -> Tensor:
    """x + residual, or x + (update + residual), each sum rounded to x's dtype as the model sums
    its residual stream (what the kernel computes on its input and output)."""
    if residual is None:
        return x
    if update is not None:
        residual = (update + residual).to(x.dtype)
    return (residual + x).to(x.dtype)


def _block_input(
    x: Tensor, residual: Tensor | None, norm_weight: Tensor | None, eps: float
) -> Tensor:
    """x (+ residual, rounded to x's dtype), RMS-normalized as ops.rmsnorm's reference does but
    left in float32 (float64 for float64 x), as the kernel multiplies it."""
    x = _plus_residual(x, residual)
    if norm_weight is None:
        return x
    return rms_norm_reference(x.to(reference_dtype(x)), norm_weight, eps)


def int8_weight_only_swiglu_reference(
    x: Tensor,
    gate_qdata: Tensor,
    gate_scale: Tensor,
    up_qdata: Tensor,
    up_scale: Tensor,
    residual: Tensor | None = None,
    norm_weight: Tensor | None = None,
    eps: float = 0.0,
) -> Tensor:
    """silu(x @ gate^T) * (x @ up^T) of the dequantized weights, rounded once to x's dtype, of the
    block input made from x, ``residual`` and ``norm_weight`` (see int8_weight_only_swiglu)."""
    u = _block_input(x, residual, norm_weight, eps)
    gate = _dequantized_product(u, gate_qdata, gate_scale)
    return (F.silu(gate) * _dequantized_product(u, up_qdata, up_scale)).to(x.dtype)


def int8_weight_only_concat_linear_reference(
    x: Tensor,
    first_qdata: Tensor,
    first_scale: Tensor,
    second_qdata: Tensor,
    second_scale: Tensor,
    norm_weight: Tensor | None = None,
    eps: float = 0.0,
) -> Tensor:
    """x @ [first; second]^T of the dequantized weights, x first RMS-normalized with
    ``norm_weight`` (as ops.rmsnorm's reference computes it) when that is given."""
    u = _block_input(x, None, norm_weight, eps)
    first = _dequantized_product(u, first_qdata, first_scale)
    return torch.cat([first, _dequantized_product(u, second_qdata, second_scale)], -1).to(x.dtype)


def _rows(x: Tensor, n_rows: int, n_in: int) -> Tensor:
    x_rows = x.reshape(n_rows, n_in)
    return x_rows if x_rows.stride(-1) == 1 else x_rows.contiguous()


def _gemv(
    x_rows: Tensor,
    first: tuple[Tensor, Tensor],
    second: tuple[Tensor, Tensor] | None = None,
    *,
    gated: bool = False,
    input_residual: Tensor | None = None,
    norm_weight: Tensor | None = None,
    eps: float = 0.0,
    residual: Tensor | None = None,
    update: Tensor | None = None,
) -> Tensor:
    """The matrix-vector kernel, one program row per row of x_rows: x @ first^T; with ``second``,
    silu(x @ second^T) * (x @ first^T) when ``gated``, else x @ [first; second]^T. The input row
    is x + ``input_residual`` (rows, in) when that is given, RMS-normalized with ``norm_weight``
    and ``eps`` when that is; ``residual`` (rows, out), or ``residual`` + ``update``, is added to
    the output."""
    (qdata, scale), (second_qdata, second_scale) = first, second or first
    n_rows, n_in = x_rows.shape
    n_first = qdata.shape[0]
    n_out = n_first + (second_qdata.shape[0] if second is not None and not gated else 0)
    out = x_rows.new_empty(n_rows, n_out)
    flags = (gated, input_residual is not None, norm_weight is not None)
    output_residual = 0 if residual is None else 1 if update is None else 2
    # Tensors a launch does not read are passed as placeholders.
    input_residual, residual, update = (
        x_rows if t is None else t.reshape(n_rows, -1).contiguous()
        for t in (input_residual, residual, update)
    )
    norm_weight = scale if norm_weight is None else norm_weight
    torch.library.wrap_triton(_int8_gemv_kernel)[
        lambda meta: (triton.cdiv(n_out, meta["BLOCK_N"]), n_rows)
    ](
        x_rows,
        qdata.contiguous(),
        scale.reshape(-1),
        second_qdata.contiguous(),
        second_scale.reshape(-1),
        input_residual,
        norm_weight,
        residual,
        update,
        out,
        n_out,
        n_first,
        n_in,
        x_rows.stride(0),
        eps,
        triton.cdiv(n_in, _GEMV_K_MULTIPLE) * _GEMV_K_MULTIPLE,
        *flags,
        output_residual,
    )
    return out


def _tiled_linear(x_rows: Tensor, qdata: Tensor, scale: Tensor) -> Tensor:
    """The tensor-core kernel (input dimension split when the output tiles are too few) and,
    when split, the deterministic sum of the splits."""
    n_rows, n_in = x_rows.shape
    n_out = qdata.shape[0]
    qdata, scale = qdata.contiguous(), scale.reshape(-1)
    out = x_rows.new_empty(n_rows, n_out)
    splits, per_split = split_count(n_out, n_in, x_rows.device)
    block_m = max(16, triton.next_power_of_2(n_rows))
    # Only read when splits > 1; a 0-element placeholder otherwise.
    partial = x_rows.new_empty(splits * n_rows * n_out if splits > 1 else 0, dtype=torch.float32)
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
        FP32_DOTS=x_rows.dtype == torch.float32 or KERNELS_INTERPRETED,
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
    return out


@torch.library.triton_op("titan_mla::int8_weight_only_linear", mutates_args=())
def int8_weight_only_linear(
    x: Tensor,
    qdata: Tensor,
    scale: Tensor,
    residual: Tensor | None = None,
    update: Tensor | None = None,
) -> Tensor:
    """x (..., in) @ dequantized(qdata (out, in) int8, scale (out,) or (out, 1))^T -> (..., out)
    in x's dtype, for at most MAX_ROWS rows of x; plus ``residual`` (..., out) when given, or plus
    ``update`` + ``residual`` (the residual stream after an update: the model's two residual adds
    of a block), each sum rounded to x's dtype as the model rounds it. For one row the additions
    are the kernel's epilogue: no launches of their own."""
    n_rows, n_in = _check("int8_weight_only_linear", x, (qdata, scale))
    out_shape = (*x.shape[:-1], qdata.shape[0])
    for name, tensor in (("residual", residual), ("update", update)):
        if tensor is not None and tensor.shape != out_shape:
            raise ValueError(
                f"int8_weight_only_linear: {name} {tuple(tensor.shape)} is not the output's "
                f"shape {out_shape}"
            )
    if update is not None and residual is None:
        raise ValueError("int8_weight_only_linear: an update needs the residual it adds to")
    if not runs_triton(x):
        return int8_weight_only_linear_reference(x, qdata, scale, residual, update)
    x_rows = _rows(x, n_rows, n_in)
    if n_rows == 1:
        return _gemv(x_rows, (qdata, scale), residual=residual, update=update).reshape(out_shape)
    return _plus_residual(_tiled_linear(x_rows, qdata, scale).reshape(out_shape), residual, update)


@torch.library.triton_op("titan_mla::int8_weight_only_concat_linear", mutates_args=())
def int8_weight_only_concat_linear(
    x: Tensor,
    first_qdata: Tensor,
    first_scale: Tensor,
    second_qdata: Tensor,
    second_scale: Tensor,
    norm_weight: Tensor | None = None,
    eps: float = 0.0,
) -> Tensor:
    """x (..., in) @ [first; second]^T -> (..., first out + second out): two int8 linears of one
    input as one (the attention's query and latent projections), for at most MAX_ROWS rows of x;
    with ``norm_weight`` (in,), of x RMS-normalized first (the block's attention norm, whose
    output only these two linears read). One row reads both weights in one matrix-vector launch,
    the norm folded in; more rows take the tensor-core kernel per weight."""
    first, second = (first_qdata, first_scale), (second_qdata, second_scale)
    n_rows, n_in = _check("int8_weight_only_concat_linear", x, first, second)
    _check_block_input("int8_weight_only_concat_linear", x, None, norm_weight)
    if not runs_triton(x):
        return int8_weight_only_concat_linear_reference(x, *first, *second, norm_weight, eps)
    x_rows = _rows(x, n_rows, n_in)
    if n_rows == 1:
        out = _gemv(x_rows, first, second, norm_weight=norm_weight, eps=eps)
    else:
        x_rows = _block_input(x_rows, None, norm_weight, eps).to(x.dtype)  # the MMA's input
        out = torch.cat([_tiled_linear(x_rows, *first), _tiled_linear(x_rows, *second)], -1)
    return out.reshape(*x.shape[:-1], -1)


@torch.library.triton_op("titan_mla::int8_weight_only_swiglu", mutates_args=())
def int8_weight_only_swiglu(
    x: Tensor,
    gate_qdata: Tensor,
    gate_scale: Tensor,
    up_qdata: Tensor,
    up_scale: Tensor,
    residual: Tensor | None = None,
    norm_weight: Tensor | None = None,
    eps: float = 0.0,
) -> Tensor:
    """silu(u @ gate^T) * (u @ up^T) -> (..., hidden) in x's dtype, a SwiGLU's hidden activation
    from int8 gate (w1) and up (w3) weights of the same shape, for at most MAX_ROWS rows of x. The
    input u is x, or x + ``residual`` (..., in) rounded to x's dtype, RMS-normalized with
    ``norm_weight`` (in,) when that is given: the block's residual add and FFN norm. One row reads
    both weights in one matrix-vector launch, the sum and the norm folded into its pass and the
    product as its epilogue (the gate and up outputs never go to memory); more rows take the
    tensor-core kernel per weight."""
    gate, up = (gate_qdata, gate_scale), (up_qdata, up_scale)
    n_rows, n_in = _check("int8_weight_only_swiglu", x, gate, up)
    if gate_qdata.shape != up_qdata.shape:
        raise ValueError(
            f"int8_weight_only_swiglu: gate and up weights of different shapes, "
            f"{tuple(gate_qdata.shape)} and {tuple(up_qdata.shape)}"
        )
    _check_block_input("int8_weight_only_swiglu", x, residual, norm_weight)
    if not runs_triton(x):
        return int8_weight_only_swiglu_reference(x, *gate, *up, residual, norm_weight, eps)
    x_rows = _rows(x, n_rows, n_in)
    if n_rows == 1:
        out = _gemv(
            x_rows,
            up,
            gate,
            gated=True,
            input_residual=residual,
            norm_weight=norm_weight,
            eps=eps,
        )
    else:
        residual_rows = None if residual is None else residual.reshape(n_rows, n_in)
        x_rows = _block_input(x_rows, residual_rows, norm_weight, eps).to(x.dtype)
        out = F.silu(_tiled_linear(x_rows, *gate)) * _tiled_linear(x_rows, *up)
    return out.reshape(*x.shape[:-1], -1)
