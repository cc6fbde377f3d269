"""The MLA transformer: a dense decoder with DeepSeek-V3 Multi-Head Latent Attention.

``MLAModelArgs.attention`` = "mha" / "gqa" builds the same decoder with plain grouped-query attention
instead, the baselines the latent ablation (titan_mla.ablate_latent) compares MLA against.

The model knows nothing of parallelism; titan_mla.parallelisms applies TP, CP, activation
checkpointing, compile and FSDP from outside, torchtitan style.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torchtitan.models.utils import trunc_normal_
from torchtitan.protocols.train_spec import ModelProtocol

from ..ops import RMSNorm, mla_rope, mla_rope_reference
from .args import MLAModelArgs
from .rope import apply_rope, rope_cos_sin

# cuDNN takes MLA's unequal qk (192) / v (128) head dims on Hopper; FLASH refuses them and EFFICIENT
# is ~9x slower but correct. MATH is left out on GPU so that a slow path is an error, never silent.
_GPU_SDPA_BACKENDS = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
]
_CPU_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


class CausalSDPA(nn.Module):
    """Causal scaled-dot-product attention as a module, q, k, v first, so that context parallel
    (torchtitan's apply_cp_to_attention_module) can wrap it."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float
    ) -> torch.Tensor:
        backends = _CPU_SDPA_BACKENDS if q.device.type == "cpu" else _GPU_SDPA_BACKENDS
        # Fewer key/value heads than query heads (GQA): each serves n_heads // n_kv_heads queries.
        enable_gqa = k.shape[1] != q.shape[1]
        with sdpa_kernel(backends, set_priority=True):
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa
            )


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, args: MLAModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.q_lora_rank = args.q_lora_rank
        self.kv_lora_rank = args.kv_lora_rank
        self.qk_nope_head_dim = args.qk_nope_head_dim
        self.qk_rope_head_dim = args.qk_rope_head_dim
        self.qk_head_dim = args.qk_head_dim
        self.v_head_dim = args.v_head_dim
        self.softmax_scale = args.softmax_scale

        if self.q_lora_rank == 0:
            self.wq = nn.Linear(args.dim, self.n_heads * self.qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(args.dim, self.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(self.q_lora_rank, args.norm_eps, args.kernels)
            self.wq_b = nn.Linear(self.q_lora_rank, self.n_heads * self.qk_head_dim, bias=False)
        # Down-projection to the cached latent c_kv and the shared rotary key k_pe.
        self.wkv_a = nn.Linear(args.dim, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(self.kv_lora_rank, args.norm_eps, args.kernels)
        # Up-projection of the latent to per-head no-rope keys (W_UK) and values (W_UV).
        self.wkv_b = nn.Linear(
            self.kv_lora_rank, self.n_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False
        )
        self.wo = nn.Linear(self.n_heads * self.v_head_dim, args.dim, bias=False)
        self.sdpa = CausalSDPA()
        # One fused rotation of every query head's rope slice and of the shared k_pe.
        self.rotate = mla_rope if args.kernels == "triton" else mla_rope_reference

    def project(
        self,
        x: torch.Tensor,
        rope_cache: torch.Tensor,
        positions: torch.Tensor | None = None,
        norm: RMSNorm | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries (batch, seq, heads, qk_head_dim), and what an inference cache holds per
        token: the normalized latent c_kv (batch, seq, kv_lora_rank) and the rotated shared key
        k_pe (batch, seq, qk_rope_head_dim). ``norm``: the block's attention norm, applied to x
        first (the inference engine passes it; see input_projections)."""
        q, kv = self.input_projections(x, norm)
        if self.q_lora_rank > 0:
            q = self.wq_b(self.q_norm(q))
        # -1 heads: tensor parallel may have sharded the heads.
        q = q.unflatten(-1, (-1, self.qk_head_dim))
        latent, k_pe = kv.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        q, k_pe = self.rotate(q, k_pe, rope_cache, positions)
        return q, self.kv_norm(latent), k_pe

    def input_projections(
        self, x: torch.Tensor, norm: RMSNorm | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two linears of the block's (``norm``-alized) input: the query's (wq, or wq_a with a
        query LoRA) and wkv_a. One method, so that a quantized model can run the three as one
        kernel (titan_mla.quantization)."""
        x = x if norm is None else norm(x)
        return (self.wq if self.q_lora_rank == 0 else self.wq_a)(x), self.wkv_a(x)

    def forward(
        self, x: torch.Tensor, rope_cache: torch.Tensor, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        q, latent, k_pe = self.project(x, rope_cache, positions)
        kv = self.wkv_b(latent).unflatten(-1, (-1, self.qk_nope_head_dim + self.v_head_dim))
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, k_nope.shape[2], -1)], dim=-1)

        out = self.sdpa(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=self.softmax_scale
        )
        return self.wo(out.transpose(1, 2).flatten(2))

    def init_weights(self, out_std: float) -> None:
        in_projections = [self.wkv_a, self.wkv_b]
        in_projections += [self.wq] if self.q_lora_rank == 0 else [self.wq_a, self.wq_b]
        for linear in in_projections:
            trunc_normal_(linear.weight, mean=0.0, std=0.02)
        trunc_normal_(self.wo.weight, mean=0.0, std=out_std)
        self.kv_norm.reset_parameters()
        if self.q_lora_rank > 0:
            self.q_norm.reset_parameters()


class GroupedQueryAttention(nn.Module):
    """Plain attention with n_kv_heads key/value heads shared by groups of the n_heads query heads
    (MHA: n_kv_heads = n_heads), rotary embedding over the whole head. Its cache holds k and v of
    every head: 2 x n_kv_heads x head_dim values per token and layer."""

    def __init__(self, args: MLAModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.softmax_scale = args.softmax_scale
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)
        self.sdpa = CausalSDPA()

    def project(
        self, x: torch.Tensor, rope_cache: torch.Tensor, positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries (batch, seq, n_heads, head_dim), and what a KV cache holds per token:
        rotated keys and values (batch, seq, n_kv_heads, head_dim)."""
        q = self.wq(x).unflatten(-1, (-1, self.head_dim))
        k = self.wk(x).unflatten(-1, (-1, self.head_dim))
        v = self.wv(x).unflatten(-1, (-1, self.head_dim))
        return apply_rope(q, rope_cache, positions), apply_rope(k, rope_cache, positions), v

    def forward(
        self, x: torch.Tensor, rope_cache: torch.Tensor, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in self.project(x, rope_cache, positions))
        out = self.sdpa(q, k, v, scale=self.softmax_scale)
        return self.wo(out.transpose(1, 2).flatten(2))

    def init_weights(self, out_std: float) -> None:
        for linear in (self.wq, self.wk, self.wv):
            trunc_normal_(linear.weight, mean=0.0, std=0.02)
        trunc_normal_(self.wo.weight, mean=0.0, std=out_std)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None = None,
        norm: RMSNorm | None = None,
    ) -> torch.Tensor:
        """The SwiGLU of x; with ``residual``, plus the residual; with ``norm`` too, the second
        half of a block: h = x + residual, h + SwiGLU(norm(h)). The inference engine passes the
        block's residual and FFN norm, which a quantized SwiGLU fuses into its kernels."""
        if norm is not None and residual is not None:
            x, residual = norm(x, residual=residual)
        elif norm is not None:
            x = norm(x)
        out = self.w2(F.silu(self.w1(x)) * self.w3(x))
        return out if residual is None else residual + out

    def init_weights(self, out_std: float) -> None:
        trunc_normal_(self.w1.weight, mean=0.0, std=0.02)
        for linear in (self.w2, self.w3):
            trunc_normal_(linear.weight, mean=0.0, std=out_std)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: MLAModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps, args.kernels)
        self.attention = (
            MultiHeadLatentAttention(args)
            if args.attention == "mla"
            else GroupedQueryAttention(args)
        )
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, args.kernels)
        self.feed_forward = SwiGLU(args.dim, args.ffn_hidden_dim)
        # Depth-scaled init of the residual-branch outputs, as torchtitan's models do.
        self.out_init_std = 0.02 / (2 * (layer_id + 1)) ** 0.5

    def forward(
        self, x: torch.Tensor, rope_cache: torch.Tensor, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        attention_out = self.attention(self.attention_norm(x), rope_cache, positions)
        # Fused: h = x + attention_out and its norm, in one pass over h.
        ffn_in, h = self.ffn_norm(attention_out, residual=x)
        return h + self.feed_forward(ffn_in)

    def init_weights(self) -> None:
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attention.init_weights(self.out_init_std)
        self.feed_forward.init_weights(self.out_init_std)


class MLATransformer(ModelProtocol):
    def __init__(self, args: MLAModelArgs):
        super().__init__(args)
        self.model_args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.register_buffer("rope_cache", rope_cos_sin(args), persistent=False)
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(i, args) for i in range(args.n_layers)}
        )
        self.norm = RMSNorm(args.dim, args.norm_eps, args.kernels)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        buffer_device = buffer_device or self.rope_cache.device
        self.rope_cache = rope_cos_sin(self.model_args, buffer_device)
        for layer in self.layers.values():
            layer.init_weights()
        self.norm.reset_parameters()
        if self.model_args.tie_embeddings:
            nn.init.normal_(self.tok_embeddings.weight, std=self.model_args.dim**-0.5)
        else:
            nn.init.normal_(self.tok_embeddings.weight)
            std = self.model_args.dim**-0.5
            trunc_normal_(self.output.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (batch, seq, vocab) for tokens (batch, seq); positions (seq,) or (batch, seq)
        default to 0..seq-1 (packed sequences, context parallel and decode pass their own)."""
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h, self.rope_cache, positions)
        return self.output(self.norm(h))
