"""titan_mla::int8_weight_only_linear against a float64 dequantized matmul, and the int8 decode
linear that quantize_model puts in place of torchao's matmul for decode-sized inputs.

On CPU the op runs its Triton kernel under TRITON_INTERPRET=1 (the PyTorch reference otherwise);
tests marked by the ``cuda`` parameter run the compiled kernel on a GPU.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from expecttest import assert_expected_inline
from helpers import DEVICES, relative_error, requires_cuda, run_without_interpreter
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from titan_mla.models import mla_flavors
from titan_mla.models.model import MultiHeadLatentAttention, SwiGLU
from titan_mla.ops import RMSNorm, rms_norm_reference
from titan_mla.ops.int8_linear import (
    MAX_ROWS,
    _int8_gemv_kernel,
    int8_weight_only_concat_linear,
    int8_weight_only_concat_linear_reference,
    int8_weight_only_linear,
    int8_weight_only_linear_reference,
    int8_weight_only_swiglu,
    int8_weight_only_swiglu_reference,
    split_count,
)
from titan_mla.quantization import quantize_model, schemes
from titan_mla.quantization.schemes import (
    Int8DynamicLinear,
    Int8WeightOnlyLinear,
    Int8WeightOnlyMLA,
    Int8WeightOnlySwiGLU,
)

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def nan_padded_inputs(rows, n_out, n_in, device, dtype, generator):
    """x (rows, n_in) as a view into a NaN-filled buffer with wider rows (the kernel must stay
    within each row's n_in values), a random int8 weight and positive per-row scales."""
    buffer = torch.full((rows, n_in + 9), float("nan"), dtype=dtype)
    buffer[:, :n_in] = torch.randn(rows, n_in, generator=generator).to(dtype)
    qdata = torch.randint(-127, 128, (n_out, n_in), generator=generator, dtype=torch.int8)
    scale = torch.rand(n_out, 1, generator=generator) / 127 + 1e-4
    return buffer.to(device)[:, :n_in], qdata.to(device), scale.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "rows, n_out, n_in",
    [(1, 40, 1100), (5, 200, 520), (33, 100, 64), (MAX_ROWS, 70, 600)],
)
def test_matches_float64(device, dtype, rows, n_out, n_in):
    generator = torch.Generator().manual_seed(rows * n_out + n_in)
    x, qdata, scale = nan_padded_inputs(rows, n_out, n_in, device, dtype, generator)
    ours = int8_weight_only_linear(x, qdata, scale)
    expected = int8_weight_only_linear_reference(x.double(), qdata, scale)
    assert ours.shape == (rows, n_out) and ours.dtype == dtype and not ours.isnan().any()
    assert relative_error(ours, expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, n_out, n_in", [(1, 40, 1100), (5, 200, 520)])
def test_swiglu_matches_float64(device, dtype, rows, n_out, n_in):
    """silu(u gate^T) * (u up^T), u = x or norm(x + residual): one row through the
    matrix-vector kernel's fused pass over both weights, 5 rows through the tensor-core kernel per
    weight."""
    generator = torch.Generator().manual_seed(rows * n_out + n_in)
    x, gate_qdata, gate_scale = nan_padded_inputs(rows, n_out, n_in, device, dtype, generator)
    _, up_qdata, up_scale = nan_padded_inputs(rows, n_out, n_in, device, dtype, generator)
    weights = (gate_qdata, gate_scale, up_qdata, up_scale)
    residual = torch.randn(rows, n_in, generator=generator).to(device, dtype)
    norm_weight = (torch.rand(n_in, generator=generator) + 0.5).to(device, dtype)
    # Plain, and the block's second half: the residual added and rounded to x's dtype as the
    # model rounds it, then normalized (the float64 products take that input).
    block_input = rms_norm_reference((x + residual).to(dtype).double(), norm_weight, 1e-5)
    for args, u in (((), x), ((residual, norm_weight, 1e-5), block_input)):
        ours = int8_weight_only_swiglu(x, *weights, *args)
        expected = int8_weight_only_swiglu_reference(u.double(), *weights)
        assert ours.shape == (rows, n_out) and ours.dtype == dtype and not ours.isnan().any()
        assert relative_error(ours, expected) < TOLERANCE[dtype]
    # The fused pass is neither the plain one nor the plain product of either weight.
    plain = int8_weight_only_swiglu(x, *weights)
    assert relative_error(ours, plain) > 0.1
    assert relative_error(plain, int8_weight_only_linear(x, up_qdata, up_scale)) > 0.1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3])
