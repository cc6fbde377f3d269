"""RMSNorm, and RMSNorm fused with the residual add before it, as Triton custom ops.

y = x / sqrt(mean(x^2) + eps) * weight, computed in float32 and returned in x's dtype. The forward
saves one float32 rstd per row; the backward writes dx per row and reduces dweight in two fixed-order
stages (per-program partial sums, then a sum over programs), so gradients are deterministic.

Each op body takes the Triton kernels on CUDA and the PyTorch reference on CPU, except that with
TRITON_INTERPRET=1 eager calls on real CPU tensors run the kernels under Triton's interpreter, so CPU
tests check the kernels' numerics (see ``runs_triton``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor, nn

from .dispatch import reference_dtype, runs_triton

MAX_HIDDEN_SIZE = 16384
# Backward programs per SM: each loops over a contiguous chunk of rows and keeps one dweight partial.
_BACKWARD_PROGRAMS_PER_SM = 4
# Backward programs under the interpreter: more than one, so that CPU tests cover the partial sums.
_INTERPRETER_BACKWARD_PROGRAMS = 3
# Elements of one (partials x columns) tile of the final dweight sum.
_SUM_TILE_ELEMENTS = 8192


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    y_ptr,
    new_residual_ptr,
    rstd_ptr,
    x_row_stride,
    residual_row_stride,
    n_rows,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_COLS)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    rows = rows.to(tl.int64)
    out_offsets = rows[:, None] * n_cols + cols[None, :]

    x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(
            residual_ptr + rows[:, None] * residual_row_stride + cols[None, :], mask=mask, other=0.0
        )
        # The sum is rounded to x's dtype first: the norm sees exactly the residual it returns.
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(new_residual_ptr.dtype.element_ty)
        tl.store(new_residual_ptr + out_offsets, x, mask=mask)
    x = x.to(tl.float32)

    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * weight[None, :]
    tl.store(y_ptr + out_offsets, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_bwd_kernel(
    grad_y_ptr,
    x_ptr,
    weight_ptr,
    rstd_ptr,
    grad_residual_ptr,
    grad_x_ptr,
    grad_weight_partial_ptr,
    grad_y_row_stride,
    x_row_stride,
    grad_residual_row_stride,
    n_rows,
    n_cols,
    HAS_GRAD_RESIDUAL: tl.constexpr,
    TILES_PER_PROGRAM: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK_COLS)
    col_mask = cols < n_cols
    weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    grad_weight = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)

    # A compile-time trip count: Triton pipelines the loop's loads, and the interpreter can run it
    # (it cannot take a runtime range() bound with numpy >= 2.4).
    for tile in range(TILES_PER_PROGRAM):
        rows = (program * TILES_PER_PROGRAM + tile) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        rows = rows.to(tl.int64)
        grad_y = tl.load(
            grad_y_ptr + rows[:, None] * grad_y_row_stride + cols[None, :], mask=mask, other=0.0
        ).to(tl.float32)
        x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)

        x_hat = x.to(tl.float32) * rstd[:, None]
        grad_x_hat = grad_y * weight[None, :]
        # d/dx of x * rstd(x): rstd * (g - x_hat * mean(g * x_hat)) with g = dL/dx_hat.
        projection = tl.sum(grad_x_hat * x_hat, axis=1) / n_cols
        grad_x = (grad_x_hat - x_hat * projection[:, None]) * rstd[:, None]
        if HAS_GRAD_RESIDUAL:
            grad_x += tl.load(
                grad_residual_ptr + rows[:, None] * grad_residual_row_stride + cols[None, :],
                mask=mask,
                other=0.0,
            ).to(tl.float32)
        tl.store(
            grad_x_ptr + rows[:, None] * n_cols + cols[None, :],
            grad_x.to(grad_x_ptr.dtype.element_ty),
            mask=mask,
        )
        grad_weight += grad_y * x_hat

    tl.store(
        grad_weight_partial_ptr + program * n_cols + cols,
        tl.sum(grad_weight, axis=0),
        mask=col_mask,
    )


@triton.jit
def _sum_partials_kernel(
    partial_ptr,
    out_ptr,
    n_partials,
    n_cols,
    BLOCK_PARTIALS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    # All partials of a column block at once, reduced in one fixed order: deterministic dweight.
    cols = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    partials = tl.arange(0, BLOCK_PARTIALS)
    col_mask = cols < n_cols
    mask = (partials < n_partials)[:, None] & col_mask[None, :]
    partial = tl.load(
        partial_ptr + partials[:, None] * n_cols + cols[None, :], mask=mask, other=0.0
    )
    tl.store(out_ptr + cols, tl.sum(partial, axis=0).to(out_ptr.dtype.element_ty), mask=col_mask)


def _rows_view(t: Tensor) -> Tensor:
    """(rows, hidden) view of t with unit column stride (a copy only when there is none)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])


