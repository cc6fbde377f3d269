"""torch.compile of the inference engine's decode step, quantized or not."""

from __future__ import annotations

from typing import Any

import torch

from titan_mla.inference import MLAEngine


def compile_decode_step(engine: MLAEngine, **compile_kwargs: Any) -> None:
    """Compile the decode step by regions (``compile_kwargs`` go to torch.compile, default
    ``dynamic=False``): ``engine.decode_layer``, one graph that every layer reuses (its weights,
    cache pools and absorbed matrices are inputs), and ``engine.decode_head``. Eager decode and
    CUDA-graph capture then run the compiled regions.

    By layer rather than the whole step: Inductor compiles and tunes one block's kernels instead of
    sixteen copies of them, minutes less per (scheme, batch) for the 1B model. Static shapes
    matter for quantized weights: with torchao's recommended Inductor settings (coordinate descent
    tuning, set by quantize_), a batch-1 matmul becomes a matrix-vector reduction that reads the
    int8/fp8 weight and dequantizes it in registers, instead of materializing a bf16 copy first.

    On CUDA this turns ``torch.backends.mkldnn`` off for the process (see below): call it before
    anything else in the process is compiled.
    """
    if engine.device.type == "cuda":
        # Inductor registers its weight-only int8 lowering (x @ int8 weight * scales ->
        # aten._weight_int8pack_mm) with its CPU (mkldnn) passes, but matches GPU graphs too, where
        # ATen's kernel is a plain fp32 loop: 0.8 ms for a 32 x 2048 x 8192 matmul, 80 ms per 1B
        # decode step at batch 32 (int8 weight-only decode at 0.03x bf16, H100). Without the CPU
        # passes the matmul stays a dequantize + GEMM (or a fused Triton template). The
        # registration happens once, at the process's first compilation.
        torch.backends.mkldnn.enabled = False
    options = {"dynamic": False, **compile_kwargs}
    engine.decode_layer = torch.compile(engine.decode_layer, **options)
    engine.decode_head = torch.compile(engine.decode_head, **options)
