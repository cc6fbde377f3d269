"""Quantization schemes (torchao configs applied to nn.Linear weights) and the variants built on them."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from titan_mla.models.model import MultiHeadLatentAttention, SwiGLU
from titan_mla.ops import RMSNorm
from titan_mla.ops.int8_linear import (
    MAX_ROWS,
    int8_weight_only_concat_linear,
    int8_weight_only_linear,
    int8_weight_only_swiglu,
)

FP8_CACHE_SUFFIX = "+fp8cache"
DEFAULT_SKIP = ("wkv_b",)
FP8_MIN_CAPABILITY = (8, 9)  # float8 matmuls (torch._scaled_mm): Ada / Hopper and newer
INT_MM_MIN_ROWS = 17  # torch._int_mm (cuBLAS int8 GEMM) needs more than 16 rows
# Int8 weight-only, one row: weights with more outputs go to torchao's matmul (see
# Int8WeightOnlyLinear).
ONE_ROW_KERNEL_MAX_OUT = 4096


def _int8_weight_only() -> Any:
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()  # per output channel


def _int8_dynamic() -> Any:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    return Int8DynamicActivationInt8WeightConfig()  # per-token activations, per-channel weights


def _fp8_dynamic(per_row: bool) -> Callable[[], Any]:
    def config() -> Any:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            PerRow,
            PerTensor,
        )

        return Float8DynamicActivationFloat8WeightConfig(
            granularity=PerRow() if per_row else PerTensor()
        )

    return config


def _fp8_weight_only() -> Any:
    from torchao.quantization import Float8WeightOnlyConfig

    return Float8WeightOnlyConfig()  # per output channel; the matmul runs in the activation dtype


@dataclass(frozen=True)
class Scheme:
    name: str
    description: str
    config: Callable[[], Any] | None  # the torchao config; None: weights stay as they are
    needs_fp8_hardware: bool = False
    # The linear that runs the quantized weights, when ours replaces torchao's matmul for some
    # inputs (decode); None: torchao's tensor subclass does all of it.
    linear_class: type[QuantizedLinear] | None = None
    # Subclasses of model modules that run some of their quantized linears together (one kernel
    # for decode), put in place of their base class where those linears were all quantized.
    fused_classes: tuple[type[FusedQuantizedModule], ...] = ()


class QuantizedLinear(nn.Linear):
    """An nn.Linear that takes over a torchao-quantized linear's weight (the same tensor: state
    dict and weight bytes unchanged) to run some inputs through titan_mla's kernels."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> QuantizedLinear:
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, "meta")
        module.weight, module.bias = linear.weight, linear.bias
        return module


class Int8WeightOnlyLinear(QuantizedLinear):
    """A linear whose weight torchao quantized with ``Int8WeightOnlyConfig``: inputs of 2 to
    MAX_ROWS rows (batched decode steps), and one row (batch-1 decode) into at most
    ONE_ROW_KERNEL_MAX_OUT outputs, take titan_mla's int8 kernels on the same int8 values and
    scales (``titan_mla::int8_weight_only_linear``); wider one-row products (the output head) and
    more than MAX_ROWS rows (prefill) take torchao's matmul. At one row the SwiGLU's w1 and w3,
    and the attention's wq and wkv_a, run as pairs (Int8WeightOnlySwiGLU, Int8WeightOnlyMLA).

    Measured on H100 (benchmarks/NOTES.md): at 32 rows torchao's matmul compiles to ATen's
    fp32-loop ``_weight_int8pack_mm`` (0.03x bf16), our kernel gives 1.03x. At one row Inductor
    turns torchao's matmul into a reduction over the inputs, whose launch configuration
    coordinate-descent tuning picks by timing: it reads the output head at 2.4-2.8 TB/s, as our
    kernel does, but the SwiGLU pair from 1.4 to 2.4 TB/s from one compilation to the next and
    the narrow weights at 0.3-1.1 TB/s. Our kernel for every layer linear: batch-1 decode 1.27x
    bf16 (H100, 9b067c6), against 1.13-1.23x with w1/w3 through torchao; 1.31-1.34x with the
    block's norms and residual adds fused in (three runs since dfbea70)."""

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > MAX_ROWS or (rows == 1 and self.out_features > ONE_ROW_KERNEL_MAX_OUT):
            return super().forward(x)
        out = int8_weight_only_linear(x, self.weight.qdata, self.weight.scale)
        return out if self.bias is None else out + self.bias


class FusedQuantizedModule:
    """A mixin for a subclass of a model module (its other base) that runs its ``fused_linears``,
    once quantized, together for some inputs. quantize_model turns a module of that base class
    into the subclass by changing its class: same submodules, parameter names and weights."""

    fused_linears: tuple[str, ...] = ()


