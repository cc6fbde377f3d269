"""MLA inference: a paged latent KV cache, chunked prefill, weight-absorbed decode over the
``titan_mla.ops.mla_decode`` kernel, CUDA graphs, and text generation from torchtitan checkpoints."""

from .cache import CacheFullError, PagedLatentCache
from .engine import MLAEngine
from .generator import Completion, Generator

__all__ = ["CacheFullError", "Completion", "Generator", "MLAEngine", "PagedLatentCache"]
