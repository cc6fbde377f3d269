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
    """
    options = {"dynamic": False, **compile_kwargs}
    engine.decode_layer = torch.compile(engine.decode_layer, **options)
    engine.decode_head = torch.compile(engine.decode_head, **options)
