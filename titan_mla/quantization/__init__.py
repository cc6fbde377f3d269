"""Deployment quantization of a trained MLATransformer with torchao, and the FP8 latent cache.

A *variant* of the ablation is a weight scheme, optionally followed by ``+fp8cache`` (the latent KV
cache in float8 e4m3, see titan_mla.inference.cache): ``int8_weight_only``, ``bf16+fp8cache``, ...

What is quantized: every ``nn.Linear`` of the model (attention projections, SwiGLU, output head)
except the ones named in ``skip`` (default ``wkv_b``: the inference engine absorbs the key/value
up-projection into the decode query and output, reading its weight as a plain tensor; it is 3% of
the block weights). The token embedding is an ``nn.Embedding``, left as it is: a lookup reads one
row per token, so quantizing it saves memory but no bandwidth.
"""

from .compile import compile_decode_step
from .schemes import (
    DEFAULT_SKIP,
    FP8_CACHE_SUFFIX,
    SCHEMES,
    Scheme,
    Variant,
    is_quantized,
    parse_variant,
    quantize_model,
    supported_schemes,
    weight_bytes,
)

__all__ = [
    "DEFAULT_SKIP",
    "FP8_CACHE_SUFFIX",
    "SCHEMES",
    "Scheme",
    "Variant",
    "compile_decode_step",
    "is_quantized",
    "parse_variant",
    "quantize_model",
    "supported_schemes",
    "weight_bytes",
]