def test_concat_linear_matches_float64(device, dtype, rows):
    """x @ [first; second]^T: at one row the matrix-vector kernel reads the second weight's rows
    for outputs 40.. (under the interpreter a 16-row block spans both weights), 3 rows take the
    tensor-core kernel per weight."""
    generator = torch.Generator().manual_seed(rows)
    x, first_qdata, first_scale = nan_padded_inputs(rows, 40, 300, device, dtype, generator)
    _, second_qdata, second_scale = nan_padded_inputs(rows, 30, 300, device, dtype, generator)
    weights = (first_qdata, first_scale, second_qdata, second_scale)
    norm_weight = (torch.rand(300, generator=generator) + 0.5).to(device, dtype)
    for norm in ((), (norm_weight, 1e-5)):
        ours = int8_weight_only_concat_linear(x, *weights, *norm)
        expected = int8_weight_only_concat_linear_reference(x.double(), *weights, *norm)
        assert ours.shape == (rows, 70) and ours.dtype == dtype and not ours.isnan().any()
        assert relative_error(ours[:, :40], expected[:, :40]) < TOLERANCE[dtype]
        assert relative_error(ours[:, 40:], expected[:, 40:]) < TOLERANCE[dtype]
    # The norm's prologue changed the products: not the plain ones scaled.
    assert relative_error(ours, int8_weight_only_concat_linear(x, *weights)) > 0.1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3])
def test_residual_is_added_to_the_product(device, dtype, rows):
    """x @ q^T + residual, or + (update + residual), the sums rounded to x's dtype as the model
    rounds its residual stream: at one row in the matrix-vector kernel's epilogue."""
    generator = torch.Generator().manual_seed(rows + 7)
    x, qdata, scale = nan_padded_inputs(rows, 40, 300, device, dtype, generator)
    residual, update = (torch.randn(rows, 40, generator=generator).to(device, dtype) for _ in "ru")
    plain = int8_weight_only_linear(x, qdata, scale)
    for addends in ((residual,), (residual, update)):
        ours = int8_weight_only_linear(x, qdata, scale, *addends)
        expected = int8_weight_only_linear_reference(
            x.double(), qdata, scale, *(t.double() for t in addends)
        )
        assert ours.dtype == dtype and relative_error(ours, expected) < TOLERANCE[dtype]
        assert relative_error(ours, plain) > 0.1


def test_the_cases_cover_every_path():
    """One row takes the matrix-vector kernel, under the interpreter with 16 rows x 1024 inputs
    per step (40 rows leave 8 masked, 1100 inputs take two steps); with the interpreter's 2
    stand-in SMs, the 64-row case splits its 600 inputs in 2 (the partial sums kernel runs), the
    others do not."""
    [gemv_config] = _int8_gemv_kernel.configs
    assert gemv_config.kwargs == {"BLOCK_N": 16, "BLOCK_K": 1024, "STAGES": 1}
    cpu = torch.device("cpu")
    assert split_count(70, 600, cpu) == (2, 512)
    assert split_count(200, 520, cpu) == (1, 768)
    assert split_count(100, 64, cpu) == (1, 256)


