"""torch.compile of the inference engine's decode step, quantized or not."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from titan_mla.inference import MLAEngine


def compile_decode_step(engine: MLAEngine, **compile_kwargs: Any) -> None:
    """Replace ``engine.decode_step`` by a compiled one (``compile_kwargs`` go to torch.compile,
    default ``dynamic=False``); eager decode and CUDA-graph capture then run the compiled step.

    Static shapes matter for quantized weights: with torchao's recommended Inductor settings
    (coordinate descent tuning, set by quantize_), a batch-1 matmul becomes a matrix-vector
    reduction that reads the int8/fp8 weight and dequantizes it in registers, instead of
    materializing a bf16 copy of the weight first. The inference-mode context is entered outside
    the compiled region: Dynamo cannot trace the decorator's entry with tensors made outside it.
    """
    compiled = torch.compile(
        MLAEngine.decode_step.__wrapped__, **{"dynamic": False, **compile_kwargs}
    )

    def decode_step(tokens: Tensor, block_table: Tensor, seq_lens: Tensor) -> Tensor:
        with torch.inference_mode():
            return compiled(engine, tokens, block_table, seq_lens)

    engine.decode_step = decode_step
