"""The split kernel of titan_mla::mla_decode for Hopper (sm_90), in Gluon: token-major wgmma over a
latent tile staged once in shared memory.

Same grid, inputs and partial outputs as ``_mla_decode_split_kernel`` in mla_decode.py (whose
combine kernel merges the splits), for the memory-bound case: at most 16 query rows per program,
pages of a multiple of 64 tokens, a bf16/fp16 cache or an fp8 cache with one scale per token.

Why a second kernel: with 16 query rows the Triton kernel's dots are mma.sync chains that re-read
q and every tile from shared memory per warp, and an 8-bit tile cannot be read transposed from
shared memory (the value product gathers it byte by byte). Here the tokens are the M dimension
of both products (wgmma needs M >= 64; 16 heads are its N):

    scores^T (tokens, rows)  = latent_tile (tokens, 512) @ q_latent^T + k_pe_tile @ q_pe^T
    out^T    (512, rows)    += latent_tile^T (512, tokens) @ p^T (tokens, rows)

Both products read the same shared-memory tile, the second through wgmma's transposed-operand
mode (16-bit types only). An fp8 tile is therefore converted once into a staging buffer, to fp16
(exact for e4m3, and one conversion per two values where bf16 needs three): the latent products
run in fp16 with q scaled by a power of 2 into fp16's range; each token's scale multiplies its
latent score and its softmax weight; the rope product stays in q's dtype. Loads are cp.async
copies STAGES tiles deep; the token strides are compile-time constants (one cache layout per
engine), so the copies' addresses are constant offsets from one base. The softmax runs down the
columns (a cross-warp maximum per tile); the denominators stay per thread until the end.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    warpgroup_mma,
    warpgroup_mma_wait,
)

# fp8 caches: the softmax weight times the token's scale goes to fp16 times this (the output is
# divided by it): weights of tokens with a latent maximum from ~1e-4 to ~1e5 stay normal fp16.
P_GAIN = gl.constexpr(256.0)
# Tokens per tile: wgmma's M is 64 per warpgroup.
BLOCK_N = 64
NUM_WARPS = 4
STAGES = 2  # tiles in flight: 2 x (32 or 64 KiB) of latent, within shared memory beside the rest
# The output accumulator (512 x rows fp32) takes rows x 4 registers per thread: 32 rows spill.
MAX_ROWS = 16


@gluon.jit
def _issue_tile(
    tile_begin,
    split_end,
    page,
    stage,
    latent_ring,
    k_pe_ring,
    latent_cache_ptr,
    k_pe_cache_ptr,
    latent_stride_page,
    latent_stride_token: gl.constexpr,
    k_pe_stride_page,
    k_pe_stride_token: gl.constexpr,
    PAGE_SIZE: gl.constexpr,
    LATENT_DIM: gl.constexpr,
    ROPE_DIM: gl.constexpr,
    BLOCK_N: gl.constexpr,
):
    """cp.async copies of the tile at tile_begin (one page) into ring stage ``stage``, as one
    commit group; tokens past split_end are zero-filled, never read."""
    latent_vector: gl.constexpr = 128 // latent_cache_ptr.dtype.element_ty.primitive_bitwidth
    latent_layout: gl.constexpr = gl.BlockedLayout([1, latent_vector], [1, 32], [4, 1], [1, 0])
    k_pe_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    page64 = page.to(gl.int64)
    slot = tile_begin % PAGE_SIZE

    tokens = gl.arange(0, BLOCK_N, gl.SliceLayout(1, latent_layout))
    cols = gl.arange(0, LATENT_DIM, gl.SliceLayout(0, latent_layout))
    rows = page64 * latent_stride_page + (slot + tokens) * latent_stride_token
    async_copy.async_copy_global_to_shared(
        latent_ring.index(stage),
        latent_cache_ptr + rows[:, None] + cols[None, :],
        mask=(tile_begin + tokens < split_end)[:, None],
    )
    tokens = gl.arange(0, BLOCK_N, gl.SliceLayout(1, k_pe_layout))
    cols = gl.arange(0, ROPE_DIM, gl.SliceLayout(0, k_pe_layout))
    rows = page64 * k_pe_stride_page + (slot + tokens) * k_pe_stride_token
    async_copy.async_copy_global_to_shared(
        k_pe_ring.index(stage),
        k_pe_cache_ptr + rows[:, None] + cols[None, :],
        mask=(tile_begin + tokens < split_end)[:, None],
    )
    async_copy.commit_group()


@gluon.jit
def _tile_page(tile_begin, split_end, block_table_row_ptr, PAGE_SIZE: gl.constexpr):
    """The page id of the tile at tile_begin (0 past split_end: table entries past a sequence's
    pages are never read)."""
    return gl.load(
        block_table_row_ptr + tile_begin // PAGE_SIZE, mask=tile_begin < split_end, other=0
    )


@gluon.jit
def _tile_scales(
    tile_begin,
    split_end,
    block_table_row_ptr,
    latent_scale_ptr,
    scale_stride_page,
    scale_stride_token,
    PAGE_SIZE: gl.constexpr,
    BLOCK_N: gl.constexpr,
    layout: gl.constexpr,
):
    """The per-token scales of the tile at tile_begin (0 past split_end), in ``layout``."""
    page = _tile_page(tile_begin, split_end, block_table_row_ptr, PAGE_SIZE).to(gl.int64)
    tokens = tile_begin + gl.arange(0, BLOCK_N, layout)
    return gl.load(
        latent_scale_ptr + page * scale_stride_page + (tokens % PAGE_SIZE) * scale_stride_token,
        mask=tokens < split_end,
        other=0.0,
    )


@gluon.jit
def mla_decode_split_sm90_kernel(
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
    latent_stride_token: gl.constexpr,
    k_pe_stride_page,
    k_pe_stride_token: gl.constexpr,
    scale_stride_page,
    scale_stride_token,
    block_table_stride_batch,
    SINGLE_SPLIT: gl.constexpr,
    PAGE_SIZE: gl.constexpr,
    LATENT_DIM: gl.constexpr,
    ROPE_DIM: gl.constexpr,
    IS_FP8: gl.constexpr,
    BLOCK_H: gl.constexpr,
    BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr,
):
    dot_dtype: gl.constexpr = q_pe_ptr.dtype.element_ty
    cache_dtype: gl.constexpr = latent_cache_ptr.dtype.element_ty
    # The latent products of an fp8 tile run in fp16: e4m3 -> fp16 is one conversion per two
    # values (-> bf16 goes through fp16 and then one more per value, the kernel's bottleneck).
    if IS_FP8:
        latent_dtype: gl.constexpr = gl.float16
    else:
        latent_dtype: gl.constexpr = dot_dtype
    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_H, 16]
    )
    token_layout: gl.constexpr = gl.SliceLayout(1, mma)
    row_layout: gl.constexpr = gl.SliceLayout(0, mma)
    tile_smem: gl.constexpr = gl.NVMMASharedLayout.get_default_for(
        [BLOCK_N, LATENT_DIM], latent_dtype
    )
    raw_smem: gl.constexpr = gl.NVMMASharedLayout.get_default_for(
        [BLOCK_N, LATENT_DIM], cache_dtype
    )
    k_pe_smem: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, ROPE_DIM], dot_dtype)
    p_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for(
        [BLOCK_N, BLOCK_H], latent_dtype
    )

    head_group = gl.program_id(0)
    batch = gl.program_id(1)
    split = gl.program_id(2)
    num_splits = gl.num_programs(2)
    n_rows = q_len * n_heads
    batch64 = batch.to(gl.int64)
    seq_len = gl.load(seq_lens_ptr + batch)
    tokens_per_split = gl.cdiv(gl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    split_begin = split * tokens_per_split
    split_end = gl.minimum(split_begin + tokens_per_split, seq_len)
    n_tiles = gl.maximum(gl.cdiv(split_end - split_begin, BLOCK_N), 0)
    block_table_row_ptr = block_table_ptr + batch64 * block_table_stride_batch

    latent_ring = gl.allocate_shared_memory(cache_dtype, [STAGES, BLOCK_N, LATENT_DIM], raw_smem)
    k_pe_ring = gl.allocate_shared_memory(dot_dtype, [STAGES, BLOCK_N, ROPE_DIM], k_pe_smem)
    if IS_FP8:
        staged = gl.allocate_shared_memory(latent_dtype, [BLOCK_N, LATENT_DIM], tile_smem)
    p_smem = gl.allocate_shared_memory(latent_dtype, [BLOCK_N, BLOCK_H], p_smem_layout)

    # The first STAGES - 1 tiles' copies go out before q is read.
    page = _tile_page(split_begin, split_end, block_table_row_ptr, PAGE_SIZE)
    for first_tile in gl.static_range(STAGES - 1):
        tile_begin = split_begin + first_tile * BLOCK_N
        _issue_tile(
            tile_begin,
            split_end,
            page,
            first_tile,
            latent_ring,
            k_pe_ring,
            latent_cache_ptr,
            k_pe_cache_ptr,
            latent_stride_page,
            latent_stride_token,
            k_pe_stride_page,
            k_pe_stride_token,
            PAGE_SIZE,
            LATENT_DIM,
            ROPE_DIM,
            BLOCK_N,
        )
        page = _tile_page(tile_begin + BLOCK_N, split_end, block_table_row_ptr, PAGE_SIZE)

    # q rows (query x head) into shared memory: the B operands of the key products.
    q_layout: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [4, 1], [1, 0])
    q_rows = head_group * BLOCK_H + gl.arange(0, BLOCK_H, gl.SliceLayout(1, q_layout))
    q_row_mask = (q_rows < n_rows)[:, None]
    q_query = q_rows // n_heads
    q_head = q_rows % n_heads
    q_latent = gl.load(
        q_latent_ptr
        + batch64 * q_latent_stride_batch
        + (q_query * q_latent_stride_seq + q_head * q_latent_stride_head)[:, None]
        + gl.arange(0, LATENT_DIM, gl.SliceLayout(0, q_layout))[None, :],
        mask=q_row_mask,
        other=0.0,
    )
    if IS_FP8:
        # fp16 holds q scaled by a power of 2 (exact) that puts its largest value in
        # [2^12, 2^14): no overflow, and rows 2^26 times smaller still normal; the scores take
        # the inverse back (with the token scales).
        q_abs_max = gl.max(gl.max(gl.abs(q_latent.to(gl.float32)), axis=1), axis=0)
        exponent = gl.where(q_abs_max > 0.0, gl.floor(gl.log2(q_abs_max)) - 12.0, 0.0)
        exponent = gl.minimum(gl.maximum(exponent, -100.0), 100.0).to(gl.int32)
        q_down = ((127 - exponent) << 23).to(gl.float32, bitcast=True)
        q_up = ((127 + exponent) << 23).to(gl.float32, bitcast=True)
        q_latent = (q_latent.to(gl.float32) * q_down).to(latent_dtype)
    q_latent_smem = gl.allocate_shared_memory(
        latent_dtype,
        [BLOCK_H, LATENT_DIM],
        gl.NVMMASharedLayout.get_default_for([BLOCK_H, LATENT_DIM], latent_dtype),
        q_latent,
    )
    q_pe = gl.load(
        q_pe_ptr
        + batch64 * q_pe_stride_batch
        + (q_query * q_pe_stride_seq + q_head * q_pe_stride_head)[:, None]
        + gl.arange(0, ROPE_DIM, gl.SliceLayout(0, q_layout))[None, :],
        mask=q_row_mask,
        other=0.0,
    )
    q_pe_smem = gl.allocate_shared_memory(
        dot_dtype,
        [BLOCK_H, ROPE_DIM],
        gl.NVMMASharedLayout.get_default_for([BLOCK_H, ROPE_DIM], dot_dtype),
        q_pe,
    )
    fence_async_shared()

    rows = head_group * BLOCK_H + gl.arange(0, BLOCK_H, row_layout)
    max_score = gl.full([BLOCK_H], -1.0e30, gl.float32, row_layout)
    denominators = gl.zeros([BLOCK_N, BLOCK_H], gl.float32, mma)
    acc = gl.zeros([LATENT_DIM, BLOCK_H], gl.float32, mma)
    convert_layout: gl.constexpr = gl.BlockedLayout([1, 16], [8, 4], [4, 1], [1, 0])
    # fp8 scales come one tile ahead, into registers.
    if IS_FP8:
        next_scales = _tile_scales(
            split_begin,
            split_end,
            block_table_row_ptr,
            latent_scale_ptr,
            scale_stride_page,
            scale_stride_token,
            PAGE_SIZE,
            BLOCK_N,
            token_layout,
        )
    else:
        next_scales = gl.zeros([BLOCK_N], gl.float32, token_layout)

    for tile in range(n_tiles):
        # Made here, not kept across iterations: registers are short.
        no_scores = gl.zeros([BLOCK_N, BLOCK_H], gl.float32, mma)
        stage = tile % STAGES
        tile_begin = split_begin + tile * BLOCK_N
        # This tile's copies are done (the later STAGES - 2 may still run) and every warp has
        # finished the previous tile, whose stage the next copies overwrite.
        async_copy.wait_group(STAGES - 2)
        fence_async_shared()
        gl.thread_barrier()
        _issue_tile(
            tile_begin + (STAGES - 1) * BLOCK_N,
            split_end,
            page,
            (tile + STAGES - 1) % STAGES,
            latent_ring,
            k_pe_ring,
            latent_cache_ptr,
            k_pe_cache_ptr,
            latent_stride_page,
            latent_stride_token,
            k_pe_stride_page,
            k_pe_stride_token,
            PAGE_SIZE,
            LATENT_DIM,
            ROPE_DIM,
            BLOCK_N,
        )
        # Read one iteration ahead, so that no copy waits on its table read.
        page = _tile_page(tile_begin + STAGES * BLOCK_N, split_end, block_table_row_ptr, PAGE_SIZE)

        if IS_FP8:
            token_scale = next_scales
            next_scales = _tile_scales(
                tile_begin + BLOCK_N,
                split_end,
                block_table_row_ptr,
                latent_scale_ptr,
                scale_stride_page,
                scale_stride_token,
                PAGE_SIZE,
                BLOCK_N,
                token_layout,
            )
            staged.store(latent_ring.index(stage).load(convert_layout).to(latent_dtype))
            fence_async_shared()
            gl.thread_barrier()
            latent = staged
        else:
            latent = latent_ring.index(stage)
        scores = warpgroup_mma(
            latent, q_latent_smem.permute((1, 0)), no_scores, use_acc=False, is_async=True
        )
        k_pe_tile = k_pe_ring.index(stage)
        if IS_FP8:
            # The token's scale multiplies its latent score only (the rope key is not fp8).
            rope_scores = warpgroup_mma(
                k_pe_tile, q_pe_smem.permute((1, 0)), no_scores, use_acc=False, is_async=True
            )
            scores, rope_scores = warpgroup_mma_wait(0, deps=(scores, rope_scores))
            scores = scores * (token_scale * q_up)[:, None] + rope_scores
        else:
            scores = warpgroup_mma(k_pe_tile, q_pe_smem.permute((1, 0)), scores, is_async=True)
            scores = warpgroup_mma_wait(0, deps=(scores,))

        positions = tile_begin + gl.arange(0, BLOCK_N, token_layout)
        # Causal among the new tokens: query i sees positions <= seq_len - q_len + i (made
        # here, not kept across iterations: registers are short).
        row_limit = seq_len - q_len + rows // n_heads
        visible = (positions[:, None] <= row_limit[None, :]) & (positions < split_end)[:, None]
        scores = gl.where(visible, scores * softmax_scale_log2, -float("inf"))
        # max_score starts finite: rows that see nothing yet keep alpha = 1 and p = 0.
        new_max = gl.maximum(max_score, gl.max(scores, axis=0))
        alpha = gl.exp2(max_score - new_max)
        p = gl.exp2(scores - new_max[None, :])
        denominators = denominators * alpha[None, :] + p
        max_score = new_max
        if IS_FP8:
            p = p * (token_scale * P_GAIN)[:, None]
        p_smem.store(p.to(latent_dtype))
        fence_async_shared()
        gl.thread_barrier()
        acc = acc * alpha[None, :]
        acc = warpgroup_mma(latent.permute((1, 0)), p_smem, acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc,))
    async_copy.wait_group(0)

    # A row that saw no token has denominator 0: output 0 and lse -inf (log2(0)).
    denominator = gl.sum(denominators, axis=0)
    has_tokens = denominator > 0.0
    if IS_FP8:
        out = acc / (gl.where(has_tokens, denominator, 1.0) * P_GAIN)[None, :]
    else:
        out = acc / gl.where(has_tokens, denominator, 1.0)[None, :]
    out_rows = batch64 * n_rows + rows
    row_mask = rows < n_rows
    cols = gl.arange(0, LATENT_DIM, token_layout)
    if SINGLE_SPLIT:
        gl.store(
            out_ptr + (out_rows * LATENT_DIM)[None, :] + cols[:, None],
            out.to(out_ptr.dtype.element_ty),
            mask=row_mask[None, :],
        )
    else:
        partial_rows = out_rows * num_splits + split
        lse = gl.where(
            has_tokens, max_score + gl.log2(gl.where(has_tokens, denominator, 1.0)), -float("inf")
        )
        gl.store(partial_lse_ptr + partial_rows, lse, mask=row_mask)
        gl.store(
            partial_out_ptr + (partial_rows * LATENT_DIM)[None, :] + cols[:, None],
            out,
            mask=row_mask[None, :],
        )
