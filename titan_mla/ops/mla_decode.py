"""Flash-decoding for Multi-Head Latent Attention (DeepSeek-V3, absorbed form) over a paged cache,
as the Triton custom op ``torch.ops.titan_mla.mla_decode``.

Absorbed decode never expands the cache to per-head keys and values. Per head h, the caller folds
W_UK_h into the query (``q_latent_h = W_UK_h^T q_nope_h``) and applies W_UV_h to the result:

    score_h(t) = (q_latent_h . latent(t) + q_pe_h . k_pe(t)) * softmax_scale
    out_h      = sum_t softmax_t(score_h)(t) * latent(t)          (kv_lora_rank values per head)

Signature (``mla_decode`` is the typed Python entry point)::

    mla_decode(q_latent, q_pe, latent_cache, k_pe_cache, block_table, seq_lens, softmax_scale,
               *, latent_scale=None, num_splits=None) -> out

- ``q_latent`` (batch, q_len, heads, kv_lora_rank) and ``q_pe`` (batch, q_len, heads, rope_dim),
  both bf16, fp16 or fp32. q_len is 1 for plain decoding, up to 4 for speculative decoding: query i
  of a sequence sits at position ``seq_len - q_len + i`` and sees the positions up to its own.
- ``latent_cache`` (num_pages, page_size, kv_lora_rank): the latent c_kv of every cached token, in
  q's dtype, or float8_e4m3fn with ``latent_scale``. ``k_pe_cache`` (num_pages, page_size, rope_dim)
  in q's dtype: the roped shared key. Any page and token strides, unit stride in the last dimension,
  so an engine can keep both in one (num_pages, page_size, kv_lora_rank + rope_dim) pool (FlashMLA's
  layout) and pass ``pool[..., :kv_lora_rank]`` and ``pool[..., kv_lora_rank:]``.
- ``latent_scale`` float32 (num_pages, page_size, kv_lora_rank // group_size): the dequantization
  scale of each group of ``group_size`` latent values of a float8 cache (``quantize_latent_fp8``
  writes both); one group (last dimension 1) is a per-token scale, the fastest fp8 format. None
  for a bf16/fp32 cache.
- ``block_table`` int32 (batch, max_pages_per_seq): page ids of each sequence, in order. Entries
  past a sequence's last page are never read, so they may hold anything.
- ``seq_lens`` int32 (batch,): tokens cached per sequence, the q_len new ones included. A length
  of 0 (a padding entry of a CUDA-graph batch) gives zeros, as does any query that sees no token.
- ``out`` (batch, q_len, heads, kv_lora_rank) in q_latent's dtype.

Kernels: a split-KV attention kernel over the grid (head groups, batch, num_splits), then a combine
kernel that merges the splits' partial outputs by their log-sum-exps (skipped when num_splits is 1).
Each program serves BLOCK_H query rows (q_len x heads flattened, so speculative queries share the
cache reads too): every latent row is loaded once per program and used twice, as the key of
``q_latent @ latent^T`` and as the value of ``p @ latent``. Softmax and accumulation are float32.
Launch shapes depend only on tensor shapes (num_splits is a Python int), so a call can be captured
in a CUDA graph; splits past a sequence's end find no tokens and write an empty partial. On sm_90
(pages of a multiple of 64 tokens, a bf16/fp16 cache or fp8 with per-token scales), programs of
at most 16 query rows and of 64 rows take the Gluon split kernels of mla_decode_sm90 on the same
grid, with the same partial outputs and combine (DecodeConfig.sm90_gluon); batches of
sm90.PERSISTENT_MIN_BATCH to sm90.MAX_BATCH sequences of up to 16 rows each take its persistent
token-major kernel instead: min(batch x num_splits, SMs) programs, each an equal run of the
batch's tiles across sequence boundaries, a partial per (sequence, program) and the combine told
where they are.

Launch parameters (DecodeConfig: rows per program, tile size, warps, stages, register prefetch,
the split heuristic's programs per SM, the fp8 scale handling) come from the TUNED_CONFIGS table,
which ``benchmarks/bench_mla_decode.py --tune`` measures and prints; ``mla_decode_triton`` takes
any DecodeConfig, for tuning.

Device branch as in titan_mla.ops.rmsnorm: CUDA runs the kernels, CPU the PyTorch reference, except
eager calls on real CPU tensors under TRITON_INTERPRET=1, which run the kernels in the interpreter.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import mla_decode_sm90 as sm90
from .dispatch import reference_dtype, runs_triton

FP8_E4M3_MAX = 448.0
MAX_Q_LEN = 4

# Splits heuristic (the programs per SM it aims at are in DecodeConfig): at least this many
# tokens per split, and keep the partial outputs' traffic (written and read back in fp32) at most
# this fraction of the cache bytes read.
_MIN_TOKENS_PER_SPLIT = 128
_MAX_PARTIAL_TRAFFIC = 0.1
_WAVE_FILL = 0.9
# Stands in for the SM count under the interpreter: few programs keep CPU tests fast.
_INTERPRETER_SM_COUNT = 2
# The combine kernel's tile (splits x latent columns of one row): up to this many values, so that
# every split's partial comes in one load (in chunks of _COMBINE_MAX_SPLITS past that).
_COMBINE_TILE = 8192
_COMBINE_MAX_SPLITS = 512


@triton.jit
def _dot(a, b, acc, FP32_DOTS: tl.constexpr):
    """a @ b + acc. FP32_DOTS: exact fp32 products (no TF32) for fp32 inputs, and for 16-bit
    inputs under Triton 3.6's interpreter, which multiplies bf16 bit patterns as integers; fp32
    products of 16-bit values are exact, so this matches the GPU's tensor cores."""
    if FP32_DOTS:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _row_offsets(row_offsets, LATENT_DIM: tl.constexpr, GROUPS: tl.constexpr):
    """Element offsets of latent rows starting at ``row_offsets``: (rows, LATENT_DIM), or with
    GROUPS > 0 the grouped layout (GROUPS, rows, LATENT_DIM // GROUPS) of the fp8 grouped-dots
    path, one scale group per batch entry of its dots."""
    if GROUPS > 0:
        GROUP_SIZE: tl.constexpr = LATENT_DIM // GROUPS
        group_cols = (tl.arange(0, GROUPS) * GROUP_SIZE)[:, None, None] + tl.arange(0, GROUP_SIZE)[
            None, None, :
        ]
        offsets = row_offsets[None, :, None] + group_cols
    else:
        offsets = row_offsets[:, None] + tl.arange(0, LATENT_DIM)[None, :]
    return offsets


@triton.jit
def _per_row(values, GROUPS: tl.constexpr):
    """A per-row vector broadcastable against _row_offsets' layout."""
    # A statement, not a ternary: Triton treats a ternary's condition as dynamic.
    if GROUPS > 0:  # noqa: SIM108
        broadcastable = values[None, :, None]
    else:
        broadcastable = values[:, None]
    return broadcastable


