"""titan_mla::rms_norm / rms_norm_add / rms_norm_backward against float64 references.

On CPU the ops run their Triton kernels under TRITON_INTERPRET=1 and the PyTorch reference
otherwise; tests marked by the ``cuda`` parameter run the compiled kernels on a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import DEVICES, assert_compiled_matches_eager, relative_error, requires_cuda
from torch import nn

from titan_mla.ops import rmsnorm
from titan_mla.ops.rmsnorm import (
    RMSNorm,
    rms_norm,
    rms_norm_add,
    rms_norm_add_reference,
    rms_norm_reference,
    runs_triton,
)

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
EPS = 1e-6


def random_shape(seed: int, hidden_sizes: tuple[int, ...]) -> tuple[int, ...]:
    """1 to 3 leading dims and a hidden size, drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    n_leading = int(torch.randint(1, 4, (), generator=generator))
    leading = torch.randint(1, 7, (n_leading,), generator=generator).tolist()
    hidden = hidden_sizes[int(torch.randint(len(hidden_sizes), (), generator=generator))]
    return (*leading, hidden)


def float64_grads(outputs, grad_outputs, inputs) -> list[torch.Tensor]:
    return list(torch.autograd.grad(outputs, inputs, grad_outputs))


def test_cpu_branch_follows_triton_interpret():
    assert runs_triton(torch.ones(2)) == (os.environ.get("TRITON_INTERPRET") == "1")
    assert runs_triton(torch.ones(2, device="meta")) is False


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", range(4))
def test_rms_norm_matches_float64(device, dtype, seed):
    shape = random_shape(seed, hidden_sizes=(1, 7, 64, 200, 512, 1000))
    torch.manual_seed(seed)
    x = torch.randn(shape, device=device, dtype=dtype) * 3 + 0.5
    weight = torch.randn(shape[-1], device=device, dtype=dtype)
    grad_y = torch.randn(shape, device=device, dtype=dtype)

    x_ours, weight_ours = x.clone().requires_grad_(), weight.clone().requires_grad_()
    y = rms_norm(x_ours, weight_ours, EPS)
    y.backward(grad_y)

    x64, weight64 = x.double().requires_grad_(), weight.double().requires_grad_()
    y64 = rms_norm_reference(x64, weight64, EPS)
    grad_x64, grad_weight64 = float64_grads(y64, grad_y.double(), (x64, weight64))

    assert y.dtype == dtype and y.shape == x.shape
    assert x_ours.grad.dtype == dtype and weight_ours.grad.dtype == dtype
    tolerance = TOLERANCE[dtype]
    assert relative_error(y, y64) <= tolerance
    assert relative_error(x_ours.grad, grad_x64) <= tolerance
    assert relative_error(weight_ours.grad, grad_weight64) <= tolerance


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_residual_output", [True, False])
def test_rms_norm_add_matches_float64(device, dtype, use_residual_output):
    torch.manual_seed(1)
    shape = (3, 13, 96)
    x, residual, grad_y, grad_new_residual = (
        torch.randn(shape, device=device, dtype=dtype) for _ in range(4)
    )
    weight = torch.rand(shape[-1], device=device, dtype=dtype) + 0.5

    inputs = [t.clone().requires_grad_() for t in (x, residual, weight)]
    y, new_residual = rms_norm_add(*inputs, EPS)
    outputs, grads = [y], [grad_y]
    if use_residual_output:
        outputs.append(new_residual)
        grads.append(grad_new_residual)
    torch.autograd.backward(outputs, grads)

    inputs64 = [t.double().requires_grad_() for t in (x, residual, weight)]
    y64, new_residual64 = rms_norm_add_reference(*inputs64, EPS)
    outputs64 = [y64, new_residual64] if use_residual_output else [y64]
    grads64 = float64_grads(outputs64, [g.double() for g in grads], inputs64)

    tolerance = TOLERANCE[dtype]
    # The sum is rounded to x's dtype as in PyTorch: bit-exact, except that Triton's interpreter
    # rounds float32 -> bfloat16 toward zero (the GPU rounds to nearest even), within 1 ulp.
    interpreter_bf16 = device == "cpu" and runs_triton(x) and dtype == torch.bfloat16
    rtol = torch.finfo(dtype).eps if interpreter_bf16 else 0.0
    torch.testing.assert_close(new_residual, x + residual, rtol=rtol, atol=0.0)
    assert relative_error(y, y64) <= tolerance
    for ours, expected in zip(inputs, grads64, strict=True):
        assert ours.grad.dtype == dtype
        assert relative_error(ours.grad, expected) <= tolerance