class Int8WeightOnlySwiGLU(FusedQuantizedModule, SwiGLU):
    """A SwiGLU whose w1, w3 and w2 torchao quantized with ``Int8WeightOnlyConfig``: up to
    MAX_ROWS rows (decode) take ``titan_mla::int8_weight_only_swiglu``, at one row a single pass
    over both int8 weights with the block's residual add and FFN norm (when given) folded in and
    silu(w1 x) * (w3 x) as its epilogue, then w2 through ``titan_mla::int8_weight_only_linear``
    with the residual stream added in its epilogue: a block's second half in two launches. More
    rows (prefill) take torchao's matmuls as the plain SwiGLU does."""

    fused_linears = ("w1", "w3", "w2")

    def forward(
        self, x: Tensor, residual: Tensor | None = None, norm: RMSNorm | None = None
    ) -> Tensor:
        if x.numel() // x.shape[-1] > MAX_ROWS:
            return super().forward(x, residual, norm)
        gate, up, down = self.w1.weight, self.w3.weight, self.w2.weight
        norm_args = () if norm is None else (norm.weight, norm.eps)
        # With a norm, the residual is added before it and the sum is the stream the output adds
        # to; without, the residual is only added to the output.
        input_residual = residual if norm is not None else None
        hidden = int8_weight_only_swiglu(
            x, gate.qdata, gate.scale, up.qdata, up.scale, input_residual, *norm_args
        )
        update = x if input_residual is not None else None
        return int8_weight_only_linear(hidden, down.qdata, down.scale, residual, update)


class Int8WeightOnlyMLA(FusedQuantizedModule, MultiHeadLatentAttention):
    """MLA whose wq and wkv_a torchao quantized with ``Int8WeightOnlyConfig``: for one row (batch-1
    decode) both read the same input in one launch, ``titan_mla::int8_weight_only_concat_linear``,
    with the block's attention norm, when given, folded in (two small weights and a norm:
    each alone is mostly launch and ramp-up time); other inputs take each as usual."""

    fused_linears = ("wq", "wkv_a")

    def input_projections(self, x: Tensor, norm: RMSNorm | None = None) -> tuple[Tensor, Tensor]:
        if x.numel() // x.shape[-1] != 1:
            return super().input_projections(x, norm)
        query, latent = self.wq.weight, self.wkv_a.weight
        norm_args = () if norm is None else (norm.weight, norm.eps)
        both = int8_weight_only_concat_linear(
            x, query.qdata, query.scale, latent.qdata, latent.scale, *norm_args
        )
        return both.split([self.wq.out_features, self.wkv_a.out_features], dim=-1)


class Int8DynamicLinear(QuantizedLinear):
    """A linear that torchao quantized with ``Int8DynamicActivationInt8WeightConfig`` (int8
    per-token activations x int8 per-channel weights). ``torch._int_mm``, torchao's int8 GEMM on
    CUDA, refuses 16 rows or fewer (a batch-1 decode step failed to compile), so those inputs are
    quantized exactly as torchao quantizes them and their int8 values multiplied in titan_mla's
    int8 kernels (integer products are exact in their bf16 tensor-core and fp32 products; the sums
    are fp32 rather than int32). More rows, and asymmetric activation schemes, take torchao's
    matmul."""

    def forward(self, x: Tensor) -> Tensor:
        from torchao.quantization import MappingType
        from torchao.quantization.quantize_.common.quantize_tensor_kwargs import (
            _choose_quant_func_and_quantize_tensor,  # torchao's own activation quantization
        )

        weight = self.weight
        act = weight.act_quant_kwargs
        if x.numel() // x.shape[-1] >= INT_MM_MIN_ROWS or act.mapping_type != MappingType.SYMMETRIC:
            return super().forward(x)
        if weight.act_pre_scale is not None:
            x = x * weight.act_pre_scale
        x_q = _choose_quant_func_and_quantize_tensor(
            x, act, scale=weight.act_quant_scale, zero_point=weight.act_quant_zero_point
        )
        product = int8_weight_only_linear(x_q.qdata.to(x.dtype), weight.qdata, weight.scale)
        out = (product * x_q.scale.reshape(*x.shape[:-1], 1)).to(x.dtype)
        return out if self.bias is None else out + self.bias