def test_leading_dimensions_and_errors():
    generator = torch.Generator().manual_seed(0)
    x, qdata, scale = nan_padded_inputs(6, 16, 40, "cpu", torch.float32, generator)
    batched = int8_weight_only_linear(x.reshape(2, 3, 40), qdata, scale)
    assert torch.equal(batched.reshape(6, 16), int8_weight_only_linear(x, qdata, scale))

    def error(*args) -> str:
        with pytest.raises(ValueError) as raised:
            int8_weight_only_linear(*args)
        return str(raised.value)

    assert_expected_inline(
        error(torch.zeros(MAX_ROWS + 1, 40), qdata, scale),
        """int8_weight_only_linear takes at most 64 rows, not 65""",
    )
    assert_expected_inline(
        error(x[:, :39], qdata, scale),
        """int8_weight_only_linear: x (..., 39), int8 weight (out, in) = (16, 40) torch.int8 and 16 scales do not fit""",
    )
    with pytest.raises(ValueError) as raised:
        int8_weight_only_swiglu(x, qdata, scale, qdata[:8], scale[:8])
    assert_expected_inline(
        str(raised.value),
        """int8_weight_only_swiglu: gate and up weights of different shapes, (16, 40) and (8, 40)""",
    )
    with pytest.raises(ValueError) as raised:
        int8_weight_only_concat_linear(x, qdata, scale, qdata[:, :8], scale)
    assert_expected_inline(
        str(raised.value),
        """int8_weight_only_concat_linear: x (..., 40), int8 weight (out, in) = (16, 8) torch.int8 and 16 scales do not fit""",
    )
    assert_expected_inline(
        error(x, qdata, scale, torch.zeros(6, 15)),
        """int8_weight_only_linear: residual (6, 15) is not the output's shape (6, 16)""",
    )
    assert_expected_inline(
        error(x, qdata, scale, None, torch.zeros(6, 16)),
        """int8_weight_only_linear: an update needs the residual it adds to""",
    )
    with pytest.raises(ValueError) as raised:
        int8_weight_only_swiglu(x, qdata, scale, qdata, scale, x[:, :39])
    assert_expected_inline(
        str(raised.value),
        """int8_weight_only_swiglu: residual (6, 39) is not x's (6, 40)""",
    )
    with pytest.raises(ValueError) as raised:
        int8_weight_only_concat_linear(x, qdata, scale, qdata, scale, torch.ones(39), 1e-6)
    assert_expected_inline(
        str(raised.value),
        """int8_weight_only_concat_linear: norm weight (39,) for inputs of 40""",
    )


class CountOpCalls(TorchDispatchMode):
    """Counts the calls of one op under it."""

    def __init__(self, op):
        super().__init__()
        self.op, self.count = op, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is self.op
        return func(*args, **(kwargs or {}))


def opcheck_samples(device: str) -> list[tuple]:
    generator = torch.Generator().manual_seed(3)
    return [
        nan_padded_inputs(rows, n_out, 300, device, torch.float32, generator)
        for rows, n_out in ((1, 32), (4, 130))
    ]


def opcheck_all(device: str) -> None:
    for x, qdata, scale in opcheck_samples(device):
        torch.library.opcheck(int8_weight_only_linear, (x, qdata, scale))
        up = (qdata.flip(0), scale.flip(0))
        torch.library.opcheck(int8_weight_only_swiglu, (x, qdata, scale, *up))
        second = (qdata[:7], scale[:7])
        norm = (torch.rand(x.shape[-1], device=device) + 0.5, 1e-6)
        torch.library.opcheck(int8_weight_only_concat_linear, (x, qdata, scale, *second, *norm))
        residual = torch.randn(x.shape[0], qdata.shape[0], device=device)
        torch.library.opcheck(
            int8_weight_only_linear, (x, qdata, scale, residual, residual.flip(0))
        )
        block_input = (torch.randn_like(x), *norm)
        torch.library.opcheck(int8_weight_only_swiglu, (x, qdata, scale, *up, *block_input))


@pytest.mark.usefixtures("cpu_reference_branch")
def test_opcheck_cpu_reference_branch():
    opcheck_all("cpu")


@requires_cuda
def test_opcheck_cuda_triton_branch():
    opcheck_all("cuda")


def test_quantized_linears_take_the_kernel_for_decode_rows_and_torchao_otherwise(monkeypatch):
    # One row: the 24-output linear takes our kernel, the 40-output one torchao's matmul.
    monkeypatch.setattr(schemes, "ONE_ROW_KERNEL_MAX_OUT", 32)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 40), nn.Linear(40, 24, bias=False))
    reference = [nn.Linear(48, 40), nn.Linear(40, 24, bias=False)]
    for ours, theirs in zip(model, reference, strict=True):
        theirs.load_state_dict(ours.state_dict())
    reference = nn.Sequential(*reference)
    assert quantize_model(model, "int8_weight_only", skip=()) == ["0", "1"]
    quantize_model(reference, "int8_weight_only", skip=(), torchao_matmuls_only=True)
    assert all(type(m) is Int8WeightOnlyLinear for m in model)
    assert all(type(m) is nn.Linear for m in reference)
    assert model.state_dict().keys() == reference.state_dict().keys()

    op = torch.ops.titan_mla.int8_weight_only_linear.default
    for rows in (1, 2, MAX_ROWS, MAX_ROWS + 1):
        x = torch.randn(rows, 48)
        with torch.no_grad(), CountOpCalls(op) as calls:
            ours = model(x)
        assert calls.count == {1: 1, MAX_ROWS + 1: 0}.get(rows, 2), rows
        with torch.no_grad():
            assert relative_error(ours, reference(x)) < 1e-5