@pytest.mark.parametrize("device", DEVICES)
def test_fp32_weight_with_bf16_input(device):
    torch.manual_seed(2)
    x = torch.randn(9, 130, device=device, dtype=torch.bfloat16)
    weight = torch.randn(130, device=device, requires_grad=True)
    grad_y = torch.randn_like(x)
    y = rms_norm(x, weight, EPS)
    y.backward(grad_y)
    weight64 = weight.detach().double().requires_grad_()
    y64 = rms_norm_reference(x.double(), weight64, EPS)
    (grad_weight64,) = float64_grads(y64, grad_y.double(), (weight64,))
    assert y.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
    assert relative_error(y, y64) <= 1e-2
    assert relative_error(weight.grad, grad_weight64) <= 1e-2


def nan_padded(rows: int, hidden: int, pad: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    """A (rows, hidden) view with row stride hidden + pad into a NaN-filled buffer."""
    buffer = torch.full((rows, hidden + pad), float("nan"), device=device, dtype=dtype)
    view = buffer[:, :hidden]
    view.copy_(torch.randn(rows, hidden, device=device, dtype=dtype))
    return view


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused_add", [False, True])
def test_strided_inputs_and_nan_padding(device, fused_add):
    torch.manual_seed(3)
    dtype, rows, hidden, pad = torch.float32, 21, 200, 56
    x = nan_padded(rows, hidden, pad, device, dtype)
    residual = nan_padded(rows, hidden, pad, device, dtype)
    grad_y = nan_padded(rows, hidden, pad, device, dtype)
    weight = torch.randn(hidden, device=device, dtype=dtype)
    buffers_before = [t._base.clone() for t in (x, residual, grad_y)]

    x_ours = x.detach().requires_grad_()
    residual_ours = residual.detach().requires_grad_()
    weight_ours = weight.clone().requires_grad_()
    if fused_add:
        y, new_residual = rms_norm_add(x_ours, residual_ours, weight_ours, EPS)
        assert not new_residual.isnan().any()
    else:
        y = rms_norm(x_ours, weight_ours, EPS)
    y.backward(grad_y)

    x64 = x.double().requires_grad_()
    residual64 = residual.double().requires_grad_()
    weight64 = weight.double().requires_grad_()
    if fused_add:
        y64, _ = rms_norm_add_reference(x64, residual64, weight64, EPS)
    else:
        y64 = rms_norm_reference(x64, weight64, EPS)
    inputs64 = (x64, residual64, weight64) if fused_add else (x64, weight64)
    grads64 = float64_grads(y64, grad_y.double(), inputs64)
    grads = (
        [x_ours.grad, residual_ours.grad, weight_ours.grad]
        if fused_add
        else [
            x_ours.grad,
            weight_ours.grad,
        ]
    )

    assert not y.isnan().any()
    assert relative_error(y, y64) <= 1e-5
    for grad, expected in zip(grads, grads64, strict=True):
        assert not grad.isnan().any()
        assert relative_error(grad, expected) <= 1e-5
    # Functional ops: inputs, and the NaN padding around them, are untouched.
    for before, view in zip(buffers_before, (x, residual, grad_y), strict=True):
        assert torch.equal(before.isnan(), view._base.isnan())
        assert torch.equal(before[:, :hidden], view)


@pytest.mark.parametrize("device", DEVICES)
def test_non_unit_column_stride(device):
    torch.manual_seed(4)
    x = torch.randn(64, 10, device=device).t()  # column stride 10
    weight = torch.randn(64, device=device)
    expected = rms_norm_reference(x.double(), weight.double(), EPS)
    assert relative_error(rms_norm(x, weight, EPS), expected) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_weight_grad_is_deterministic(device):
    torch.manual_seed(5)
    rows = 4000 if device == "cuda" else 37
    x = torch.randn(rows, 300, device=device, dtype=torch.bfloat16)
    weight = torch.randn(300, device=device, requires_grad=True)
    grad_y = torch.randn_like(x)
    grads = []
    for _ in range(3):
        weight.grad = None
        rms_norm(x, weight, EPS).backward(grad_y)
        grads.append(weight.grad.clone())
    assert all(torch.equal(grads[0], grad) for grad in grads[1:])


def test_hidden_size_limit():
    x = torch.randn(2, rmsnorm.MAX_HIDDEN_SIZE * 2)
    with pytest.raises(ValueError, match="hidden size"):
        rms_norm(x, torch.ones(x.shape[-1]), EPS)


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_module_matches_nn_rmsnorm(kernels):
    torch.manual_seed(6)
    dim = 48
    ours = RMSNorm(dim, eps=EPS, kernels=kernels)
    baseline = nn.RMSNorm(dim, eps=EPS)
    assert torch.equal(ours.weight, torch.ones(dim))
    assert ours.state_dict().keys() == baseline.state_dict().keys() == {"weight"}
    with torch.no_grad():
        baseline.weight.normal_()
    ours.load_state_dict(baseline.state_dict())

    x, residual = torch.randn(2, 5, dim), torch.randn(2, 5, dim)
    torch.testing.assert_close(ours(x), baseline(x))
    normed, new_residual = ours(x, residual)
    torch.testing.assert_close(new_residual, x + residual)
    torch.testing.assert_close(normed, baseline(x + residual))

    ours.reset_parameters()
    assert torch.equal(ours.weight, torch.ones(dim))


def test_module_rejects_unknown_kernels():
    with pytest.raises(ValueError, match="kernels"):
        RMSNorm(8, kernels="cuda")


def opcheck_samples(device: str) -> list[tuple]:
    """(op, args) covering every rmsnorm op; float inputs require grad for the autograd checks."""
    torch.manual_seed(7)

    def leaf(*shape, dtype=torch.float32):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_()

    x, residual, weight = leaf(3, 4, 40), leaf(3, 4, 40), leaf(40)
    rstd = torch.rand(3, 4, device=device) + 0.5
    grad_y, grad_residual = (
        torch.randn(3, 4, 40, device=device),
        torch.randn(3, 4, 40, device=device),
    )
    ops = torch.ops.titan_mla
    return [
        (ops.rms_norm.default, (x, weight, EPS)),
        (ops.rms_norm.default, (leaf(6, 24, dtype=torch.bfloat16), leaf(24), EPS)),
        (ops.rms_norm_add.default, (x, residual, weight, EPS)),
        (ops.rms_norm_backward.default, (grad_y, x.detach(), weight.detach(), rstd, None)),
        (ops.rms_norm_backward.default, (grad_y, x.detach(), weight.detach(), rstd, grad_residual)),
    ]


@pytest.mark.usefixtures("cpu_reference_branch")
def test_opcheck_cpu_reference_branch():
    for op, args in opcheck_samples("cpu"):
        torch.library.opcheck(op, args)


@requires_cuda
def test_opcheck_cuda_triton_branch():
    for op, args in opcheck_samples("cuda"):
        torch.library.opcheck(op, args)


def norm_block(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    normed, new_residual = rms_norm_add(x, residual, weight, EPS)
    return rms_norm(normed * 2.0, weight, EPS) + new_residual


def check_compiled_matches_eager(device: str, backend: str, dynamic: bool | None = None) -> None:
    torch.manual_seed(8)
    inputs = [torch.randn(2, 7, 64, device=device) for _ in range(2)]
    inputs.append(torch.randn(64, device=device))
    grad = torch.randn(2, 7, 64, device=device)
    assert_compiled_matches_eager(norm_block, inputs, (), grad, backend, dynamic)


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
@pytest.mark.parametrize(("rows", "hidden"), [(8192, 512), (1024, 2048), (513, 4096), (64, 16384)])
def test_cuda_model_shapes(dtype, rows, hidden):
    torch.manual_seed(9)
    x = torch.randn(rows, hidden, device="cuda", dtype=dtype)
    residual = torch.randn_like(x)
    weight = torch.randn(hidden, device="cuda", dtype=dtype)
    grad_y, grad_new_residual = torch.randn_like(x), torch.randn_like(x)

    inputs = [t.clone().requires_grad_() for t in (x, residual, weight)]
    y, new_residual = rms_norm_add(*inputs, EPS)
    torch.autograd.backward([y, new_residual], [grad_y, grad_new_residual])

    inputs64 = [t.double().requires_grad_() for t in (x, residual, weight)]
    y64, new_residual64 = rms_norm_add_reference(*inputs64, EPS)
    grads64 = float64_grads(
        [y64, new_residual64], [grad_y.double(), grad_new_residual.double()], inputs64
    )
    tolerance = TOLERANCE[dtype]
    assert relative_error(y, y64) <= tolerance
    for ours, expected in zip(inputs, grads64, strict=True):
        assert relative_error(ours.grad, expected) <= tolerance