SCHEMES: dict[str, Scheme] = {
    scheme.name: scheme
    for scheme in (
        Scheme("bf16", "no quantization (the model dtype: bf16 on GPU, fp32 on CPU)", None),
        Scheme(
            "int8_weight_only",
            "int8 per-channel weights, matmul in bf16 (batched decode: titan_mla's int8 kernel)",
            _int8_weight_only,
            linear_class=Int8WeightOnlyLinear,
            fused_classes=(Int8WeightOnlySwiGLU, Int8WeightOnlyMLA),
        ),
        Scheme(
            "int8_dynamic",
            "int8 per-token activations x int8 per-channel weights",
            _int8_dynamic,
            linear_class=Int8DynamicLinear,
        ),
        Scheme(
            "fp8_rowwise",
            "float8 e4m3 per-row activations x per-row weights",
            _fp8_dynamic(True),
            True,
        ),
        Scheme(
            "fp8_tensorwise",
            "float8 e4m3 per-tensor activations x per-tensor weights",
            _fp8_dynamic(False),
            True,
        ),
        Scheme(
            "fp8_weight_only",
            "float8 e4m3 per-channel weights, matmul in bf16",
            _fp8_weight_only,
            True,
        ),
    )
}


def fp8_hardware(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= FP8_MIN_CAPABILITY


def supported_schemes(device: torch.device | str) -> list[str]:
    """The schemes that run on ``device``: FP8 ones only on CUDA GPUs of compute capability 8.9+."""
    device = torch.device(device)
    return [
        name
        for name, scheme in SCHEMES.items()
        if fp8_hardware(device) or not scheme.needs_fp8_hardware
    ]


@dataclass(frozen=True)
class Variant:
    """A weight scheme and the latent cache's storage: one column of the ablation."""

    scheme: Scheme
    fp8_cache: bool = False

    @property
    def name(self) -> str:
        return self.scheme.name + (FP8_CACHE_SUFFIX if self.fp8_cache else "")


def parse_variant(name: str, device: torch.device | str) -> Variant:
    """``<scheme>`` or ``<scheme>+fp8cache``; ValueError naming what ``device`` supports when the
    scheme is unknown or needs hardware this device lacks."""
    device = torch.device(device)
    scheme_name = name.removesuffix(FP8_CACHE_SUFFIX)
    supported = supported_schemes(device)
    listing = (
        f"supported on {_device_name(device)}: {', '.join(supported)} "
        f"(each also as <scheme>{FP8_CACHE_SUFFIX}: FP8 latent cache)"
    )
    if scheme_name not in SCHEMES:
        raise ValueError(f"unknown quantization scheme '{scheme_name}'; {listing}")
    if scheme_name not in supported:
        raise ValueError(
            f"quantization scheme '{scheme_name}' needs a CUDA GPU of compute capability "
            f"{'.'.join(map(str, FP8_MIN_CAPABILITY))}+ (float8 matmuls); {listing}"
        )
    return Variant(SCHEMES[scheme_name], fp8_cache=name.endswith(FP8_CACHE_SUFFIX))


def _device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (SM{major}{minor})"


def quantize_model(
    model: nn.Module,
    scheme: Scheme | str,
    *,
    skip: Sequence[str] = DEFAULT_SKIP,
    torchao_matmuls_only: bool = False,
) -> list[str]:
    """Quantize the nn.Linear weights of ``model`` in place with ``scheme``, except modules whose
    last name is in ``skip``; returns the names of the quantized modules. Quantize after loading
    the weights and before building an MLAEngine (which copies the absorbed wkv_b). Unless
    ``torchao_matmuls_only``, the quantized linears become the scheme's ``linear_class`` and
    modules whose linears it runs together become its ``fused_classes`` (our decode kernels)."""
    scheme = SCHEMES[scheme] if isinstance(scheme, str) else scheme
    if scheme.config is None:
        return []
    from torchao.quantization import quantize_

    chosen = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in skip
    ]
    selected = set(chosen)
    quantize_(model, scheme.config(), filter_fn=lambda module, fqn: fqn in selected)
    if torchao_matmuls_only:
        return chosen
    if scheme.linear_class is not None:
        for name in chosen:
            parent, _, child = name.rpartition(".")
            linear = model.get_submodule(name)
            setattr(model.get_submodule(parent), child, scheme.linear_class.from_linear(linear))
    for name, module in model.named_modules():
        for fused in scheme.fused_classes:
            linears = {f"{name}.{linear}" if name else linear for linear in fused.fused_linears}
            if type(module) in fused.__bases__ and linears <= selected:
                module.__class__ = fused
    return chosen


def is_quantized(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is one of torchao's quantized tensor subclasses."""
    from torchao.utils import TorchAOBaseTensor

    return isinstance(weight, TorchAOBaseTensor)


def _tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds; for a tensor subclass, the sum over its inner tensors (int8/fp8 data
    and scales)."""
    if type(tensor) not in (torch.Tensor, nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def weight_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of ``tensors`` (e.g. ``model.parameters()``), each shared tensor counted once."""
    unique = {id(tensor): tensor for tensor in tensors}
    return sum(_tensor_bytes(tensor) for tensor in unique.values())
