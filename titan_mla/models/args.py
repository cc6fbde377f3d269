"""Model arguments of the MLA transformer and the FLOP count used for MFU."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn
from torchtitan.config import JobConfig
from torchtitan.protocols.model import BaseModelArgs

ATTENTION_KINDS = ("mla", "mha", "gqa")


@dataclass
class MLAModelArgs(BaseModelArgs):
    """A dense decoder with DeepSeek-V3 Multi-Head Latent Attention.

    Attention per head uses a query/key of ``qk_nope_head_dim + qk_rope_head_dim`` values and a
    value of ``v_head_dim``. Keys and values come from one ``kv_lora_rank`` latent per token (plus a
    ``qk_rope_head_dim`` rotary key shared by all heads): that is all an inference cache must hold.

    ``attention = "mha"`` or ``"gqa"`` swaps MLA for plain attention of the same width, the baselines
    of the latent ablation: ``n_heads`` query heads and ``n_kv_heads`` key/value heads (all of them
    for MHA) of ``head_dim`` values, rotary embedding over the whole head. The MLA fields are then
    unused.
    """

    dim: int = 2048
    n_layers: int = 16
    n_heads: int = 16
    vocab_size: int = 32768
    ffn_hidden_dim: int = 8192
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    # "triton": RMSNorm and RoPE through titan_mla's custom ops; "torch": plain PyTorch ops.
    kernels: str = "triton"

    # Multi-Head Latent Attention. q_lora_rank == 0 means one full-rank query projection.
    q_lora_rank: int = 0
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128

    # "mla", or a plain-attention baseline: "mha", "gqa" (0 below = dim // n_heads and n_heads).
    attention: str = "mla"
    n_kv_heads: int = 0
    head_dim: int = 0

    # Rotary embedding with YaRN. YaRN is on whenever rope_factor > 1, whatever the training length:
    # a model extended to rope_factor * original_seq_len positions keeps the same frequencies when it
    # is trained or evaluated on shorter sequences.
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    rope_factor: float = 1.0
    original_seq_len: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(
                f"unknown attention '{self.attention}'; supported: {', '.join(ATTENTION_KINDS)}"
            )
        self.head_dim = self.head_dim or self.dim // self.n_heads
        if self.attention == "mha" and self.n_kv_heads not in (0, self.n_heads):
            raise ValueError(
                f"attention 'mha' has n_kv_heads = n_heads = {self.n_heads}, not {self.n_kv_heads}; "
                "use attention 'gqa' for fewer key/value heads"
            )
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}")

    def require_mla(self, feature: str) -> None:
        """Raise ValueError when ``feature`` (which needs the latent KV) meets a baseline model."""
        if self.attention != "mla":
            raise ValueError(
                f"{feature} supports only attention 'mla' models, not '{self.attention}'"
            )

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def attention_dims(self) -> tuple[int, int]:
        """Per-head (query/key, value) widths of the attention this model uses."""
        if self.attention == "mla":
            return self.qk_head_dim, self.v_head_dim
        return self.head_dim, self.head_dim

    @property
    def rope_head_dim(self) -> int:
        """The rotated width of a head: MLA's decoupled rope slice, or a baseline's whole head."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    @property
    def yarn_enabled(self) -> bool:
        return self.rope_factor > 1.0

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times YaRN's attention-temperature correction mscale^2 when YaRN is on."""
        scale = self.attention_dims[0] ** -0.5
        if self.yarn_enabled:
            mscale = 0.1 * self.mscale * math.log(self.rope_factor) + 1.0
            scale *= mscale * mscale
        return scale

    def update_from_config(self, job_config: JobConfig, **kwargs) -> None:
        seq_len = job_config.training.seq_len
        max_positions = int(self.original_seq_len * max(self.rope_factor, 1.0))
        if seq_len > max_positions:
            raise ValueError(
                f"training.seq_len={seq_len} exceeds the {max_positions} positions this flavor's "
                f"rotary embedding covers (original_seq_len={self.original_seq_len} x "
                f"rope_factor={self.rope_factor}); pick a flavor with YaRN (e.g. '1B_long')"
            )
        self.max_seq_len = seq_len
        # job_config has model.kernels when titan_mla.config is its custom_config_module.
        self.kernels = getattr(job_config.model, "kernels", self.kernels)
        if self.kernels not in ("triton", "torch"):
            raise ValueError(f"model.kernels must be 'triton' or 'torch', not '{self.kernels}'")

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
        """torchtitan's dense formula: 6 FLOPs per matmul weight per token, plus the attention matmuls
        (QK^T with the qk head width, PV with the v head width; causal sparsity not discounted)."""
        nparams = sum(p.numel() for p in model.parameters())
        # The embedding lookup does no matmul; with tied embeddings the same weight is the output
        # projection, which does.
        matmul_params = nparams - (0 if self.tie_embeddings else self.vocab_size * self.dim)
        attention_flops = 6 * self.n_layers * self.n_heads * sum(self.attention_dims) * seq_len
        return nparams, 6 * matmul_params + attention_flops