def test_quantized_swiglu_runs_w1_and_w3_as_one_op_for_decode_rows():
    torch.manual_seed(0)
    ours, theirs = SwiGLU(48, 40), SwiGLU(48, 40)  # w2: 40 -> 48
    theirs.load_state_dict(ours.state_dict())
    model, reference = nn.Sequential(ours), nn.Sequential(theirs)
    quantize_model(model, "int8_weight_only", skip=())
    quantize_model(reference, "int8_weight_only", skip=(), torchao_matmuls_only=True)
    # The same module, its class changed.
    assert model[0] is ours and type(ours) is Int8WeightOnlySwiGLU and type(theirs) is SwiGLU
    assert type(ours.w1) is Int8WeightOnlyLinear
    assert model.state_dict().keys() == reference.state_dict().keys()

    norm = RMSNorm(48, eps=1e-5)
    nn.init.uniform_(norm.weight, 0.5, 1.5)
    swiglu_op = torch.ops.titan_mla.int8_weight_only_swiglu.default
    for rows in (1, MAX_ROWS, MAX_ROWS + 1):
        x, residual = torch.randn(rows, 48), torch.randn(rows, 48)
        # The SwiGLU alone, plus a residual, and the block's second half (add, norm, SwiGLU, add).
        for kwargs in (
            {},
            {"residual": residual},
            {"norm": norm},
            {"residual": residual, "norm": norm},
        ):
            with torch.no_grad(), CountOpCalls(swiglu_op) as calls:
                actual = ours(x, **kwargs)
            assert calls.count == (rows <= MAX_ROWS), (rows, kwargs)
            with torch.no_grad():
                assert relative_error(actual, theirs(x, **kwargs)) < 1e-5, (rows, kwargs)


def test_quantized_attention_runs_wq_and_wkv_a_as_one_op_for_one_row():
    torch.manual_seed(0)
    args = mla_flavors["debugmodel"]
    ours, theirs = MultiHeadLatentAttention(args), MultiHeadLatentAttention(args)
    theirs.load_state_dict(ours.state_dict())
    model, reference = nn.Sequential(ours), nn.Sequential(theirs)
    quantize_model(model, "int8_weight_only")
    quantize_model(reference, "int8_weight_only", torchao_matmuls_only=True)
    assert type(ours) is Int8WeightOnlyMLA and type(theirs) is MultiHeadLatentAttention
    assert model.state_dict().keys() == reference.state_dict().keys()

    norm = RMSNorm(args.dim, eps=1e-5)
    nn.init.uniform_(norm.weight, 0.5, 1.5)
    concat_op = torch.ops.titan_mla.int8_weight_only_concat_linear.default
    for rows, block_norm in ((1, None), (1, norm), (2, norm)):
        x = torch.randn(1, rows, args.dim)
        with torch.no_grad(), CountOpCalls(concat_op) as calls:
            actual = ours.input_projections(x, block_norm)
        assert calls.count == (rows == 1), rows
        with torch.no_grad():
            expected = theirs.input_projections(x, block_norm)
        for a, e in zip(actual, expected, strict=True):
            assert a.shape == e.shape and relative_error(a, e) < 1e-5