@triton.jit
def _tile_pages(
    tile_begin, split_end, block_table_row_ptr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr
):
    """Page ids (int64) of the tokens [tile_begin, tile_begin + BLOCK_N): one id when a tile lies
    in one page, else one per token; 0 past split_end (table entries past a sequence's pages may
    be garbage: never read)."""
    if PAGE_SIZE % BLOCK_N == 0:
        # Tiles start at multiples of BLOCK_N, so a tile lies in one page: one table entry.
        pages = tl.load(
            block_table_row_ptr + tile_begin // PAGE_SIZE, mask=tile_begin < split_end, other=0
        )
    else:
        positions = tile_begin + tl.arange(0, BLOCK_N)
        pages = tl.load(
            block_table_row_ptr + positions // PAGE_SIZE, mask=positions < split_end, other=0
        )
    return pages.to(tl.int64)


@triton.jit
def _load_tile(
    tile_begin,
    split_end,
    pages,
    latent_cache_ptr,
    k_pe_cache_ptr,
    latent_scale_ptr,
    latent_stride_page,
    latent_stride_token,
    k_pe_stride_page,
    k_pe_stride_token,
    scale_stride_page,
    scale_stride_token,
    PAGE_SIZE: tl.constexpr,
    LATENT_DIM: tl.constexpr,
    ROPE_DIM: tl.constexpr,
    SCALE_GROUPS: tl.constexpr,
    GROUP_LAYOUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Raw cache rows of the tokens [tile_begin, tile_begin + BLOCK_N) below split_end, on the
    ``pages`` of _tile_pages: (latent, keys, scales, k_pe (BLOCK_N, ROPE_DIM)), zeros past
    split_end. The latent is (BLOCK_N, LATENT_DIM) with fp8 scales (BLOCK_N, SCALE_GROUPS), or in
    the grouped layout (GROUP_LAYOUT > 0) (SCALE_GROUPS, BLOCK_N, group size) with scales
    (SCALE_GROUPS, BLOCK_N); scales are a (1, BLOCK_N) placeholder for a bf16/fp32 cache. keys:
    with per-token fp8 scales, the same latent loaded a second time, transposed (LATENT_DIM,
    BLOCK_N), else a placeholder. An 8-bit tile has no transposed shared-memory read, so the key
    product's transpose would happen in registers after the load, which keeps the load out of
    Triton's software pipeline; two loads (the second mostly from L2) each take a shared-memory
    layout of their own, and both are pipelined. Nothing past split_end is read: unused pages may
    hold NaN."""
    positions = tile_begin + tl.arange(0, BLOCK_N)
    in_split = positions < split_end
    slots = positions % PAGE_SIZE

    latent_rows = pages * latent_stride_page + slots * latent_stride_token
    latent = tl.load(
        latent_cache_ptr + _row_offsets(latent_rows, LATENT_DIM, GROUP_LAYOUT),
        mask=_per_row(in_split, GROUP_LAYOUT),
        other=0.0,
    )
    if SCALE_GROUPS == 1:
        keys = tl.load(
            latent_cache_ptr + latent_rows[None, :] + tl.arange(0, LATENT_DIM)[:, None],
            mask=in_split[None, :],
            other=0.0,
        )
    else:
        keys = tl.zeros((1, BLOCK_N), tl.float32)
    k_pe_rows = k_pe_cache_ptr + pages * k_pe_stride_page + slots * k_pe_stride_token
    k_pe = tl.load(
        k_pe_rows[:, None] + tl.arange(0, ROPE_DIM)[None, :], mask=in_split[:, None], other=0.0
    )
    scale_rows = latent_scale_ptr + pages * scale_stride_page + slots * scale_stride_token
    if GROUP_LAYOUT > 0:
        scales = tl.load(
            scale_rows[None, :] + tl.arange(0, SCALE_GROUPS)[:, None],
            mask=in_split[None, :],
            other=0.0,
        )
    elif SCALE_GROUPS > 0:
        scales = tl.load(
            scale_rows[:, None] + tl.arange(0, SCALE_GROUPS)[None, :],
            mask=in_split[:, None],
            other=0.0,
        )
    else:
        scales = tl.zeros((1, BLOCK_N), tl.float32)
    return latent, keys, scales, k_pe


@triton.jit
def _attend_tile(
    tile_begin,
    split_end,
    row_limit,
    q_latent,
    q_pe,
    latent,
    keys,
    scales,
    k_pe,
    max_score,
    denominator,
    acc,
    softmax_scale_log2,
    SCALE_GROUPS: tl.constexpr,
    GROUP_LAYOUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FP32_DOTS: tl.constexpr,
):
    """Online-softmax update of (max_score, denominator, acc) with the tile of _load_tile at
    tile_begin; scores in base 2.

    An fp8 tile is only converted to q's dtype (exact: every e4m3 value is a bf16/fp16 value) when
    its scales can go to the small operands instead. Per-token scales (SCALE_GROUPS 1): each
    token's scale multiplies its latent score and its softmax weight before the value product;
    2-d dots, so only a conversion sits between the (pipelined) loads and the tensor cores, and
    the key product reads _load_tile's transposed copy of the tile. Grouped dots
    (GROUP_LAYOUT > 0): the same per (group, token), batched over groups (3-d dots: no wgmma,
    more registers). Otherwise the tile is dequantized in registers (fp32 products rounded to q's
    dtype) for 2-d dots.
    """
    dot_dtype: tl.constexpr = q_pe.dtype
    if GROUP_LAYOUT == 0 and SCALE_GROUPS > 1:
        latent_dim: tl.constexpr = latent.shape[1]
        grouped = tl.reshape(
            latent.to(tl.float32), (BLOCK_N, SCALE_GROUPS, latent_dim // SCALE_GROUPS)
        )
        latent = tl.reshape(grouped * scales[:, :, None], (BLOCK_N, latent_dim))
    values = latent.to(dot_dtype)
    scores = tl.zeros((q_pe.shape[0], BLOCK_N), tl.float32)
    if GROUP_LAYOUT > 0:
        # (groups, rows, group size) @ (groups, group size, tokens) -> per-group scores.
        group_scores = tl.zeros((SCALE_GROUPS, q_pe.shape[0], BLOCK_N), tl.float32)
        group_scores = _dot(q_latent, tl.permute(values, (0, 2, 1)), group_scores, FP32_DOTS)
        scores += tl.sum(group_scores * scales[:, None, :], axis=0)
    elif SCALE_GROUPS == 1:
        scores = _dot(q_latent, keys.to(dot_dtype), scores, FP32_DOTS)
        token_scales = tl.reshape(scales, (1, BLOCK_N))
        scores *= token_scales
    else:
        scores = _dot(q_latent, tl.trans(values), scores, FP32_DOTS)
    scores = _dot(q_pe, tl.trans(k_pe.to(dot_dtype)), scores, FP32_DOTS)
    positions = tile_begin + tl.arange(0, BLOCK_N)
    visible = (positions[None, :] <= row_limit[:, None]) & (positions < split_end)[None, :]
    scores = tl.where(visible, scores * softmax_scale_log2, -float("inf"))

    # max_score starts finite, so rows that see nothing yet keep alpha = 1 and p = 0 (no NaN).
    new_max = tl.maximum(max_score, tl.max(scores, axis=1))
    alpha = tl.exp2(max_score - new_max)
    p = tl.exp2(scores - new_max[:, None])
    denominator = denominator * alpha + tl.sum(p, axis=1)
    acc = acc * _per_row(alpha, GROUP_LAYOUT)
    if GROUP_LAYOUT > 0:
        scaled_p = (p[None, :, :] * scales[:, None, :]).to(dot_dtype)
        acc = _dot(scaled_p, values, acc, FP32_DOTS)
    elif SCALE_GROUPS == 1:
        acc = _dot((p * token_scales).to(dot_dtype), values, acc, FP32_DOTS)
    else:
        acc = _dot(p.to(dot_dtype), values, acc, FP32_DOTS)
    return new_max, denominator, acc


@triton.jit
def _decode_step(
    tile_begin,
    split_end,
    row_limit,
    q_latent,
    q_pe,
    latent,
    keys,
    scales,
    k_pe,
    pages,
    max_score,
    denominator,
    acc,
    softmax_scale_log2,
    block_table_row_ptr,
    latent_cache_ptr,
    k_pe_cache_ptr,
    latent_scale_ptr,
    latent_stride_page,
    latent_stride_token,
    k_pe_stride_page,
    k_pe_stride_token,
    scale_stride_page,
    scale_stride_token,
    PAGE_SIZE: tl.constexpr,
    LATENT_DIM: tl.constexpr,
    ROPE_DIM: tl.constexpr,
    SCALE_GROUPS: tl.constexpr,
    GROUP_LAYOUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FP32_DOTS: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """One loop iteration over the tile at tile_begin; (latent, scales, k_pe) carry a prefetched
    tile between iterations, ``pages`` the page ids of the tile this iteration loads.

    The page ids come one iteration ahead (read here for the next load), so a tile's load waits on
    no table read of its own iteration: the chain table read -> tile read was the latency of
    every iteration. PREFETCH: issue the loads of the next tile, then attend to the current one,
    loaded by the previous iteration, so that the loads' latency overlaps this tile's math.
    Triton's software pipeliner (num_stages) does not take loads that feed a dot through a
    conversion (the fp8 cache). Without PREFETCH, the tile is loaded here and the pipeliner may
    stage it (the carried tile is unused).
    """
    if PREFETCH:
        current_latent, current_keys, current_scales, current_k_pe = latent, keys, scales, k_pe
        load_begin = tile_begin + BLOCK_N
    else:
        load_begin = tile_begin
    latent, keys, scales, k_pe = _load_tile(
        load_begin,
        split_end,
        pages,
        latent_cache_ptr,
        k_pe_cache_ptr,
        latent_scale_ptr,
        latent_stride_page,
        latent_stride_token,
        k_pe_stride_page,
        k_pe_stride_token,
        scale_stride_page,
        scale_stride_token,
        PAGE_SIZE,
        LATENT_DIM,
        ROPE_DIM,
        SCALE_GROUPS,
        GROUP_LAYOUT,
        BLOCK_N,
    )
    pages = _tile_pages(load_begin + BLOCK_N, split_end, block_table_row_ptr, PAGE_SIZE, BLOCK_N)
    if not PREFETCH:
        current_latent, current_keys, current_scales, current_k_pe = latent, keys, scales, k_pe
    max_score, denominator, acc = _attend_tile(
        tile_begin,
        split_end,
        row_limit,
        q_latent,
        q_pe,
        current_latent,
        current_keys,
        current_scales,
        current_k_pe,
        max_score,
        denominator,
        acc,
        softmax_scale_log2,
        SCALE_GROUPS,
        GROUP_LAYOUT,
        BLOCK_N,
        FP32_DOTS,
    )
    return max_score, denominator, acc, latent, keys, scales, k_pe, pages


@triton.jit
def _mla_decode_split_kernel(
    q_latent_ptr,
    q_pe_ptr,
    latent_cache_ptr,
    k_pe_cache_ptr,
    latent_scale_ptr,
    block_table_ptr,
    seq_lens_ptr,
    out_ptr,
    partial_out_ptr,
    partial_lse_ptr,
    softmax_scale_log2,
    q_len,
    n_heads,
    q_latent_stride_batch,
    q_latent_stride_seq,
    q_latent_stride_head,
    q_pe_stride_batch,
    q_pe_stride_seq,
    q_pe_stride_head,
    latent_stride_page,
    latent_stride_token,
    k_pe_stride_page,
    k_pe_stride_token,
    scale_stride_page,
    scale_stride_token,
    block_table_stride_batch,
    SINGLE_SPLIT: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    LATENT_DIM: tl.constexpr,
    ROPE_DIM: tl.constexpr,
    SCALE_GROUPS: tl.constexpr,
    GROUP_LAYOUT: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FP32_DOTS: tl.constexpr,
    PREFETCH: tl.constexpr,
    USE_FOR_LOOP: tl.constexpr,
):
    # Head groups vary fastest, so programs sharing (sequence, split) run together and the
    # groups after the first mostly read the cache from L2.
    head_group = tl.program_id(0)
    batch = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    n_rows = q_len * n_heads

    rows = head_group * BLOCK_H + tl.arange(0, BLOCK_H)
    row_mask = rows < n_rows
    query = rows // n_heads
    head = rows % n_heads
    seq_len = tl.load(seq_lens_ptr + batch)
    # Causal among the new tokens: query i sees positions <= seq_len - q_len + i.
    row_limit = seq_len - q_len + query

    # Each split takes a share of its own sequence, in whole tiles.
    tokens_per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    split_begin = split * tokens_per_split
    split_end = tl.minimum(split_begin + tokens_per_split, seq_len)

    batch64 = batch.to(tl.int64)
    rope_cols = tl.arange(0, ROPE_DIM)
    q_latent_rows = query * q_latent_stride_seq + head * q_latent_stride_head
    q_latent = tl.load(
        q_latent_ptr
        + batch64 * q_latent_stride_batch
        + _row_offsets(q_latent_rows, LATENT_DIM, GROUP_LAYOUT),
        mask=_per_row(row_mask, GROUP_LAYOUT),
        other=0.0,
    )
    q_pe = tl.load(
        q_pe_ptr
        + batch64 * q_pe_stride_batch
        + (query * q_pe_stride_seq + head * q_pe_stride_head)[:, None]
        + rope_cols[None, :],
        mask=row_mask[:, None],
        other=0.0,
    )

    max_score = tl.full((BLOCK_H,), -1.0e30, tl.float32)
    denominator = tl.zeros((BLOCK_H,), tl.float32)
    if GROUP_LAYOUT > 0:
        acc = tl.zeros((GROUP_LAYOUT, BLOCK_H, LATENT_DIM // GROUP_LAYOUT), tl.float32)
    else:
        acc = tl.zeros((BLOCK_H, LATENT_DIM), tl.float32)
    block_table_row_ptr = block_table_ptr + batch64 * block_table_stride_batch
    pages = _tile_pages(split_begin, split_end, block_table_row_ptr, PAGE_SIZE, BLOCK_N)
    latent, keys, scales, k_pe = _load_tile(
        split_begin,
        split_end,
        pages,
        latent_cache_ptr,
        k_pe_cache_ptr,
        latent_scale_ptr,
        latent_stride_page,
        latent_stride_token,
        k_pe_stride_page,
        k_pe_stride_token,
        scale_stride_page,
        scale_stride_token,
        PAGE_SIZE,
        LATENT_DIM,
        ROPE_DIM,
        SCALE_GROUPS,
        GROUP_LAYOUT,
        BLOCK_N,
    )
    if PREFETCH:  # the first tile is loaded: the loop's first load is the second tile
        pages = _tile_pages(
            split_begin + BLOCK_N, split_end, block_table_row_ptr, PAGE_SIZE, BLOCK_N
        )
    # A for loop on the GPU, where Triton software-pipelines for loops only; a while loop in the
    # interpreter, which cannot run range() over runtime bounds with numpy >= 2.4.
    if USE_FOR_LOOP:
        for tile_begin in range(split_begin, split_end, BLOCK_N):
            max_score, denominator, acc, latent, keys, scales, k_pe, pages = _decode_step(
                tile_begin,
                split_end,
                row_limit,
                q_latent,
                q_pe,
                latent,
                keys,
                scales,
                k_pe,
                pages,
                max_score,
                denominator,
                acc,
                softmax_scale_log2,
                block_table_row_ptr,
                latent_cache_ptr,
                k_pe_cache_ptr,
                latent_scale_ptr,
                latent_stride_page,
                latent_stride_token,
                k_pe_stride_page,
                k_pe_stride_token,
                scale_stride_page,
                scale_stride_token,
                PAGE_SIZE,
                LATENT_DIM,
                ROPE_DIM,
                SCALE_GROUPS,
                GROUP_LAYOUT,
                BLOCK_N,
                FP32_DOTS,
                PREFETCH,
            )
    else:
        tile_begin = split_begin
        while tile_begin < split_end:
            max_score, denominator, acc, latent, keys, scales, k_pe, pages = _decode_step(
                tile_begin,
                split_end,
                row_limit,
                q_latent,
                q_pe,
                latent,
                keys,
                scales,
                k_pe,
                pages,
                max_score,
                denominator,
                acc,
                softmax_scale_log2,
                block_table_row_ptr,
                latent_cache_ptr,
                k_pe_cache_ptr,
                latent_scale_ptr,
                latent_stride_page,
                latent_stride_token,
                k_pe_stride_page,
                k_pe_stride_token,
                scale_stride_page,
                scale_stride_token,
                PAGE_SIZE,
                LATENT_DIM,
                ROPE_DIM,
                SCALE_GROUPS,
                GROUP_LAYOUT,
                BLOCK_N,
                FP32_DOTS,
                PREFETCH,
            )
            tile_begin += BLOCK_N

    # A row that saw no token has denominator 0: output 0 and lse -inf (log2(0)).
    has_tokens = denominator > 0.0
    out = acc / _per_row(tl.where(has_tokens, denominator, 1.0), GROUP_LAYOUT)
    out_rows = batch64 * n_rows + rows
    out_mask = _per_row(row_mask, GROUP_LAYOUT)
    if SINGLE_SPLIT:
        tl.store(
            out_ptr + _row_offsets(out_rows * LATENT_DIM, LATENT_DIM, GROUP_LAYOUT),
            out.to(out_ptr.dtype.element_ty),
            mask=out_mask,
        )
    else:
        partial_rows = out_rows * num_splits + split
        lse = tl.where(
            has_tokens, max_score + tl.log2(tl.where(has_tokens, denominator, 1.0)), -float("inf")
        )
        tl.store(partial_lse_ptr + partial_rows, lse, mask=row_mask)
        tl.store(
            partial_out_ptr + _row_offsets(partial_rows * LATENT_DIM, LATENT_DIM, GROUP_LAYOUT),
            out,
            mask=out_mask,
        )


@triton.jit
def _chunk_lse(partial_lse_ptr, first, stride, chunk_begin, count, BLOCK_SPLITS: tl.constexpr):
    """The partial indices of a chunk of a row's splits (split s at first + s x stride) and
    their lse (-inf past count)."""
    splits = chunk_begin + tl.arange(0, BLOCK_SPLITS)
    index = first + splits * stride
    lse = tl.load(partial_lse_ptr + index, mask=splits < count, other=-float("inf"))
    return index, lse


@triton.jit
def _row_partials(
    partial_index_ptr, row, n_rows, NUM_SPLITS: tl.constexpr, PERSISTENT: tl.constexpr
):
    """Where the partials of output row ``row`` (sequence x query row) are: the first one's
    index, the step between them and their number. PERSISTENT: the split kernel wrote each
    sequence's first slot and number of partials in partial_index (sequences, 2)."""
    if PERSISTENT:
        seq = row // n_rows
        first_slot = tl.load(partial_index_ptr + 2 * seq)
        count = tl.load(partial_index_ptr + 2 * seq + 1)
        return first_slot * n_rows + row % n_rows, n_rows, count
    return row * NUM_SPLITS, 1, NUM_SPLITS


@triton.jit
def _mla_decode_combine_kernel(
    partial_out_ptr,
    partial_lse_ptr,
    out_ptr,
    partial_index_ptr,
    n_rows,
    NUM_SPLITS: tl.constexpr,
    LATENT_DIM: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PERSISTENT: tl.constexpr,
):
    # One program per (sequence x query row, BLOCK_D latent columns):
    # out = sum_s 2^(lse_s - lse) * out_s, lse = log2-sum. The maximum lse comes first, so that
    # the chunks of splits do not depend on each other (usually one chunk: every split's partial
    # columns in one load); a sequence's few rows still spread over many programs.
    # Partials: (rows, NUM_SPLITS) from the split grid; PERSISTENT: (slots, n_rows) from the
    # persistent split kernel, a sequence's at consecutive slots (see _row_partials).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    first, stride, count = _row_partials(partial_index_ptr, row, n_rows, NUM_SPLITS, PERSISTENT)
    # While loops: a loaded count is no range() bound under the interpreter.
    max_lse = tl.full((), -float("inf"), tl.float32)
    chunk_begin = 0
    while chunk_begin < count:
        _, lse = _chunk_lse(partial_lse_ptr, first, stride, chunk_begin, count, BLOCK_SPLITS)
        max_lse = tl.maximum(max_lse, tl.max(lse, axis=0))
        chunk_begin += BLOCK_SPLITS
    # Empty splits have lse -inf: a finite reference keeps their weight 0 (and no inf - inf).
    reference = tl.where(max_lse == -float("inf"), 0.0, max_lse)
    weight_sum = tl.zeros((), tl.float32)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    chunk_begin = 0
    while chunk_begin < count:
        index, lse = _chunk_lse(partial_lse_ptr, first, stride, chunk_begin, count, BLOCK_SPLITS)
        # Empty splits wrote zeros: not worth reading.
        partial = tl.load(
            partial_out_ptr + index[:, None] * LATENT_DIM + cols[None, :],
            mask=(lse > -float("inf"))[:, None],
            other=0.0,
        )
        weights = tl.exp2(lse - reference)
        acc += tl.sum(weights[:, None] * partial, axis=0)
        weight_sum += tl.sum(weights, axis=0)
        chunk_begin += BLOCK_SPLITS
    out = acc / tl.where(weight_sum > 0.0, weight_sum, 1.0)
    tl.store(out_ptr + row * LATENT_DIM + cols, out.to(out_ptr.dtype.element_ty))


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the split kernel and the split heuristic (the tunables).

    block_h: query rows (q_len x heads) per program, a power of 2 >= 16 (tl.dot's minimum M).
    block_n: tokens per tile, a power of 2 >= 16; when it divides the page size a tile reads one
    page-table entry. prefetch: load the next tile into registers while attending to the current
    one (see _decode_step), else leave the loads to Triton's pipeliner. num_warps, num_stages: as
    in any Triton launch. fp8_grouped_dots: how an fp8 tile meets its scales (see _attend_tile).
    programs_per_sm: the split heuristic's target of programs per SM (see
    default_num_splits); below 1 it gives long single sequences fewer, longer splits.
    sm90_gluon: on sm_90, the Gluon kernel of mla_decode_sm90 that sm90_gluon_kernel finds, if any
    (its own tile, warps and stages; the split heuristic as configured here), else the Triton
    kernel with this configuration.
    """

    block_h: int
    block_n: int
    num_warps: int
    num_stages: int
    prefetch: bool
    programs_per_sm: float = 4.0
    fp8_grouped_dots: bool = False
    sm90_gluon: bool = False


# Tuned launch parameters, keyed by (cache kind, block_h, few programs), where "few programs" means
# batch x head groups <= SM count / 8 (a few long sequences: the split count decides the speed).
# `python benchmarks/bench_mla_decode.py --tune` prints a replacement for this table. Checked by
# compiling for sm_90 within shared memory and without register spills
# (tests/test_ops_mla_decode.py). bf16 at 16 rows: a sweep of tiles x split counts on H100 with the
# page ids read one tile ahead (kernel time, L2 flushed; benchmarks/NOTES.md): 32-token tiles, 4
# warps, 3 stages are best or within 2% of the best for one sequence of 128 to 1M tokens and for
# batch 32 at 512 tokens; batch 128 x 4096 takes them with fewer splits (whole waves of programs).
# 64 rows (128 heads): 64-token tiles, 2 stages (203 vs 171 TFLOP/s for 32-token tiles at 3 or 4
# stages; benchmarks/results/raw/mla_decode_fp8_token_sweep-h100/). fp8 with group scales: the
# --tune run at 16ed0bd (register prefetch, except at 64 rows, where that would spill). fp8 with
# per-token scales: the same sweep (64-token tiles, 8 warps, 3 stages the fastest at every shape).
# On sm_90 the bf16 and fp8-per-token keys take the Gluon kernels, token-major at 16 rows and wide
# at 64 (sm90_gluon; the Triton fields stay the fallback elsewhere): H100 same-run A/Bs in
# benchmarks/results/raw/mla_decode_gluon_ab-h100/ (programs per SM 1-8 within 2% of each other
# there) and mla_decode_wide_h128-h100/ (128 heads at batch 128: bf16 315 vs 195 TFLOP/s, fp8
# 243 vs 103).
TUNED_CONFIGS: dict[tuple[str, int, bool], DecodeConfig] = {
    ("bf16", 16, False): DecodeConfig(16, 32, 4, 3, False, programs_per_sm=2.0, sm90_gluon=True),
    ("bf16", 16, True): DecodeConfig(16, 32, 4, 3, False, programs_per_sm=1.0, sm90_gluon=True),
    ("bf16", 64, False): DecodeConfig(64, 64, 8, 2, prefetch=False, sm90_gluon=True),
    ("fp8", 16, False): DecodeConfig(16, 32, 8, 1, prefetch=True, programs_per_sm=8.0),
    ("fp8", 16, True): DecodeConfig(16, 32, 8, 1, prefetch=True, programs_per_sm=1.0),
    ("fp8", 64, False): DecodeConfig(64, 32, 8, 2, prefetch=False),
    ("fp8_token", 16, False): DecodeConfig(
        16, 64, 8, 3, False, programs_per_sm=4.0, sm90_gluon=True
    ),
    ("fp8_token", 16, True): DecodeConfig(
        16, 64, 8, 3, False, programs_per_sm=1.0, sm90_gluon=True
    ),
    ("fp8_token", 64, False): DecodeConfig(64, 32, 8, 3, prefetch=False, sm90_gluon=True),
}


def cache_kind(scale_groups: int) -> str:
    """The cache's TUNED_CONFIGS kind from its fp8 scale groups per token (0: not fp8)."""
    return {0: "bf16", 1: "fp8_token"}.get(scale_groups, "fp8")


def tuning_key(batch: int, n_rows: int, kind: str, sm_count: int) -> tuple[str, int, bool]:
    """The TUNED_CONFIGS key of a call on a ``kind`` cache (see cache_kind): all rows of a
    sequence in one program up to 64, then groups of 64 rows (128 heads: two programs per split,
    the second one mostly reading L2)."""
    block_h = min(64, max(16, triton.next_power_of_2(n_rows)))
    few_programs = 8 * batch * triton.cdiv(n_rows, block_h) <= sm_count
    return (kind, block_h, few_programs)


def default_config(
    batch: int, n_rows: int, q_dtype: torch.dtype, kind: str, sm_count: int
) -> DecodeConfig:
    """Launch parameters for ``batch`` sequences of ``n_rows`` = q_len x heads query rows: the
    TUNED_CONFIGS entry of the call's key, else the tile shape of the same cache kind's entry with
    the nearest block_h (register budgets depend on it; the smaller on a tie), preferring the
    same program count, at this call's block_h. fp32 (for tests) takes small tiles that fit
    shared memory."""
    kind, block_h, few_programs = tuning_key(batch, n_rows, kind, sm_count)
    if q_dtype == torch.float32:
        return DecodeConfig(block_h, block_n=16, num_warps=8, num_stages=2, prefetch=False)
    candidates = [key for key in TUNED_CONFIGS if key[0] == kind]
    if not candidates:
        raise ValueError(f"TUNED_CONFIGS has no entry for a {kind} cache")
    nearest = min(
        candidates,
        key=lambda key: (abs(math.log2(key[1] / block_h)), key[2] != few_programs, key[1]),
    )
    return replace(TUNED_CONFIGS[nearest], block_h=block_h)


def sm90_gluon_kernel(
    block_h: int,
    page_size: int,
    cache_dtype: torch.dtype,
    scale_groups: int,
    batch: int = 1,
    n_rows: int = 1,
) -> tuple[triton.JITFunction, int] | None:
    """The Gluon split kernel of mla_decode_sm90 (with its warp count) that takes, on sm_90, a
    call of ``block_h`` rows per program, ``batch`` sequences and ``n_rows`` query rows per
    sequence (q_len x heads), or None. All read whole 64-token tiles per page of a 16-bit cache or
    an fp8 one with per-token scales; the token-major kernels take up to 16 rows (the persistent
    one batches of sm90.PERSISTENT_MIN_BATCH to sm90.MAX_BATCH sequences of at most block_h
    rows), the wide kernel 64."""
    if page_size % sm90.BLOCK_N or not (
        cache_dtype in (torch.bfloat16, torch.float16) or scale_groups == 1
    ):
        return None
    if block_h <= sm90.MAX_ROWS:
        if sm90.PERSISTENT_MIN_BATCH <= batch <= sm90.MAX_BATCH and n_rows <= block_h:
            return sm90.mla_decode_persistent_sm90_kernel, sm90.NUM_WARPS
        return sm90.mla_decode_split_sm90_kernel, sm90.NUM_WARPS
    if block_h == sm90.WIDE_ROWS:
        return sm90.mla_decode_split_sm90_wide_kernel, sm90.WIDE_NUM_WARPS
    return None


def _is_sm90(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_num_splits(
    batch: int,
    n_rows: int,
    max_context: int,
    latent_dim: int,
    cache_bytes_per_token: int,
    block_h: int,
    sm_count: int,
    programs_per_sm: float = 4.0,
) -> int:
    """Splits per sequence from static shapes only (so the grid is fixed for CUDA graphs).

    Enough programs for ``programs_per_sm`` per SM (latency hiding and balance across sequences
    of different lengths), unless the fp32 partial outputs would cost more than
    ``_MAX_PARTIAL_TRAFFIC`` of the cache bytes; never fewer than min(1, programs_per_sm) waves of
    programs (or the whole split counts that fill ``_WAVE_FILL`` of that), never fewer than
    ``_MIN_TOKENS_PER_SPLIT`` tokens of the longest context per split.
    """
    programs = batch * triton.cdiv(n_rows, block_h)
    # Rounded down: a last partial wave of programs costs as much as a whole one.
    splits = int(programs_per_sm * sm_count / programs)
    partial_bytes_per_split = 2 * n_rows * latent_dim * 4
    cache_bytes = max_context * cache_bytes_per_token
    splits = min(splits, int(_MAX_PARTIAL_TRAFFIC * cache_bytes / partial_bytes_per_split))
    # At least the wave: rounded down where that still fills _WAVE_FILL of it (a few programs
    # past a whole wave would cost a second one: 128 heads, batch 8, 9 splits 79 us, 8 splits 57).
    wave = min(1.0, programs_per_sm) * sm_count / programs
    rounded_down = math.floor(wave)
    splits = max(splits, rounded_down if rounded_down >= _WAVE_FILL * wave else math.ceil(wave))
    return max(1, min(splits, max_context // _MIN_TOKENS_PER_SPLIT))


def _check_inputs(
    q_latent: Tensor,
    q_pe: Tensor,
    latent_cache: Tensor,
    k_pe_cache: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    latent_scale: Tensor | None,
) -> None:
    if q_latent.dim() != 4 or q_pe.dim() != 4 or q_latent.shape[:3] != q_pe.shape[:3]:
        raise ValueError(
            f"q_latent {tuple(q_latent.shape)} and q_pe {tuple(q_pe.shape)} must be "
            "(batch, q_len, heads, dim) with equal leading dimensions"
        )
    batch, q_len, _, latent_dim = q_latent.shape
    rope_dim = q_pe.shape[-1]
    if not 1 <= q_len <= MAX_Q_LEN:
        raise ValueError(f"q_len {q_len} not in 1..{MAX_Q_LEN}")
    if q_latent.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"q_latent dtype {q_latent.dtype} is not bf16, fp16 or fp32")
    if q_pe.dtype != q_latent.dtype:
        raise ValueError(f"q_pe dtype {q_pe.dtype} != q_latent dtype {q_latent.dtype}")
    for name, size in (("kv_lora_rank", latent_dim), ("rope_dim", rope_dim)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name} {size} must be a power of 2 >= 16")
    if latent_cache.dim() != 3 or latent_cache.shape[-1] != latent_dim:
        raise ValueError(
            f"latent_cache {tuple(latent_cache.shape)} is not (num_pages, page_size, {latent_dim})"
        )
    if k_pe_cache.shape != (*latent_cache.shape[:2], rope_dim):
        raise ValueError(
            f"k_pe_cache {tuple(k_pe_cache.shape)} is not "
            f"{(*latent_cache.shape[:2], rope_dim)} (latent_cache's pages)"
        )
    if k_pe_cache.dtype != q_latent.dtype:
        raise ValueError(f"k_pe_cache dtype {k_pe_cache.dtype} != q dtype {q_latent.dtype}")
    if latent_cache.stride(-1) != 1 or k_pe_cache.stride(-1) != 1:
        raise ValueError("latent_cache and k_pe_cache need unit stride in their last dimension")
    if latent_cache.dtype == torch.float8_e4m3fn:
        if latent_scale is None:
            raise ValueError("a float8_e4m3fn latent_cache needs latent_scale")
        groups = latent_scale.shape[-1] if latent_scale.dim() == 3 else 0
        if (
            latent_scale.shape[:2] != latent_cache.shape[:2]
            or groups < 1
            or latent_dim % groups
            or groups & (groups - 1)
            or latent_scale.dtype != torch.float32
        ):
            raise ValueError(
                f"latent_scale {tuple(latent_scale.shape)} {latent_scale.dtype} is not float32 "
                f"(num_pages, page_size, groups) with a power-of-2 number of groups of {latent_dim}"
            )
        if latent_scale.stride(-1) != 1:
            raise ValueError("latent_scale needs unit stride in its last dimension")
    elif latent_cache.dtype != q_latent.dtype:
        raise ValueError(
            f"latent_cache dtype {latent_cache.dtype} is neither q's {q_latent.dtype} nor "
            "float8_e4m3fn"
        )
    elif latent_scale is not None:
        raise ValueError("latent_scale is only for a float8_e4m3fn latent_cache")
    if block_table.dim() != 2 or block_table.shape[0] != batch or block_table.dtype != torch.int32:
        raise ValueError(f"block_table {tuple(block_table.shape)} is not int32 ({batch}, pages)")
    if seq_lens.shape != (batch,) or seq_lens.dtype != torch.int32:
        raise ValueError(f"seq_lens {tuple(seq_lens.shape)} is not int32 ({batch},)")


def mla_decode_triton(
    q_latent: Tensor,
    q_pe: Tensor,
    latent_cache: Tensor,
    k_pe_cache: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    softmax_scale: float,
    latent_scale: Tensor | None = None,
    num_splits: int | None = None,
    config: DecodeConfig | None = None,
) -> Tensor:
    """Launch the kernels (the op body's Triton branch); ``config`` overrides the heuristic, for
    tuning. Arguments as in the module docstring."""
    # Constexprs and the split heuristic take Python ints: symbolic sizes (torch.compile with
    # dynamic shapes) are specialized here, as CUDA-graph decoding does anyway.
    batch, q_len, n_heads, latent_dim = (int(size) for size in q_latent.shape)
    rope_dim, page_size = int(q_pe.shape[-1]), int(latent_cache.shape[1])
    n_rows = q_len * n_heads
    fp8_cache = latent_scale is not None
    scale_groups = int(latent_scale.shape[-1]) if fp8_cache else 0
    sm_count = (
        _sm_count(q_latent.device.index)
        if q_latent.device.type == "cuda"
        else _INTERPRETER_SM_COUNT
    )
    if config is None:
        config = default_config(batch, n_rows, q_latent.dtype, cache_kind(scale_groups), sm_count)
    if num_splits is None:
        latent_bytes = latent_dim * latent_cache.element_size() + 4 * scale_groups
        num_splits = default_num_splits(
            batch,
            n_rows,
            int(block_table.shape[1]) * page_size,
            latent_dim,
            latent_bytes + rope_dim * k_pe_cache.element_size(),
            config.block_h,
            sm_count,
            config.programs_per_sm,
        )
    if num_splits < 1:
        raise ValueError(f"num_splits {num_splits} < 1")

    if q_latent.stride(-1) != 1:
        q_latent = q_latent.contiguous()
    if q_pe.stride(-1) != 1:
        q_pe = q_pe.contiguous()
    if block_table.stride(-1) != 1:
        block_table = block_table.contiguous()
    seq_lens = seq_lens.contiguous()
    # A placeholder pointer when the cache is not fp8 (SCALE_GROUPS = 0: never read).
    scale = latent_scale if fp8_cache else latent_cache

    gluon = (
        config.sm90_gluon
        and _is_sm90(q_latent.device)
        and sm90_gluon_kernel(
            config.block_h, page_size, latent_cache.dtype, scale_groups, batch, n_rows
        )
    )
    # The persistent kernel: batch x num_splits programs' worth of equal runs of tiles, at most
    # one program per SM, a partial per sequence a program touches (slot sequence + program).
    persistent = bool(gluon) and gluon[0] is sm90.mla_decode_persistent_sm90_kernel
    programs = min(batch * num_splits, sm_count) if persistent else num_splits
    single = programs == 1 and not persistent
    out = torch.empty(q_latent.shape, dtype=q_latent.dtype, device=q_latent.device)
    if single:
        partial_out = partial_lse = out  # unused: the split kernel writes out directly
    else:
        partial_rows = (batch + programs, n_rows) if persistent else (batch, n_rows, num_splits)
        partial_out = torch.empty(
            (*partial_rows, latent_dim), dtype=torch.float32, device=q_latent.device
        )
        partial_lse = torch.empty(partial_rows, dtype=torch.float32, device=q_latent.device)
    # The persistent kernel's (first slot, number of partials) per sequence, for the combine
    # (elsewhere a placeholder, never read).
    partial_index = (
        torch.empty((batch, 2), dtype=torch.int32, device=q_latent.device)
        if persistent
        else seq_lens
    )
    grid = (programs,) if persistent else (triton.cdiv(n_rows, config.block_h), batch, num_splits)
    if gluon:
        split_kernel, num_warps = gluon
        constants = dict(IS_FP8=fp8_cache, BLOCK_H=config.block_h, BLOCK_N=sm90.BLOCK_N)
        # The persistent schedule reads every sequence length in one vector.
        constants.update(
            dict(BLOCK_B=triton.next_power_of_2(max(batch, 128)))
            if persistent
            else dict(SINGLE_SPLIT=single)
        )
        launch = dict(num_warps=num_warps)
    else:
        split_kernel = _mla_decode_split_kernel
        constants = dict(
            SINGLE_SPLIT=single,
            SCALE_GROUPS=scale_groups,
            # One group (per-token scales) has its own 2-d way (see _attend_tile).
            GROUP_LAYOUT=scale_groups if config.fp8_grouped_dots and scale_groups > 1 else 0,
            BLOCK_H=config.block_h,
            BLOCK_N=config.block_n,
            FP32_DOTS=q_latent.dtype == torch.float32 or q_latent.device.type == "cpu",
            PREFETCH=config.prefetch,
            USE_FOR_LOOP=q_latent.device.type == "cuda",
        )
        launch = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    split_kernel[grid](
        q_latent,
        q_pe,
        latent_cache,
        k_pe_cache,
        scale,
        block_table,
        seq_lens,
        out,
        partial_out,
        partial_lse,
        softmax_scale * math.log2(math.e),
        q_len,
        n_heads,
        q_latent.stride(0),
        q_latent.stride(1),
        q_latent.stride(2),
        q_pe.stride(0),
        q_pe.stride(1),
        q_pe.stride(2),
        latent_cache.stride(0),
        latent_cache.stride(1),
        k_pe_cache.stride(0),
        k_pe_cache.stride(1),
        scale.stride(0),
        scale.stride(1),
        block_table.stride(0),
        *((batch, partial_index) if persistent else ()),
        PAGE_SIZE=page_size,
        LATENT_DIM=latent_dim,
        ROPE_DIM=rope_dim,
        **constants,
        **launch,
    )
    if not single:
        # Chunks of about a sequence's expected number of partials.
        expected = triton.cdiv(programs, batch) + 1 if persistent else num_splits
        block_splits = min(_COMBINE_MAX_SPLITS, triton.next_power_of_2(expected))
        block_d = min(latent_dim, max(16, _COMBINE_TILE // block_splits))
        _mla_decode_combine_kernel[(batch * n_rows, latent_dim // block_d)](
            partial_out,
            partial_lse,
            out,
            partial_index,
            n_rows,
            # Unused by the persistent layout: one value there, not one compile per grid size.
            NUM_SPLITS=0 if persistent else programs,
            LATENT_DIM=latent_dim,
            BLOCK_SPLITS=block_splits,
            BLOCK_D=block_d,
            PERSISTENT=persistent,
            num_warps=4,
        )
    return out


def quantize_latent_fp8(latent: Tensor, group_size: int | None = None) -> tuple[Tensor, Tensor]:
    """(float8_e4m3fn latent, float32 scales) for a float8 cache: each group of ``group_size``
    consecutive values of the last dimension is divided by its absmax / 448. Scales have shape
    (..., kv_lora_rank // group_size); group_size None (or kv_lora_rank) gives one scale per
    token, the format with the fastest decode (see _attend_tile)."""
    latent_dim = latent.shape[-1]
    group_size = group_size or latent_dim
    if latent_dim % group_size:
        raise ValueError(f"kv_lora_rank {latent_dim} is not a multiple of group_size {group_size}")
    groups = latent.float().unflatten(-1, (latent_dim // group_size, group_size))
    # An all-zero group gets scale 1 rather than 0: quantization never divides by zero.
    absmax = groups.abs().amax(dim=-1, keepdim=True)
    scales = torch.where(absmax > 0, absmax / FP8_E4M3_MAX, torch.ones_like(absmax))
    quantized = (groups / scales).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return quantized.flatten(-2), scales.squeeze(-1)


def dequantize_latent_fp8(latent: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """The inverse of ``quantize_latent_fp8``, in ``dtype``."""
    groups = latent.to(dtype).unflatten(-1, (scales.shape[-1], -1))
    return (groups * scales.to(dtype).unsqueeze(-1)).flatten(-2)


def mla_decode_reference(
    q_latent: Tensor,
    q_pe: Tensor,
    latent_cache: Tensor,
    k_pe_cache: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    softmax_scale: float,
    latent_scale: Tensor | None = None,
) -> Tensor:
    """PyTorch absorbed MLA decode with the op's semantics (the CPU branch): gathers each
    sequence's pages, dequantizes a float8 cache, masked softmax in float32 (float64 for float64
    queries). Memory: the gathered cache of batch x max_pages x page_size tokens in that dtype."""
    dtype = reference_dtype(q_latent)
    batch, q_len, _, latent_dim = q_latent.shape
    max_pages = block_table.shape[1]
    page_size = latent_cache.shape[1]
    seq_lens = seq_lens.long()

    # Page ids past a sequence's last page may be garbage: read page 0 there, then drop it.
    pages_used = (seq_lens + page_size - 1) // page_size
    page_in_use = torch.arange(max_pages, device=seq_lens.device) < pages_used[:, None]
    pages = torch.where(page_in_use, block_table.long(), 0)
    if latent_scale is None:
        latent = latent_cache[pages].to(dtype)
    else:
        latent = dequantize_latent_fp8(latent_cache[pages], latent_scale[pages], dtype)
    latent = latent.reshape(batch, max_pages * page_size, latent_dim)
    k_pe = k_pe_cache[pages].to(dtype).reshape(batch, max_pages * page_size, -1)

    positions = torch.arange(max_pages * page_size, device=seq_lens.device)
    in_sequence = (positions < seq_lens[:, None]).unsqueeze(-1)
    # torch.where, not a product: unused pages may hold NaN.
    latent = torch.where(in_sequence, latent, 0.0)
    k_pe = torch.where(in_sequence, k_pe, 0.0)

    scores = torch.einsum("bqhr,btr->bqht", q_latent.to(dtype), latent)
    scores = scores + torch.einsum("bqhe,bte->bqht", q_pe.to(dtype), k_pe)
    query_positions = seq_lens[:, None] - q_len + torch.arange(q_len, device=seq_lens.device)
    visible = positions[None, None, :] <= query_positions[:, :, None]  # (batch, q_len, tokens)
    scores = torch.where(visible[:, :, None, :], scores * softmax_scale, -math.inf)

    # A query that sees no token (seq_len 0) gets zeros, not NaN.
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(row_max == -math.inf, 0.0, row_max)
    weights = torch.exp(scores - row_max)
    denominator = weights.sum(dim=-1, keepdim=True)
    weights = weights / torch.where(denominator > 0, denominator, 1.0)
    out = torch.einsum("bqht,btr->bqhr", weights, latent)
    return out.to(q_latent.dtype).contiguous()  # the Triton branch's (and fake's) layout


# An opaque custom op (not triton_op): Inductor cannot rebuild this kernel (sm_90, triton 3.6: its
# re-specialisation trips a tl.dot accumulator check in _attend_tile), so a compiled decode step
# calls the op as an extern kernel inside one graph, launched exactly as in eager mode.
@torch.library.custom_op("titan_mla::mla_decode", mutates_args=())
def _mla_decode_op(
    q_latent: Tensor,
    q_pe: Tensor,
    latent_cache: Tensor,
    k_pe_cache: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    softmax_scale: float,
    latent_scale: Tensor | None = None,
    num_splits: int | None = None,
) -> Tensor:
    """Absorbed MLA decode over a paged cache; see the module docstring."""
    _check_inputs(q_latent, q_pe, latent_cache, k_pe_cache, block_table, seq_lens, latent_scale)
    if runs_triton(q_latent):
        return mla_decode_triton(
            q_latent,
            q_pe,
            latent_cache,
            k_pe_cache,
            block_table,
            seq_lens,
            softmax_scale,
            latent_scale,
            num_splits,
        )
    return mla_decode_reference(
        q_latent, q_pe, latent_cache, k_pe_cache, block_table, seq_lens, softmax_scale, latent_scale
    )


@_mla_decode_op.register_fake
def _mla_decode_fake(
    q_latent: Tensor,
    q_pe: Tensor,
    latent_cache: Tensor,
    k_pe_cache: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    softmax_scale: float,
    latent_scale: Tensor | None = None,
    num_splits: int | None = None,
) -> Tensor:
    _check_inputs(q_latent, q_pe, latent_cache, k_pe_cache, block_table, seq_lens, latent_scale)
    return q_latent.new_empty(q_latent.shape)


def mla_decode(
    q_latent: Tensor,
    q_pe: Tensor,
    latent_cache: Tensor,
    k_pe_cache: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    softmax_scale: float,
    *,
    latent_scale: Tensor | None = None,
    num_splits: int | None = None,
) -> Tensor:
    """Absorbed MLA decode: (batch, q_len, heads, kv_lora_rank) latent outputs, to be multiplied by
    W_UV per head. Layouts and semantics in the module docstring; ``num_splits`` (a Python int,
    static for CUDA graphs) overrides the split-KV heuristic, which uses static shapes only."""
    return torch.ops.titan_mla.mla_decode(
        q_latent,
        q_pe,
        latent_cache,
        k_pe_cache,
        block_table,
        seq_lens,
        softmax_scale,
        latent_scale,
        num_splits,
    )
