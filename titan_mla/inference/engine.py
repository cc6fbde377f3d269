"""MLA inference over the paged latent cache: chunked prefill, weight-absorbed decode, CUDA graphs.

Prefill runs the training model's own (non-absorbed) attention: each chunk of prompt tokens writes
its latents to the cache, then attends to every earlier token of its sequence by up-projecting
their cached latents with wkv_b into per-head keys and values. Compute-bound, so the expansion is
cheap, and the cost per chunk grows with the prompt only through those cached latents.

Decode is memory-bound: it reads the whole cache once per step, so it must read the latents as they
are. With wkv_b = [W_UK; W_UV] per head, q_nope . (W_UK c) = (W_UK^T q_nope) . c: the query is
folded into the latent space (``q_latent``), attention runs over the cached latents directly
(``mla_decode``), and W_UV maps the attended latent back to the head's value space before wo.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

from titan_mla.models import MLATransformer
from titan_mla.models.model import MultiHeadLatentAttention, TransformerBlock
from titan_mla.models.rope import rope_cos_sin
from titan_mla.ops import RMSNorm
from titan_mla.ops.mla_decode import mla_decode

from .cache import NULL_PAGE, CacheFullError, PagedLatentCache, host_to_device

MAX_DECODE_TOKENS = 4  # new tokens per sequence per decode step (speculative decoding)


def absorb_wkv_b(attention: MultiHeadLatentAttention) -> tuple[Tensor, Tensor]:
    """W_UK^T (heads, kv_lora_rank, qk_nope_head_dim) and W_UV (heads, v_head_dim, kv_lora_rank):
    the per-head key and value rows of wkv_b, which decode applies on the query and output sides.
    Both are stored with the dimension their product sums over last (contiguous): summed across
    strided rows instead, Inductor's one-row kernel for the query side took 3 to 11 us on H100
    from one compilation to the next (its launch configuration is picked by timing)."""
    per_head = attention.wkv_b.weight.unflatten(
        0, (-1, attention.qk_nope_head_dim + attention.v_head_dim)
    )
    w_uk, w_uv = per_head.split([attention.qk_nope_head_dim, attention.v_head_dim], dim=1)
    return w_uk.transpose(1, 2).contiguous(), w_uv.contiguous()


class MLAEngine:
    """Runs an MLATransformer over a PagedLatentCache.

    Sequences are the cache's block-table rows. ``prefill`` starts sequences from their prompts,
    ``decode`` appends 1 to MAX_DECODE_TOKENS tokens to each sequence of a batch; both return
    logits. The absorbed weights are taken from the model when the engine is built: build it after
    loading the weights.
    """

    def __init__(self, model: MLATransformer, cache: PagedLatentCache, *, chunk_size: int = 2048):
        self.model, self.cache, self.chunk_size = model, cache, chunk_size
        args = model.model_args
        args.require_mla("MLAEngine (the latent-cache inference engine)")
        self.softmax_scale = args.softmax_scale  # YaRN's mscale correction included
        self.device = model.output.weight.device
        # Our own float32 table, as long as the longest sequence the cache can hold (the model's
        # buffer covers only the training length, in whatever dtype the model was cast to).
        max_positions = cache.max_pages_per_seq * cache.page_size
        self.rope_cache = rope_cos_sin(
            dataclasses.replace(args, max_seq_len=max_positions), self.device
        )
        self.absorbed = [absorb_wkv_b(layer.attention) for layer in model.layers.values()]
        self.graphs: dict[tuple[int, int], DecodeGraph] = {}

    @torch.inference_mode()
    def prefill(
        self, prompts: list[list[int]], seqs: list[int], *, all_logits: bool = False
    ) -> Tensor:
        """Start the empty sequences ``seqs`` with the token ids of ``prompts`` (any lengths);
        returns the logits of each prompt's last token (batch, vocab), or with ``all_logits`` of
        every position (batch, longest prompt, vocab; padding positions hold garbage)."""
        lengths = [len(prompt) for prompt in prompts]
        for seq in seqs:
            if self.cache.lengths[seq]:
                raise ValueError(f"sequence {seq} already holds {self.cache.lengths[seq]} tokens")
        self._extend(seqs, lengths)

        # Right padding: a prompt's tokens never attend to the padding after them, and padding
        # positions beyond a prompt's pages write to the null page.
        tokens = torch.zeros(len(prompts), max(lengths), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens[row, : len(prompt)] = torch.as_tensor(prompt)
        tokens = tokens.to(self.device)
        block_table = self._block_table_rows(seqs)
        last = torch.tensor(lengths, device=self.device) - 1
        rows = torch.arange(len(prompts), device=self.device)

        dim, dtype = self.model.model_args.dim, self.model.output.weight.dtype
        last_hidden = torch.empty(len(prompts), dim, dtype=dtype, device=self.device)
        chunk_logits = []
        for start in range(0, tokens.shape[1], self.chunk_size):
            h = self._prefill_chunk(tokens[:, start : start + self.chunk_size], block_table, start)
            ends_here = (last >= start) & (last < start + h.shape[1])
            last_hidden[ends_here] = h[rows[ends_here], last[ends_here] - start]
            if all_logits:
                chunk_logits.append(self.model.output(self.model.norm(h)))
        if all_logits:
            return torch.cat(chunk_logits, dim=1)
        return self.model.output(self.model.norm(last_hidden))

    def _prefill_chunk(self, tokens: Tensor, block_table: Tensor, start: int) -> Tensor:
        """Hidden states (batch, chunk, dim) of tokens at positions start .. start + chunk - 1."""
        chunk = tokens.shape[1]
        end = start + chunk
        positions = torch.arange(start, end, device=self.device)
        slots = self.cache.slots(block_table, positions.expand(tokens.shape[0], -1))
        # Causal aligned to the last key: query start + i sees keys 0 .. start + i. Not
        # materialized, so a chunk late in a long prompt costs no (chunk x prompt) mask.
        mask = causal_lower_right(chunk, end)

        h = self.model.tok_embeddings(tokens)
        for i, layer in enumerate(self.model.layers.values()):
            attention = layer.attention
            q_nope, q_pe, latent, k_pe = self._project(
                attention, layer.attention_norm, h, positions
            )
            self.cache.write(i, slots, latent, k_pe)

            # The whole sequence so far (earlier chunks and this one, as cached), expanded to
            # per-head keys and values exactly as the training model does.
            latent, k_pe = self.cache.read(i, block_table, end)
            kv = attention.wkv_b(latent.to(h.dtype)).unflatten(-1, (attention.n_heads, -1))
            k_nope, v = kv.split([attention.qk_nope_head_dim, attention.v_head_dim], dim=-1)
            k_pe = k_pe.to(h.dtype).unsqueeze(2).expand(-1, -1, attention.n_heads, -1)
            q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)
            k = torch.cat([k_nope, k_pe], dim=-1).transpose(1, 2)
            out = F.scaled_dot_product_attention(
                q, k, v.transpose(1, 2), attn_mask=mask, scale=self.softmax_scale
            )
            h = self._feed_forward(layer, attention.wo(out.transpose(1, 2).flatten(2)), h)
        return h

    def decode(self, tokens: Tensor, seqs: list[int]) -> Tensor:
        """Append tokens (batch, q_len) to the sequences ``seqs``; returns their logits
        (batch, q_len, vocab). q_len > 1 scores speculative candidates: each attends to the
        sequence and the candidates before it. Replays a CUDA graph when one was captured for
        (batch, q_len)."""
        batch, q_len = tokens.shape
        if not 1 <= q_len <= MAX_DECODE_TOKENS:
            raise ValueError(
                f"decode takes 1 to {MAX_DECODE_TOKENS} tokens per sequence, not {q_len}"
            )
        self._extend(seqs, [q_len] * batch)
        lengths = [self.cache.lengths[seq] for seq in seqs]
        # Nothing here waits for the device: the host prepares step n + 1 while step n runs.
        seq_lens = host_to_device(lengths, self.device)
        block_table = self._block_table_rows(seqs)
        graph = self.graphs.get((batch, q_len))
        if graph is not None:
            return graph.replay(tokens, block_table, seq_lens)
        # Eager: a block table only as wide as the longest sequence needs.
        pages = math.ceil(max(lengths) / self.cache.page_size)
        return self.decode_step(tokens, block_table[:, :pages], seq_lens)

    def _block_table_rows(self, seqs: list[int]) -> Tensor:
        """The block-table rows of ``seqs``: a view when they are consecutive (the usual batch),
        else gathered with an index sent asynchronously."""
        first = seqs[0]
        if list(seqs) == list(range(first, first + len(seqs))):
            return self.cache.block_table[first : first + len(seqs)]
        return self.cache.block_table[host_to_device(seqs, self.device, torch.long)]

    @torch.inference_mode()
    def decode_step(self, tokens: Tensor, block_table: Tensor, seq_lens: Tensor) -> Tensor:
        """One decode step on device tensors only (no host sync), so a CUDA graph can capture it.
        ``seq_lens`` counts the new tokens, whose room the cache has already reserved."""
        q_len = tokens.shape[1]
        positions = seq_lens[:, None] - q_len + torch.arange(q_len, device=tokens.device)
        slots = self.cache.slots(block_table, positions)

        h = self.model.tok_embeddings(tokens)
        for i, layer in enumerate(self.model.layers.values()):
            pools = self.cache.layer_pools(i)
            h = self.decode_layer(
                layer, h, positions, slots, block_table, seq_lens, pools, self.absorbed[i]
            )
        return self.decode_head(h)

    def decode_layer(
        self,
        layer: TransformerBlock,
        h: Tensor,
        positions: Tensor,
        slots: Tensor,
        block_table: Tensor,
        seq_lens: Tensor,
        pools: tuple[Tensor, Tensor, Tensor],
        absorbed: tuple[Tensor, Tensor],
    ) -> Tensor:
        """One block of the decode step: everything that differs between layers comes in as
        arguments, so torch.compile of this method builds one graph for all of them."""
        attention = layer.attention
        q_nope, q_pe, latent, k_pe = self._project(attention, layer.attention_norm, h, positions)
        self.cache.write_pools(pools, slots, latent, k_pe)

        w_uk_t, w_uv = absorbed
        latent_pool, k_pe_pool, scale_pool = pools
        q_latent = torch.einsum("bqhn,hrn->bqhr", q_nope, w_uk_t)
        out_latent = mla_decode(
            q_latent,
            q_pe,
            latent_pool,
            k_pe_pool,
            block_table,
            seq_lens,
            self.softmax_scale,
            latent_scale=scale_pool if self.cache.fp8 else None,
        )
        out = torch.einsum("bqhr,hvr->bqhv", out_latent, w_uv)
        return self._feed_forward(layer, attention.wo(out.flatten(2)), h)

    def decode_head(self, h: Tensor) -> Tensor:
        """Final norm and output projection of the decode step (compiled on its own)."""
        return self.model.output(self.model.norm(h))

    def capture_cuda_graph(self, batch: int, q_len: int = 1) -> None:
        """Capture the decode step of ``batch`` sequences x ``q_len`` tokens; later ``decode`` calls
        of that shape replay it."""
        self.graphs[(batch, q_len)] = DecodeGraph(self, batch, q_len)

    def _project(
        self, attention: MultiHeadLatentAttention, norm: RMSNorm, h: Tensor, positions: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """q_nope and rotated q_pe (batch, seq, heads, dim), the normalized latent and rotated k_pe
        (batch, seq, dim) of norm(h), computed as the training model does (its rotation op
        included); the norm goes to the attention, whose input projections may fuse it."""
        q, latent, k_pe = attention.project(h, self.rope_cache, positions, norm=norm)
        q_nope, q_pe = q.split([attention.qk_nope_head_dim, attention.qk_rope_head_dim], dim=-1)
        return q_nope, q_pe, latent, k_pe

    @staticmethod
    def _feed_forward(layer: TransformerBlock, attention_out: Tensor, h: Tensor) -> Tensor:
        """The rest of the block after attention, h + attention_out + SwiGLU(ffn_norm(...)) as in
        training, handed to the SwiGLU whole (a quantized one fuses the adds and the norm)."""
        return layer.feed_forward(attention_out, residual=h, norm=layer.ffn_norm)

    def _extend(self, seqs: list[int], num_tokens: list[int]) -> None:
        """Reserve room in every sequence or, when one does not fit, in none."""
        done: list[tuple[int, int]] = []
        try:
            for seq, count in zip(seqs, num_tokens, strict=True):
                done.append((seq, self.cache.extend(seq, count)))
        except CacheFullError:
            for seq, start in done:
                self.cache.truncate(seq, start)
            raise


class DecodeGraph:
    """``MLAEngine.decode_step`` for a fixed (batch, q_len) captured in a CUDA graph.

    Replay copies the inputs into static buffers. The block table is the cache's full width, so one
    graph serves every sequence length; the kernel stops at each sequence's length.
    """

    def __init__(self, engine: MLAEngine, batch: int, q_len: int):
        device = engine.device
        self.tokens = torch.zeros(batch, q_len, dtype=torch.long, device=device)
        # Warm-up runs really write latents: at positions 0 .. q_len - 1 of the null page.
        self.block_table = torch.full(
            (batch, engine.cache.max_pages_per_seq), NULL_PAGE, dtype=torch.int32, device=device
        )
        self.seq_lens = torch.full((batch,), q_len, dtype=torch.int32, device=device)
        inputs = (self.tokens, self.block_table, self.seq_lens)

        # Warm up on a side stream (Triton compiles, the allocator settles), then capture.
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                engine.decode_step(*inputs)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = engine.decode_step(*inputs)

    def replay(self, tokens: Tensor, block_table: Tensor, seq_lens: Tensor) -> Tensor:
        self.tokens.copy_(tokens)
        self.block_table.copy_(block_table)
        self.seq_lens.copy_(seq_lens)
        self.graph.replay()
        return self.logits.clone()  # the next replay overwrites the static output