def _check_hidden_size(x: Tensor, weight: Tensor) -> None:
    n_cols = x.shape[-1]
    if weight.shape != (n_cols,):
        raise ValueError(f"weight shape {tuple(weight.shape)} != ({n_cols},)")
    if n_cols > MAX_HIDDEN_SIZE:
        raise ValueError(
            f"hidden size {n_cols} > {MAX_HIDDEN_SIZE}, the largest one row tile holds"
        )


def _forward_config(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_COLS, num_warps): tiles of 8192 elements, whole rows, several of them for
    small hidden sizes so that every program still moves enough bytes; no more rows than there
    are (a decode step norms one row per sequence), with fewer warps for small tiles."""
    block_cols = triton.next_power_of_2(n_cols)
    block_rows = min(max(8192 // block_cols, 1), triton.next_power_of_2(n_rows))
    elements = block_rows * block_cols
    return block_rows, block_cols, 4 if elements <= 2048 else 8 if elements <= 8192 else 16


def _backward_config(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_COLS, num_warps) of the backward's row tiles: smaller than the forward's,
    since each program holds a dweight accumulator tile too (best of a sweep on an H100)."""
    block_cols = triton.next_power_of_2(n_cols)
    block_rows = max(2048 // block_cols, 1)
    elements = block_rows * block_cols
    return block_rows, block_cols, 4 if elements <= 2048 else 8 if elements <= 4096 else 16


def _rms_norm_forward(
    x: Tensor, residual: Tensor | None, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Launch the forward kernel: (y, new_residual or None, rstd), y and new_residual shaped as x."""
    x_rows, weight = _rows_view(x), weight.contiguous()
    n_rows, n_cols = x_rows.shape
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if residual is None:
        residual_rows, new_residual = x_rows, None
    else:
        residual_rows = _rows_view(residual)
        new_residual = torch.empty_like(y)
    block_rows, block_cols, num_warps = _forward_config(n_rows, n_cols)
    torch.library.wrap_triton(_rms_norm_fwd_kernel)[(triton.cdiv(n_rows, block_rows),)](
        x_rows,
        residual_rows,
        weight,
        y,
        y if new_residual is None else new_residual,
        rstd,
        x_rows.stride(0),
        residual_rows.stride(0),
        n_rows,
        n_cols,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
        num_warps=num_warps,
    )
    if new_residual is not None:
        new_residual = new_residual.view(x.shape)
    return y.view(x.shape), new_residual, rstd.view(x.shape[:-1])


def _backward_programs(device: torch.device) -> int:
    if device.type == "cuda":
        sm_count = torch.cuda.get_device_properties(device).multi_processor_count
        return sm_count * _BACKWARD_PROGRAMS_PER_SM
    return _INTERPRETER_BACKWARD_PROGRAMS


def _rms_norm_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, grad_residual: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Launch the backward kernel and the fixed-order dweight sum: (grad_x, grad_weight)."""
    x_rows, grad_y_rows, weight = _rows_view(x), _rows_view(grad_y), weight.contiguous()
    grad_residual_rows = grad_y_rows if grad_residual is None else _rows_view(grad_residual)
    n_rows, n_cols = x_rows.shape
    block_rows, block_cols, num_warps = _backward_config(n_cols)
    n_tiles = max(triton.cdiv(n_rows, block_rows), 1)
    max_programs = _backward_programs(x.device)
    # A power of two tiles per program keeps the compiled variants (one per trip count) few, and
    # under dynamic shapes it guards on ranges of n_rows, not on its value.
    tiles_per_program = 1
    while n_tiles > max_programs * tiles_per_program:
        tiles_per_program *= 2
    n_programs = triton.cdiv(n_tiles, tiles_per_program)

    grad_x = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    grad_weight_partial = torch.empty((n_programs, n_cols), dtype=torch.float32, device=x.device)
    torch.library.wrap_triton(_rms_norm_bwd_kernel)[(n_programs,)](
        grad_y_rows,
        x_rows,
        weight,
        rstd.reshape(-1),
        grad_residual_rows,
        grad_x,
        grad_weight_partial,
        grad_y_rows.stride(0),
        x_rows.stride(0),
        grad_residual_rows.stride(0),
        n_rows,
        n_cols,
        HAS_GRAD_RESIDUAL=grad_residual is not None,
        TILES_PER_PROGRAM=tiles_per_program,
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
        num_warps=num_warps,
    )
    grad_weight = torch.empty_like(weight)
    block_partials = triton.next_power_of_2(max_programs)
    sum_block_cols = max(_SUM_TILE_ELEMENTS // block_partials, 1)
    torch.library.wrap_triton(_sum_partials_kernel)[(triton.cdiv(n_cols, sum_block_cols),)](
        grad_weight_partial,
        grad_weight,
        n_programs,
        n_cols,
        BLOCK_PARTIALS=block_partials,
        BLOCK_COLS=sum_block_cols,
        num_warps=8,
    )
    return grad_x.view(x.shape), grad_weight


def _reference_rstd(x: Tensor, eps: float) -> Tensor:
    x = x.to(reference_dtype(x))
    return torch.rsqrt(x.pow(2).mean(dim=-1) + eps)


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """PyTorch RMSNorm with the kernels' numerics: float32 math (float64 for float64 input)."""
    dtype = reference_dtype(x)
    y = x.to(dtype) * _reference_rstd(x, eps).unsqueeze(-1) * weight.to(dtype)
    return y.to(x.dtype)


def rms_norm_add_reference(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """(rms_norm_reference(x + residual), x + residual), the sum in x's dtype."""
    new_residual = (x + residual).to(x.dtype)
    return rms_norm_reference(new_residual, weight, eps), new_residual


def _reference_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, grad_residual: Tensor | None
) -> tuple[Tensor, Tensor]:
    dtype = reference_dtype(x)
    rstd = rstd.unsqueeze(-1).to(dtype)
    x_hat = x.to(dtype) * rstd
    grad_y = grad_y.to(dtype)
    grad_x_hat = grad_y * weight.to(dtype)
    grad_x = (grad_x_hat - x_hat * (grad_x_hat * x_hat).mean(dim=-1, keepdim=True)) * rstd
    if grad_residual is not None:
        grad_x = grad_x + grad_residual.to(dtype)
    grad_weight = (grad_y * x_hat).reshape(-1, x.shape[-1]).sum(dim=0)
    return grad_x.to(x.dtype), grad_weight.to(weight.dtype)


@torch.library.triton_op("titan_mla::rms_norm", mutates_args=())
def _rms_norm_op(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(y, rstd): rstd is float32 of shape x.shape[:-1], kept for the backward."""
    _check_hidden_size(x, weight)
    if runs_triton(x):
        y, _, rstd = _rms_norm_forward(x, None, weight, eps)
        return y, rstd
    return rms_norm_reference(x, weight, eps), _reference_rstd(x, eps).float()


@torch.library.triton_op("titan_mla::rms_norm_add", mutates_args=())
def _rms_norm_add_op(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, new_residual, rstd) with new_residual = x + residual and y = rms_norm(new_residual)."""
    if x.shape != residual.shape:
        raise ValueError(f"x shape {tuple(x.shape)} != residual shape {tuple(residual.shape)}")
    _check_hidden_size(x, weight)
    if runs_triton(x):
        y, new_residual, rstd = _rms_norm_forward(x, residual, weight, eps)
        return y, new_residual, rstd
    y, new_residual = rms_norm_add_reference(x, residual, weight, eps)
    return y, new_residual, _reference_rstd(new_residual, eps).float()


@torch.library.triton_op("titan_mla::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(
    grad_y: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, grad_residual: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(grad_x, grad_weight); grad_residual, when given, is added to grad_x (the fused-add case,
    where x is the new residual and its own gradient flows through both outputs)."""
    if runs_triton(x):
        return _rms_norm_backward(grad_y, x, weight, rstd, grad_residual)
    return _reference_backward(grad_y, x, weight, rstd, grad_residual)


def _rms_norm_setup_context(ctx, inputs, output) -> None:
    x, weight, _ = inputs
    _, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(x, weight, rstd)


def _rms_norm_autograd(ctx, grad_y: Tensor, _grad_rstd: Tensor | None):
    x, weight, rstd = ctx.saved_tensors
    grad_x, grad_weight = torch.ops.titan_mla.rms_norm_backward(grad_y, x, weight, rstd, None)
    return grad_x, grad_weight, None


def _rms_norm_add_setup_context(ctx, inputs, output) -> None:
    _, residual, weight, _ = inputs
    _, new_residual, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(new_residual, weight, rstd)
    ctx.residual_dtype = residual.dtype


def _rms_norm_add_autograd(
    ctx, grad_y: Tensor, grad_new_residual: Tensor | None, _grad_rstd: Tensor | None
):
    new_residual, weight, rstd = ctx.saved_tensors
    grad_sum, grad_weight = torch.ops.titan_mla.rms_norm_backward(
        grad_y, new_residual, weight, rstd, grad_new_residual
    )
    # x and residual enter only through their sum: both receive its gradient.
    return grad_sum, grad_sum.to(ctx.residual_dtype), grad_weight, None


_rms_norm_op.register_autograd(_rms_norm_autograd, setup_context=_rms_norm_setup_context)
_rms_norm_add_op.register_autograd(
    _rms_norm_add_autograd, setup_context=_rms_norm_add_setup_context
)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dimension of x (any leading shape), through titan_mla::rms_norm."""
    return torch.ops.titan_mla.rms_norm(x, weight, eps)[0]


def rms_norm_add(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass, the sum in x's dtype."""
    y, new_residual, _ = torch.ops.titan_mla.rms_norm_add(x, residual, weight, eps)
    return y, new_residual


class RMSNorm(nn.Module):
    """nn.RMSNorm's parameters and numerics, plus an optional fused residual add.

    ``forward(x)`` returns the normalized x; ``forward(x, residual)`` returns
    ``(norm(x + residual), x + residual)``. ``kernels="triton"`` runs the titan_mla ops,
    ``kernels="torch"`` the plain PyTorch path (F.rms_norm).
    """

    def __init__(self, dim: int, eps: float = 1e-6, kernels: str = "triton") -> None:
        super().__init__()
        if kernels not in ("triton", "torch"):
            raise ValueError(f"kernels must be 'triton' or 'torch', not {kernels!r}")
        self.dim = dim
        self.eps = eps
        self.kernels = kernels
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        if self.kernels == "triton":
            if residual is None:
                return rms_norm(x, self.weight, self.eps)
            return rms_norm_add(x, residual, self.weight, self.eps)
        if residual is None:
            return F.rms_norm(x, (self.dim,), self.weight, self.eps)
        new_residual = x + residual
        return F.rms_norm(new_residual, (self.dim,), self.weight, self.eps), new_residual

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, kernels={self.kernels}"