@requires_cuda
@pytest.mark.parametrize("rows", [1, 32])
def test_cuda_1b_shapes(rows):
    """The 1B model's decode matmuls (query, latent, output, SwiGLU up and down, head) in bf16."""
    generator = torch.Generator().manual_seed(rows)
    for n_out, n_in in ((3072, 2048), (576, 2048), (2048, 2048), (8192, 2048), (2048, 8192)):
        x, qdata, scale = nan_padded_inputs(rows, n_out, n_in, "cuda", torch.bfloat16, generator)
        ours = int8_weight_only_linear(x, qdata, scale)
        expected = int8_weight_only_linear_reference(x.double(), qdata, scale)
        assert relative_error(ours, expected) < 1e-2, (n_out, n_in)
    _, up_qdata, up_scale = nan_padded_inputs(rows, 8192, 2048, "cuda", torch.bfloat16, generator)
    x, gate_qdata, gate_scale = nan_padded_inputs(
        rows, 8192, 2048, "cuda", torch.bfloat16, generator
    )
    weights = (gate_qdata, gate_scale, up_qdata, up_scale)
    expected = int8_weight_only_swiglu_reference(x.double(), *weights)
    assert relative_error(int8_weight_only_swiglu(x, *weights), expected) < 1e-2
    residual = torch.randn_like(x)
    norm_weight = torch.rand(2048, device="cuda", dtype=torch.bfloat16) + 0.5
    block_input = rms_norm_reference((x + residual).to(x.dtype).double(), norm_weight, 1e-6)
    expected = int8_weight_only_swiglu_reference(block_input, *weights)
    ours = int8_weight_only_swiglu(x, *weights, residual, norm_weight, 1e-6)
    assert relative_error(ours, expected) < 1e-2
    # The attention's query and latent projections as one.
    _, latent_qdata, latent_scale = nan_padded_inputs(
        rows, 576, 2048, "cuda", torch.bfloat16, generator
    )
    x, query_qdata, query_scale = nan_padded_inputs(
        rows, 3072, 2048, "cuda", torch.bfloat16, generator
    )
    weights = (query_qdata, query_scale, latent_qdata, latent_scale)
    expected = int8_weight_only_concat_linear_reference(x.double(), *weights)
    assert relative_error(int8_weight_only_concat_linear(x, *weights), expected) < 1e-2


def test_compiled_int8_linear_has_no_graph_break_and_matches_eager():
    """fullgraph torch.compile through the op (aot_eager: fake-tensor tracing of its body, as
    Inductor sees it) at a batched-decode row count."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(48, 40), nn.SiLU(), nn.Linear(40, 24))
    quantize_model(model, "int8_weight_only", skip=())
    x = torch.randn(2, 3, 48)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
        eager = model(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 16, 17])
def test_int8_dynamic_at_few_rows_equals_torchaos_int8_product(rows):
    """At 16 rows or fewer (which torch._int_mm refuses on CUDA) the activations are quantized
    as torchao does and their int8 values multiplied in our kernel: on CPU, where torchao's path
    works at any size, both give the same numbers; 17 rows take torchao's path."""
    torch.manual_seed(2)
    ours, theirs = nn.Sequential(nn.Linear(300, 40)), nn.Sequential(nn.Linear(300, 40))
    theirs.load_state_dict(ours.state_dict())
    quantize_model(ours, "int8_dynamic", skip=())
    quantize_model(theirs, "int8_dynamic", skip=(), torchao_matmuls_only=True)
    assert type(ours[0]) is Int8DynamicLinear and type(theirs[0]) is nn.Linear
    x = torch.randn(rows, 300)
    op = torch.ops.titan_mla.int8_weight_only_linear.default
    with torch.no_grad(), CountOpCalls(op) as calls:
        actual = ours(x)
    assert calls.count == (1 if rows <= 16 else 0)
    with torch.no_grad():
        assert relative_error(actual, theirs(x)) < 1e-6


SM90_COMPILE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, "tests")
    from sm90 import compile_for_sm90
    from titan_mla.ops import int8_linear as m

    kernel = m._int8_gemv_kernel.fn
    signature = {name: "*bf16" if name.endswith("_ptr") else "i32" for name in kernel.arg_names}
    signature.update(q_ptr="*i8", second_q_ptr="*i8", eps="fp32")
    # The heaviest launch of each kind a decode step makes: the SwiGLU pair with the block's
    # residual and norm in its prologue, and one weight with a norm and both residual adds.
    modes = [dict(GATED=True, INPUT_RESIDUAL=True, NORM=True, OUTPUT_RESIDUAL=0),
             dict(GATED=False, INPUT_RESIDUAL=False, NORM=True, OUTPUT_RESIDUAL=2)]
    failures = []
    for mode in modes:
        for config in m._int8_gemv_kernel.configs:
            constants = dict(K_END=8192, **mode, **config.kwargs)
            build = compile_for_sm90(kernel, signature, constants, config.num_warps)
            print(mode["GATED"], config, build.registers)
            if build.spill_stores:
                failures.append((mode, str(config), build.registers))
    sys.exit(f"register spills: {failures}" if failures else 0)
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA tests compile the real thing")
def test_matrix_vector_configs_compile_for_sm90_without_spills():
    """Every config the autotuner times, for the decode step's heaviest launches, builds for H100
    (sm_90) without register spills. A subprocess: this one has the interpreter."""
    result = run_without_interpreter(SM90_COMPILE_SCRIPT, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("registers") == 32  # both modes' configs compiled
