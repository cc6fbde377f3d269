"""The split kernels of titan_mla::mla_decode for Hopper (sm_90), in Gluon.

Inputs as ``_mla_decode_split_kernel`` in mla_decode.py, whose combine kernel merges the partial
outputs, for pages of a multiple of 64 tokens:

- ``mla_decode_split_sm90_kernel``, the memory-bound case: token-major wgmma over a latent tile
  staged once in shared memory, at most 16 query rows per program, a bf16/fp16 cache or an fp8
  cache with one scale per token (described below), on the Triton kernel's grid (head groups,
  sequences, splits).
- ``mla_decode_persistent_sm90_kernel``, the same tiles (one shared tile body, ``_attend_tile``)
  for batches of many sequences: all of a sequence's query rows in one program, a
  one-dimensional grid of at most one program per SM, each attending to an equal run of the
  batch's tiles across sequence boundaries (FlashMLA's balanced schedule: no program waits on a
  longer sequence, and no program starts or ends per split).
- ``mla_decode_split_sm90_wide_kernel``, the compute-bound case: 64 query rows per program (128
  heads) as wgmma's M, two warpgroups, the same caches, on the Triton kernel's grid (head groups,
  sequences, splits) (see its docstring).

Why a token-major kernel: with 16 query rows the Triton kernel's dots are mma.sync chains that
re-read q and every tile from shared memory per warp, and an 8-bit tile cannot be read transposed
from shared memory (the value product gathers it byte by byte). Here the tokens are the M dimension
of both products (wgmma needs M >= 64; 16 heads are its N):

    scores^T (tokens, rows)  = latent_tile (tokens, 512) @ q_latent^T + k_pe_tile @ q_pe^T
    out^T    (512, rows)    += latent_tile^T (512, tokens) @ p^T (tokens, rows)

Both products read the same shared-memory tile, the second through wgmma's transposed-operand
mode (16-bit types only). An fp8 tile is therefore converted once into a staging buffer, to fp16
(exact for e4m3, and one conversion per two values where bf16 needs three): the latent products
run in fp16 with q scaled by a power of 2 into fp16's range; each token's scale multiplies its
latent score and its softmax weight; the rope product stays in q's dtype. The persistent kernel's
key product reads the fp8 tile itself instead, against q as an e4m3 pair (q rounded, and what
rounding left: about bf16's precision) side by side as one fp8 wgmma's N, half the shared-memory
bytes of the fp16 tile (3-6% faster from 32 sequences on); in the grid kernel it measured no
faster than the fp16 product, which keeps q's 11 bits there. Loads are cp.async
copies one tile ahead; fp8 tiles are converted into two staging buffers, the next tile while this
one's value product runs on the tensor cores. The token strides are constexprs (one cache layout per
engine), so the copies' addresses are constant offsets from one base. The softmax runs down the
columns (a cross-warp maximum per tile); the denominators stay per thread until the end.
"""

from __future__ import annotations

from typing import NamedTuple

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
# The output accumulator (512 x rows fp32) takes rows x 4 registers per thread: 32 rows spill.
MAX_ROWS = 16
# mla_decode_persistent_sm90_kernel takes batches from PERSISTENT_MIN_BATCH sequences (on H100
# it ran at 0.96-0.98x of the grid kernel at 16 variable-length sequences, 1.06-1.13x at 32) up
# to MAX_BATCH (its schedule holds every sequence length in one vector per warp).
PERSISTENT_MIN_BATCH = 32
MAX_BATCH = 1024
# mla_decode_split_sm90_wide_kernel: 64 rows per program, two warpgroups.
WIDE_ROWS = 64
WIDE_NUM_WARPS = 8
# fp8 tiles are converted to fp16 through registers in this layout (16 bytes of a row per thread,
# a warp down 32 rows): no shared-memory bank conflicts reading the fp8 tile or writing the fp16
# one (gl.bank_conflicts: 0 and 0; [8, 4] threads per warp read with 1, and the token-major fp8
# kernel ran 1.03-1.07x faster without it on H100).
CONVERT_LAYOUT = gl.constexpr(gl.BlockedLayout([1, 16], [32, 1], [2, 2], [1, 0]))


class PagedCache(NamedTuple):
    """The paged cache as the kernels read it, built by each kernel from its arguments: the
    latent and rope-key pools, the fp8 scales (a placeholder without fp8), and their page and
    token strides (the latent and rope-key token strides are constexprs; Triton makes any
    stride of 1 one too). Passed whole to the tile helpers, which are inlined: the same PTX as
    passing each value."""

    latent_ptr: gl.tensor
    k_pe_ptr: gl.tensor
    scale_ptr: gl.tensor
    latent_stride_page: gl.tensor
    latent_stride_token: gl.constexpr
    k_pe_stride_page: gl.tensor
    k_pe_stride_token: gl.constexpr
    scale_stride_page: gl.tensor
    scale_stride_token: gl.tensor


class TileBuffers(NamedTuple):
    """The token-major kernels' shared memory (see _token_major_buffers)."""

    latent_ring: gl.shared_memory_descriptor
    k_pe: gl.shared_memory_descriptor
    staged: gl.shared_memory_descriptor
    p: gl.shared_memory_descriptor
    q_latent: gl.shared_memory_descriptor
    q_pe: gl.shared_memory_descriptor
    row_max: gl.shared_memory_descriptor


@gluon.constexpr_function
def _threads_per_row(width: int, element_bits: int) -> int:
    """Threads of a warp along a row of ``width`` values copied 16 bytes at a time."""
    return min(32, width * element_bits // 128)


@gluon.jit
def _copy_rows(
    destination,
    source_ptr,
    tile_begin,
    split_end,
    page,
    stride_page,
    stride_token: gl.constexpr,
    PAGE_SIZE: gl.constexpr,
    WIDTH: gl.constexpr,
    BLOCK_N: gl.constexpr,
):
    """cp.async copies (not committed) of the rows of the tokens [tile_begin, tile_begin +
    BLOCK_N), one page's, into ``destination`` (BLOCK_N, WIDTH); rows past split_end are
    zero-filled, never read."""
    bits: gl.constexpr = source_ptr.dtype.element_ty.primitive_bitwidth
    threads: gl.constexpr = _threads_per_row(WIDTH, bits)
    layout: gl.constexpr = gl.BlockedLayout(
        [1, 128 // bits], [32 // threads, threads], [gl.num_warps(), 1], [1, 0]
    )
    tokens = gl.arange(0, BLOCK_N, gl.SliceLayout(1, layout))
    cols = gl.arange(0, WIDTH, gl.SliceLayout(0, layout))
    rows = page.to(gl.int64) * stride_page + (tile_begin % PAGE_SIZE + tokens) * stride_token
    async_copy.async_copy_global_to_shared(
        destination,
        source_ptr + rows[:, None] + cols[None, :],
        mask=(tile_begin + tokens < split_end)[:, None],
    )


@gluon.jit
def _convert_rows(source, destination, layout: gl.constexpr, ROWS: gl.constexpr):
    """Converts the fp8 tile ``source`` into ``destination`` (fp16) through registers in
    ``layout``, ROWS rows at a time (fewer rows: fewer registers held at once)."""
    for chunk in gl.static_range(source.shape[0] // ROWS):
        destination.slice(chunk * ROWS, ROWS).store(
            source.slice(chunk * ROWS, ROWS).load(layout).to(destination.dtype)
        )


@gluon.jit
def _stage_next_tile(
    copy_begin,
    split_end,
    copy_page,
    copy_stage,
    convert_stage,
    latent_ring,
    staged,
    cache,
    PAGE_SIZE: gl.constexpr,
    LATENT_DIM: gl.constexpr,
    BLOCK_N: gl.constexpr,
    convert_layout: gl.constexpr,
):
    """fp8: once the older of the two copies in flight (a tile's latent) has landed, start the
    latent copy of the tile at copy_begin into ring stage copy_stage, then convert ring stage
    convert_stage into staging buffer convert_stage."""
    async_copy.wait_group(1)
    gl.thread_barrier()
    _copy_rows(
        latent_ring.index(copy_stage),
        cache.latent_ptr,
        copy_begin,
        split_end,
        copy_page,
        cache.latent_stride_page,
        cache.latent_stride_token,
        PAGE_SIZE,
        LATENT_DIM,
        BLOCK_N,
    )
    async_copy.commit_group()
    _convert_rows(
        latent_ring.index(convert_stage), staged.index(convert_stage), convert_layout, BLOCK_N
    )


@gluon.jit
def _copy_tile(
    latent_destination,
    k_pe_destination,
    tile_begin,
    split_end,
    page,
    cache,
    PAGE_SIZE: gl.constexpr,
    LATENT_DIM: gl.constexpr,
    ROPE_DIM: gl.constexpr,
    BLOCK_N: gl.constexpr,
):
    """The latent and rope-key copies of one tile as one commit group (see _copy_rows)."""
    _copy_rows(
        latent_destination,
        cache.latent_ptr,
        tile_begin,
        split_end,
        page,
        cache.latent_stride_page,
        cache.latent_stride_token,
        PAGE_SIZE,
        LATENT_DIM,
        BLOCK_N,
    )
    _copy_rows(
        k_pe_destination,
        cache.k_pe_ptr,
        tile_begin,
        split_end,
        page,
        cache.k_pe_stride_page,
        cache.k_pe_stride_token,
        PAGE_SIZE,
        ROPE_DIM,
        BLOCK_N,
    )
    async_copy.commit_group()


@gluon.jit
def _split_range(seq_len, split, num_splits, BLOCK_N: gl.constexpr):
    """The tokens [begin, end) of a split (whole tiles of its sequence's share) and its tiles."""
    tokens_per_split = gl.cdiv(gl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    split_begin = split * tokens_per_split
    split_end = gl.minimum(split_begin + tokens_per_split, seq_len)
    return split_begin, split_end, gl.maximum(gl.cdiv(split_end - split_begin, BLOCK_N), 0)


@gluon.jit
def _load_q_rows(
    q_ptr,
    batch64,
    stride_batch,
    stride_seq,
    stride_head,
    q_rows,
    n_heads,
    n_rows,
    WIDTH: gl.constexpr,
    layout: gl.constexpr,
):
    """The query rows ``q_rows`` (query x head, in SliceLayout(1, layout)) of one sequence, as
    (rows, WIDTH) in ``layout``; zeros past n_rows."""
    row_offsets = (q_rows // n_heads) * stride_seq + (q_rows % n_heads) * stride_head
    return gl.load(
        q_ptr
        + batch64 * stride_batch
        + row_offsets[:, None]
        + gl.arange(0, WIDTH, gl.SliceLayout(0, layout))[None, :],
        mask=(q_rows < n_rows)[:, None],
        other=0.0,
    )


@gluon.jit
def _q_scaled_by_power_of_2(q_latent, row_max_smem, TOP_EXPONENT: gl.constexpr):
    """q_latent (fp32) times a power of 2 (exact) that puts its largest value in
    [2^TOP_EXPONENT, 2^(TOP_EXPONENT + 1)), and the factor that takes the scores back. The
    maximum goes through ``row_max_smem`` (one value per row): no reduction scratch of its own,
    which a noinline function would place over its caller's buffers (Triton 3.6)."""
    # Each row lies within one warp: its maximum takes shuffles only.
    row_max_smem.store(gl.max(gl.abs(q_latent.to(gl.float32)), axis=1))
    gl.thread_barrier()
    rows: gl.constexpr = row_max_smem.shape[0]
    every_row: gl.constexpr = gl.BlockedLayout([max(1, rows // 32)], [32], [gl.num_warps()], [0])
    q_abs_max = gl.max(row_max_smem.load(every_row), axis=0)
    exponent = gl.where(q_abs_max > 0.0, gl.floor(gl.log2(q_abs_max)) - TOP_EXPONENT, 0.0)
    exponent = gl.minimum(gl.maximum(exponent, -100.0), 100.0).to(gl.int32)
    q_down = ((127 - exponent) << 23).to(gl.float32, bitcast=True)
    q_up = ((127 + exponent) << 23).to(gl.float32, bitcast=True)
    return q_latent.to(gl.float32) * q_down, q_up


@gluon.jit
def _q_rows_to_shared(
    q_latent_smem,
    q_pe_smem,
    row_max_smem,
    q_latent_ptr,
    q_pe_ptr,
    batch64,
    q_latent_stride_batch,
    q_latent_stride_seq,
    q_latent_stride_head,
    q_pe_stride_batch,
    q_pe_stride_seq,
    q_pe_stride_head,
    head_group,
    n_heads,
    n_rows,
    BLOCK_H: gl.constexpr,
    LATENT_DIM: gl.constexpr,
    ROPE_DIM: gl.constexpr,
    IS_FP8: gl.constexpr,
    FP8_KEY_PRODUCT: gl.constexpr,
):
    """A program's q rows of sequence batch64 into shared memory, (BLOCK_H, width) for wgmma:
    the latent part and the rope part; returns the factor that takes the latent scores back (1
    without fp8). For an fp8 cache the latent part is scaled by a power of 2 (see
    _q_scaled_by_power_of_2) into fp16 (largest value in [2^12, 2^13): no overflow, and rows
    2^26 times smaller stay normal), or with FP8_KEY_PRODUCT (the key product on the fp8 tile
    itself) into an e4m3 pair: rows [0, BLOCK_H) the rounded q, rows [BLOCK_H, 2 BLOCK_H) what
    rounding left (the pair carries about 8 bits, as bf16 does)."""
    # A warp's load reads whole rows (each row within one warp: _q_scaled_by_power_of_2).
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [gl.num_warps(), 1], [1, 0])
    q_rows = head_group * BLOCK_H + gl.arange(0, BLOCK_H, gl.SliceLayout(1, layout))
    q_latent = _load_q_rows(
        q_latent_ptr,
        batch64,
        q_latent_stride_batch,
        q_latent_stride_seq,
        q_latent_stride_head,
        q_rows,
        n_heads,
        n_rows,
        LATENT_DIM,
        layout,
    )
    if FP8_KEY_PRODUCT:
        # Largest value in [2^7, 2^8): below e4m3's 448 after rounding.
        q_latent, q_up = _q_scaled_by_power_of_2(q_latent, row_max_smem, 7)
        q_rounded = q_latent.to(q_latent_smem.dtype)
        q_latent_smem.slice(0, BLOCK_H).store(q_rounded)
        q_latent_smem.slice(BLOCK_H, BLOCK_H).store(
            (q_latent - q_rounded.to(gl.float32)).to(q_latent_smem.dtype)
        )
    elif IS_FP8:
        q_latent, q_up = _q_scaled_by_power_of_2(q_latent, row_max_smem, 12)
        q_latent_smem.store(q_latent.to(q_latent_smem.dtype))
    else:
        q_up = 1.0
        q_latent_smem.store(q_latent)
    q_pe_smem.store(
        _load_q_rows(
            q_pe_ptr,
            batch64,
            q_pe_stride_batch,
            q_pe_stride_seq,
            q_pe_stride_head,
            q_rows,
            n_heads,
            n_rows,
            ROPE_DIM,
            layout,
        )
    )
    return q_up


# Not inlined: the token-major kernel reloads q once per sequence inside its loop, and an inlined
# reload's addresses, hoisted out of the loop, make the fp8 kernel spill in every tile. A wrapper:
# gluon.jit(_q_rows_to_shared.fn, noinline=True) was inlined all the same (Triton 3.6, PTX).
@gluon.jit(noinline=True)
def _reload_q_rows(
    q_latent_smem,
    q_pe_smem,
    row_max_smem,
    q_latent_ptr,
    q_pe_ptr,
    batch64,
    q_latent_stride_batch,
    q_latent_stride_seq,
    q_latent_stride_head,
    q_pe_stride_batch,
    q_pe_stride_seq,
    q_pe_stride_head,
    head_group,
    n_heads,
    n_rows,
    BLOCK_H: gl.constexpr,
    LATENT_DIM: gl.constexpr,
    ROPE_DIM: gl.constexpr,
    IS_FP8: gl.constexpr,
    FP8_KEY_PRODUCT: gl.constexpr,
):
    return _q_rows_to_shared(
        q_latent_smem,
        q_pe_smem,
        row_max_smem,
        q_latent_ptr,
        q_pe_ptr,
        batch64,
        q_latent_stride_batch,
        q_latent_stride_seq,
        q_latent_stride_head,
        q_pe_stride_batch,
        q_pe_stride_seq,
        q_pe_stride_head,
        head_group,
        n_heads,
        n_rows,
        BLOCK_H,
        LATENT_DIM,
        ROPE_DIM,
        IS_FP8,
        FP8_KEY_PRODUCT,
    )


@gluon.jit
def _q_shared_memory(
    q_latent_dtype: gl.constexpr,
    dot_dtype: gl.constexpr,
    BLOCK_H: gl.constexpr,
    LATENT_DIM: gl.constexpr,
    ROPE_DIM: gl.constexpr,
    FP8_KEY_PRODUCT: gl.constexpr,
):
    """Shared memory for a program's q rows (the latent part in q_latent_dtype, twice the rows
    for FP8_KEY_PRODUCT's e4m3 pair; the rope part in q's dtype), in wgmma's layout, and for
    their maxima (see _q_rows_to_shared)."""
    latent_rows: gl.constexpr = 2 * BLOCK_H if FP8_KEY_PRODUCT else BLOCK_H
    q_latent_smem = gl.allocate_shared_memory(
        q_latent_dtype,
        [latent_rows, LATENT_DIM],
        gl.NVMMASharedLayout.get_default_for([latent_rows, LATENT_DIM], q_latent_dtype),
    )
    q_pe_smem = gl.allocate_shared_memory(
        dot_dtype,
        [BLOCK_H, ROPE_DIM],
        gl.NVMMASharedLayout.get_default_for([BLOCK_H, ROPE_DIM], dot_dtype),
    )
    row_max_smem = gl.allocate_shared_memory(
        gl.float32, [BLOCK_H], gl.SwizzledSharedLayout(1, 1, 1, [0])
    )
    return q_latent_smem, q_pe_smem, row_max_smem


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
    page,
    cache,
    PAGE_SIZE: gl.constexpr,
    BLOCK_N: gl.constexpr,
    layout: gl.constexpr,
):
    """The per-token scales of the tile at tile_begin, on ``page`` (0 past split_end), in
    ``layout``."""
    tokens = tile_begin + gl.arange(0, BLOCK_N, layout)
    return gl.load(
        cache.scale_ptr
        + page.to(gl.int64) * cache.scale_stride_page
        + (tokens % PAGE_SIZE) * cache.scale_stride_token,
        mask=tokens < split_end,
        other=0.0,
    )


@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def _schedule_start(
    seq_lens_ptr,
    partial_index_ptr,
    num_seqs,
    program,
    num_programs,
    BLOCK_N: gl.constexpr,
    BLOCK_B: gl.constexpr,
):
    """A program's share of the batch: the tiles of all sequences in (sequence, token) order,
    cut into num_programs runs of equal length (the last ones shorter). Returns the number of
    tiles of this program's run and the position of its first one (the sequence, the tile in
    it, the sequence's length), the run's first tile and the runs' length. Program 0 also
    writes the partial index entries (first slot, count) = (0, 0) of the sequences without
    tokens."""
    # Every warp holds the whole vector: the sums stay within a warp (no shared memory).
    layout: gl.constexpr = gl.BlockedLayout([BLOCK_B // 32], [32], [gl.num_warps()], [0])
    seqs = gl.arange(0, BLOCK_B, layout)
    lens = gl.load(seq_lens_ptr + seqs, mask=seqs < num_seqs, other=0)
    tiles = gl.cdiv(lens, BLOCK_N)
    ends = gl.associative_scan(tiles, 0, _add)
    total = gl.sum(tiles, axis=0)
    per_program = gl.cdiv(total, num_programs)
    first_tile = program * per_program
    n_work = gl.maximum(gl.minimum(per_program, total - first_tile), 0)
    # The first sequence that ends past first_tile (sequences without tokens end where they
    # begin: never chosen, unless the run is empty).
    seq = gl.sum((ends <= first_tile).to(gl.int32), axis=0)
    seq_begin = gl.sum(gl.where(seqs == seq, ends - tiles, 0), axis=0)
    seq_len = gl.sum(gl.where(seqs == seq, lens, 0), axis=0)
    if program == 0:
        # Sequences without tokens have no partials (the others' entries: see the kernel).
        empty = (seqs < num_seqs) & (tiles == 0)
        gl.store(partial_index_ptr + 2 * seqs, 0, mask=empty)
        gl.store(partial_index_ptr + 2 * seqs + 1, 0, mask=empty)
    return n_work, seq, first_tile - seq_begin, seq_len, first_tile, per_program


@gluon.jit
def _next_sequence(seq, seq_lens_ptr, num_seqs):
    """The first sequence after ``seq`` with tokens, and its length (past the batch: length 0)."""
    seq += 1
    seq_len = gl.load(seq_lens_ptr + seq, mask=seq < num_seqs, other=0)
    while (seq_len == 0) & (seq < num_seqs):
        seq += 1
        seq_len = gl.load(seq_lens_ptr + seq, mask=seq < num_seqs, other=0)
    return seq, seq_len


@gluon.jit
def _next_tile(seq, tile, seq_len, seq_lens_ptr, num_seqs, BLOCK_N: gl.constexpr):
    """The tile after (seq, tile) in schedule order: the sequence's next one, else the first of
    the next sequence with tokens."""
    tile += 1
    if tile * BLOCK_N >= seq_len:
        tile = 0
        seq, seq_len = _next_sequence(seq, seq_lens_ptr, num_seqs)
    return seq, tile, seq_len


@gluon.constexpr_function
def _latent_dtype(dot_dtype, is_fp8):
    """The dtype of the latent products: q's, or for an fp8 cache fp16 (e4m3 -> fp16 is one
    conversion per two values; -> bf16 goes through fp16 and then one more per value)."""
    return gl.float16 if is_fp8 else dot_dtype


@gluon.constexpr_function
def _token_major_mma(block_h, k_width=16):
    """The token-major products' accumulator layout: tokens (or latent columns) down the four
    warps, the block_h query rows as wgmma's N; k_width: wgmma's K (32 for fp8 operands)."""
    return gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, block_h, k_width]
    )


@gluon.jit
def _token_major_buffers(
    cache_dtype: gl.constexpr,
    dot_dtype: gl.constexpr,
    BLOCK_H: gl.constexpr,
    BLOCK_N: gl.constexpr,
    LATENT_DIM: gl.constexpr,
    ROPE_DIM: gl.constexpr,
    IS_FP8: gl.constexpr,
    FP8_KEY_PRODUCT: gl.constexpr,
):
    """The token-major kernels' shared memory. Two latent stages: the next tile's copy flies
    while this one is used. bf16: the value product reads the stage, so a tile's products finish
    within its iteration. fp8: tiles are converted into two staging buffers (``staged``; without
    fp8 the latent stages, never read as such), the next tile while this one's value product
    runs; the rope keys then have one buffer, copied once the key products are done. Then the
    softmax weights and q."""
    latent_dtype: gl.constexpr = _latent_dtype(dot_dtype, IS_FP8)
    latent_ring = gl.allocate_shared_memory(
        cache_dtype,
        [2, BLOCK_N, LATENT_DIM],
        gl.NVMMASharedLayout.get_default_for([BLOCK_N, LATENT_DIM], cache_dtype),
    )
    k_pe_buffers = gl.allocate_shared_memory(
        dot_dtype,
        [1 if IS_FP8 else 2, BLOCK_N, ROPE_DIM],
        gl.NVMMASharedLayout.get_default_for([BLOCK_N, ROPE_DIM], dot_dtype),
    )
    if IS_FP8:
        staged = gl.allocate_shared_memory(
            latent_dtype,
            [2, BLOCK_N, LATENT_DIM],
            gl.NVMMASharedLayout.get_default_for([BLOCK_N, LATENT_DIM], latent_dtype),
        )
    else:
        staged = latent_ring
    p_smem = gl.allocate_shared_memory(
        latent_dtype,
        [BLOCK_N, BLOCK_H],
        gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_H], latent_dtype),
    )
    q_latent_smem, q_pe_smem, row_max_smem = _q_shared_memory(
        cache_dtype if FP8_KEY_PRODUCT else latent_dtype,
        dot_dtype,
        BLOCK_H,
        LATENT_DIM,
        ROPE_DIM,
        FP8_KEY_PRODUCT,
    )
    return TileBuffers(
        latent_ring, k_pe_buffers, staged, p_smem, q_latent_smem, q_pe_smem, row_max_smem
    )


@gluon.jit
def _copy_first_tile(
    buffers,
    tile_begin,
    limit,
    page,
    cache,
    PAGE_SIZE: gl.constexpr,
    LATENT_DIM: gl.constexpr,
    ROPE_DIM: gl.constexpr,
    BLOCK_N: gl.constexpr,
    IS_FP8: gl.constexpr,
):
    """A program's first tile into stage 0 (fp8: the latent and the rope keys as two commit
    groups, in the order the loop waits for them)."""
    _copy_rows(
        buffers.latent_ring.index(0),
        cache.latent_ptr,
        tile_begin,
        limit,
        page,
        cache.latent_stride_page,
        cache.latent_stride_token,
        PAGE_SIZE,
        LATENT_DIM,
        BLOCK_N,
    )
    if IS_FP8:
        async_copy.commit_group()
    _copy_rows(
        buffers.k_pe.index(0),
        cache.k_pe_ptr,
        tile_begin,
        limit,
        page,
        cache.k_pe_stride_page,
        cache.k_pe_stride_token,
        PAGE_SIZE,
        ROPE_DIM,
        BLOCK_N,
    )
    async_copy.commit_group()


@gluon.jit
def _stage_first_tile(
    first_begin,
    first_limit,
    first_page,
    next_begin,
    next_limit,
    next_page,
    buffers,
    cache,
    PAGE_SIZE: gl.constexpr,
    LATENT_DIM: gl.constexpr,
    BLOCK_H: gl.constexpr,
    BLOCK_N: gl.constexpr,
    IS_FP8: gl.constexpr,
):
    """Before the tile loop: fp8 scales come one tile ahead, into registers (returned: the
    first tile's; zeros without fp8); the first tile is converted before the loop, tile i + 1
    during tile i's value product, and the latent of tile i + 2 is copied then."""
    token_layout: gl.constexpr = gl.SliceLayout(1, _token_major_mma(BLOCK_H))
    if IS_FP8:
        first_scales = _tile_scales(
            first_begin,
            first_limit,
            first_page,
            cache,
            PAGE_SIZE,
            BLOCK_N,
            token_layout,
        )
        _stage_next_tile(
            next_begin,
            next_limit,
            next_page,
            1,
            0,
            buffers.latent_ring,
            buffers.staged,
            cache,
            PAGE_SIZE,
            LATENT_DIM,
            BLOCK_N,
            CONVERT_LAYOUT,
        )
    else:
        first_scales = gl.zeros([BLOCK_N], gl.float32, token_layout)
    return first_scales


@gluon.jit
def _attend_tile(
    stage,
    tile_begin,
    seq_len,
    next_begin,
    next_limit,
    next_page,
    after_begin,
    after_limit,
    after_page,
    max_score,
    denominators,
    acc,
    next_scales,
    q_up,
    rows,
    q_len,
    n_heads,
    softmax_scale_log2,
    buffers,
    cache,
    PAGE_SIZE: gl.constexpr,
    LATENT_DIM: gl.constexpr,
    ROPE_DIM: gl.constexpr,
    BLOCK_H: gl.constexpr,
    BLOCK_N: gl.constexpr,
    IS_FP8: gl.constexpr,
    FP8_KEY_PRODUCT: gl.constexpr,
):
    """One tile of a token-major kernel's loop: the tile at tile_begin of a sequence of seq_len
    tokens, in ``stage``; the next tile's copy (next_*: begin, limit past which rows are masked
    off, page id) goes out, and for fp8 the tile after's latent copy (after_*). Returns the
    softmax state with the value product still in flight (the caller waits for it, its own
    bookkeeping in the shadow of the tensor cores) and the next tile's fp8 scales."""
    mma: gl.constexpr = _token_major_mma(BLOCK_H)
    token_layout: gl.constexpr = gl.SliceLayout(1, mma)
    # Made here, not kept across iterations: registers are short.
    no_scores = gl.zeros([BLOCK_N, BLOCK_H], gl.float32, mma)
    if IS_FP8:
        # The tile is staged; its rope keys have landed (the next latent copy may still fly).
        async_copy.wait_group(1)
        fence_async_shared()
        gl.thread_barrier()
        latent = buffers.staged.index(stage)
        k_pe_tile = buffers.k_pe.index(0)
        token_scale = next_scales
        next_scales = _tile_scales(
            next_begin,
            next_limit,
            next_page,
            cache,
            PAGE_SIZE,
            BLOCK_N,
            token_layout,
        )
    else:
        # The tile's copies are done and every warp is past the previous tile's reads of the
        # stage the next copy overwrites.
        async_copy.wait_group(0)
        fence_async_shared()
        gl.thread_barrier()
        _copy_tile(
            buffers.latent_ring.index(1 - stage),
            buffers.k_pe.index(1 - stage),
            next_begin,
            next_limit,
            next_page,
            cache,
            PAGE_SIZE,
            LATENT_DIM,
            ROPE_DIM,
            BLOCK_N,
        )
        latent = buffers.latent_ring.index(stage)
        k_pe_tile = buffers.k_pe.index(stage)
    if IS_FP8:
        if FP8_KEY_PRODUCT:
            # The key product on the fp8 tile itself (still in its ring stage: the tile after
            # the next is copied there once the value product is issued) against q's e4m3 pair,
            # the two halves of one wgmma's N (see _q_rows_to_shared), added below.
            pair_mma: gl.constexpr = _token_major_mma(2 * BLOCK_H, 32)
            scores = warpgroup_mma(
                buffers.latent_ring.index(stage),
                buffers.q_latent.permute((1, 0)),
                gl.zeros([BLOCK_N, 2 * BLOCK_H], gl.float32, pair_mma),
                use_acc=False,
                is_async=True,
            )
        else:
            scores = warpgroup_mma(
                latent, buffers.q_latent.permute((1, 0)), no_scores, use_acc=False, is_async=True
            )
        # The token's scale multiplies its latent score only (the rope key is not fp8).
        rope_scores = warpgroup_mma(
            k_pe_tile, buffers.q_pe.permute((1, 0)), no_scores, use_acc=False, is_async=True
        )
        scores, rope_scores = warpgroup_mma_wait(0, deps=(scores, rope_scores))
        if FP8_KEY_PRODUCT:
            # In registers: each thread holds both halves' columns of its rows.
            rounded_scores, remainder_scores = (
                scores.reshape([BLOCK_N, 2, BLOCK_H]).permute((0, 2, 1)).split()
            )
            scores = gl.convert_layout(rounded_scores + remainder_scores, mma)
        # The rope keys' buffer is free: the next tile's copy.
        _copy_rows(
            k_pe_tile,
            cache.k_pe_ptr,
            next_begin,
            next_limit,
            next_page,
            cache.k_pe_stride_page,
            cache.k_pe_stride_token,
            PAGE_SIZE,
            ROPE_DIM,
            BLOCK_N,
        )
        async_copy.commit_group()
        scores = scores * (token_scale * q_up)[:, None] + rope_scores
    else:
        scores = warpgroup_mma(
            latent, buffers.q_latent.permute((1, 0)), no_scores, use_acc=False, is_async=True
        )
        scores = warpgroup_mma(k_pe_tile, buffers.q_pe.permute((1, 0)), scores, is_async=True)
        scores = warpgroup_mma_wait(0, deps=(scores,))

    positions = tile_begin + gl.arange(0, BLOCK_N, token_layout)
    # Causal among the new tokens: query i sees positions <= seq_len - q_len + i (made here,
    # not kept across iterations: registers are short).
    row_limit = seq_len - q_len + rows // n_heads
    visible = (positions[:, None] <= row_limit[None, :]) & (positions < seq_len)[:, None]
    scores = gl.where(visible, scores * softmax_scale_log2, -float("inf"))
    # max_score starts finite: rows that see nothing yet keep alpha = 1 and p = 0.
    new_max = gl.maximum(max_score, gl.max(scores, axis=0))
    alpha = gl.exp2(max_score - new_max)
    p = gl.exp2(scores - new_max[None, :])
    denominators = denominators * alpha[None, :] + p
    if IS_FP8:
        p = p * (token_scale * P_GAIN)[:, None]
    buffers.p.store(p.to(buffers.p.dtype))
    fence_async_shared()
    gl.thread_barrier()
    acc = acc * alpha[None, :]
    acc = warpgroup_mma(latent.permute((1, 0)), buffers.p, acc, is_async=True)
    if IS_FP8:
        # While the value product runs: stage tile i + 1, copy the latent of tile i + 2.
        _stage_next_tile(
            after_begin,
            after_limit,
            after_page,
            stage,
            1 - stage,
            buffers.latent_ring,
            buffers.staged,
            cache,
            PAGE_SIZE,
            LATENT_DIM,
            BLOCK_N,
            CONVERT_LAYOUT,
        )
    return acc, denominators, new_max, next_scales


@gluon.jit
def _store_rows(
    acc,
    denominators,
    max_score,
    rows,
    n_rows,
    out_rows,
    partial_rows,
    out_ptr,
    partial_out_ptr,
    partial_lse_ptr,
    LATENT_DIM: gl.constexpr,
    BLOCK_H: gl.constexpr,
    SINGLE_SPLIT: gl.constexpr,
    IS_FP8: gl.constexpr,
):
    """A program's output for one sequence: the finished rows at out_rows (SINGLE_SPLIT), else
    the partial output and its log2-sum-exp at partial_rows. A row that saw no token has
    denominator 0: output 0 and lse -inf (log2(0))."""
    denominator = gl.sum(denominators, axis=0)
    has_tokens = denominator > 0.0
    safe_denominator = gl.where(has_tokens, denominator, 1.0)
    out = acc / (safe_denominator * P_GAIN)[None, :] if IS_FP8 else acc / safe_denominator[None, :]
    row_mask = rows < n_rows
    cols = gl.arange(0, LATENT_DIM, gl.SliceLayout(1, _token_major_mma(BLOCK_H)))
    if SINGLE_SPLIT:
        gl.store(
            out_ptr + (out_rows * LATENT_DIM)[None, :] + cols[:, None],
            out.to(out_ptr.dtype.element_ty),
            mask=row_mask[None, :],
        )
    else:
        lse = gl.where(has_tokens, max_score + gl.log2(safe_denominator), -float("inf"))
        gl.store(partial_lse_ptr + partial_rows, lse, mask=row_mask)
        gl.store(
            partial_out_ptr + (partial_rows * LATENT_DIM)[None, :] + cols[:, None],
            out,
            mask=row_mask[None, :],
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
):
    """The Triton kernel's grid (head groups, sequences, splits): a program attends to one
    split of one sequence, up to BLOCK_H of its rows."""
    # fp8: the fp16 key product (the e4m3 pair's measured no faster here, see the module
    # docstring).
    FP8_KEY_PRODUCT: gl.constexpr = False
    head_group = gl.program_id(0)
    batch = gl.program_id(1)
    split = gl.program_id(2)
    num_splits = gl.num_programs(2)
    n_rows = q_len * n_heads
    batch64 = batch.to(gl.int64)
    seq_len = gl.load(seq_lens_ptr + batch)
    split_begin, split_end, n_tiles = _split_range(seq_len, split, num_splits, BLOCK_N)
    block_table_row_ptr = block_table_ptr + batch64 * block_table_stride_batch

    buffers = _token_major_buffers(
        latent_cache_ptr.dtype.element_ty,
        q_pe_ptr.dtype.element_ty,
        BLOCK_H,
        BLOCK_N,
        LATENT_DIM,
        ROPE_DIM,
        IS_FP8,
        FP8_KEY_PRODUCT,
    )
    cache = PagedCache(
        latent_cache_ptr,
        k_pe_cache_ptr,
        latent_scale_ptr,
        latent_stride_page,
        latent_stride_token,
        k_pe_stride_page,
        k_pe_stride_token,
        scale_stride_page,
        scale_stride_token,
    )
    # The first tile's copies go out before q is read.
    first_page = _tile_page(split_begin, split_end, block_table_row_ptr, PAGE_SIZE)
    _copy_first_tile(
        buffers,
        split_begin,
        split_end,
        first_page,
        cache,
        PAGE_SIZE,
        LATENT_DIM,
        ROPE_DIM,
        BLOCK_N,
        IS_FP8,
    )
    page = _tile_page(split_begin + BLOCK_N, split_end, block_table_row_ptr, PAGE_SIZE)

    # q rows (query x head) into shared memory: the B operands of the key products.
    q_up = _q_rows_to_shared(
        buffers.q_latent,
        buffers.q_pe,
        buffers.row_max,
        q_latent_ptr,
        q_pe_ptr,
        batch64,
        q_latent_stride_batch,
        q_latent_stride_seq,
        q_latent_stride_head,
        q_pe_stride_batch,
        q_pe_stride_seq,
        q_pe_stride_head,
        head_group,
        n_heads,
        n_rows,
        BLOCK_H,
        LATENT_DIM,
        ROPE_DIM,
        IS_FP8,
        FP8_KEY_PRODUCT,
    )
    fence_async_shared()

    mma: gl.constexpr = _token_major_mma(BLOCK_H)
    rows = head_group * BLOCK_H + gl.arange(0, BLOCK_H, gl.SliceLayout(0, mma))
    max_score = gl.full([BLOCK_H], -1.0e30, gl.float32, gl.SliceLayout(0, mma))
    denominators = gl.zeros([BLOCK_N, BLOCK_H], gl.float32, mma)
    acc = gl.zeros([LATENT_DIM, BLOCK_H], gl.float32, mma)
    next_scales = _stage_first_tile(
        split_begin,
        split_end,
        first_page,
        split_begin + BLOCK_N,
        split_end,
        page,
        buffers,
        cache,
        PAGE_SIZE,
        LATENT_DIM,
        BLOCK_H,
        BLOCK_N,
        IS_FP8,
    )
    # fp8: the page ids are read one tile ahead of the copies.
    if IS_FP8:
        page_after = _tile_page(
            split_begin + 2 * BLOCK_N, split_end, block_table_row_ptr, PAGE_SIZE
        )
    else:
        page_after = page

    for tile in range(n_tiles):
        tile_begin = split_begin + tile * BLOCK_N
        acc, denominators, max_score, next_scales = _attend_tile(
            tile % 2,
            tile_begin,
            seq_len,
            tile_begin + BLOCK_N,
            split_end,
            page,
            tile_begin + 2 * BLOCK_N,
            split_end,
            page_after,
            max_score,
            denominators,
            acc,
            next_scales,
            q_up,
            rows,
            q_len,
            n_heads,
            softmax_scale_log2,
            buffers,
            cache,
            PAGE_SIZE,
            LATENT_DIM,
            ROPE_DIM,
            BLOCK_H,
            BLOCK_N,
            IS_FP8,
            FP8_KEY_PRODUCT,
        )
        # The next copies' page ids, while the value product runs.
        if IS_FP8:
            page = page_after
            page_after = _tile_page(
                tile_begin + 3 * BLOCK_N, split_end, block_table_row_ptr, PAGE_SIZE
            )
        else:
            page = _tile_page(tile_begin + 2 * BLOCK_N, split_end, block_table_row_ptr, PAGE_SIZE)
        acc = warpgroup_mma_wait(0, deps=(acc,))
    async_copy.wait_group(0)

    out_rows = batch64 * n_rows + rows
    _store_rows(
        acc,
        denominators,
        max_score,
        rows,
        n_rows,
        out_rows,
        out_rows * num_splits + split,
        out_ptr,
        partial_out_ptr,
        partial_lse_ptr,
        LATENT_DIM,
        BLOCK_H,
        SINGLE_SPLIT,
        IS_FP8,
    )


@gluon.jit
def mla_decode_persistent_sm90_kernel(
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
    num_seqs,
    partial_index_ptr,
    PAGE_SIZE: gl.constexpr,
    LATENT_DIM: gl.constexpr,
    ROPE_DIM: gl.constexpr,
    IS_FP8: gl.constexpr,
    BLOCK_H: gl.constexpr,
    BLOCK_N: gl.constexpr,
    BLOCK_B: gl.constexpr,
):
    """Persistent: a one-dimensional grid, each program an equal run of the batch's tiles (see
    _schedule_start), across sequence boundaries, so that no program waits on a longer one and
    the copies stream on from one sequence into the next. A program writes one partial output
    per sequence it touches, at slot sequence + program, and the sequences' (first slot, number
    of partials) in partial_index (sequences, 2). All rows of a sequence in one program
    (q_len x heads <= BLOCK_H)."""
    # fp8: the key product on the fp8 tile itself (see the module docstring).
    FP8_KEY_PRODUCT: gl.constexpr = IS_FP8
    program = gl.program_id(0)
    n_rows = q_len * n_heads
    # The tiles this program attends to in turn are positions (sequence, tile, sequence length):
    # tile i (k_, whose sequence the outer loop follows), the next one (a_) and the one after
    # (b_), each with its page id once it is a copy away.
    n_work, k_seq, k_tile, k_len, first_tile, per_program = _schedule_start(
        seq_lens_ptr, partial_index_ptr, num_seqs, program, gl.num_programs(0), BLOCK_N, BLOCK_B
    )
    a_seq, a_tile, a_len = _next_tile(k_seq, k_tile, k_len, seq_lens_ptr, num_seqs, BLOCK_N)
    b_seq, b_tile, b_len = _next_tile(a_seq, a_tile, a_len, seq_lens_ptr, num_seqs, BLOCK_N)
    # Copies of tiles past the run are masked off by a length of 0.
    k_limit = gl.where(n_work > 0, k_len, 0)
    a_limit = gl.where(n_work > 1, a_len, 0)
    k_page = _tile_page(
        k_tile * BLOCK_N,
        k_limit,
        block_table_ptr + k_seq.to(gl.int64) * block_table_stride_batch,
        PAGE_SIZE,
    )

    buffers = _token_major_buffers(
        latent_cache_ptr.dtype.element_ty,
        q_pe_ptr.dtype.element_ty,
        BLOCK_H,
        BLOCK_N,
        LATENT_DIM,
        ROPE_DIM,
        IS_FP8,
        FP8_KEY_PRODUCT,
    )
    cache = PagedCache(
        latent_cache_ptr,
        k_pe_cache_ptr,
        latent_scale_ptr,
        latent_stride_page,
        latent_stride_token,
        k_pe_stride_page,
        k_pe_stride_token,
        scale_stride_page,
        scale_stride_token,
    )
    # The first tile's copies go out before q is read.
    _copy_first_tile(
        buffers,
        k_tile * BLOCK_N,
        k_limit,
        k_page,
        cache,
        PAGE_SIZE,
        LATENT_DIM,
        ROPE_DIM,
        BLOCK_N,
        IS_FP8,
    )

    # q rows (query x head) into shared memory: the B operands of the key products (an empty
    # run reads sequence 0's).
    q_up = _q_rows_to_shared(
        buffers.q_latent,
        buffers.q_pe,
        buffers.row_max,
        q_latent_ptr,
        q_pe_ptr,
        gl.minimum(k_seq, num_seqs - 1).to(gl.int64),
        q_latent_stride_batch,
        q_latent_stride_seq,
        q_latent_stride_head,
        q_pe_stride_batch,
        q_pe_stride_seq,
        q_pe_stride_head,
        0,
        n_heads,
        n_rows,
        BLOCK_H,
        LATENT_DIM,
        ROPE_DIM,
        IS_FP8,
        FP8_KEY_PRODUCT,
    )
    fence_async_shared()
    # The next two tiles' page ids, read a copy ahead.
    a_page = _tile_page(
        a_tile * BLOCK_N,
        a_limit,
        block_table_ptr + a_seq.to(gl.int64) * block_table_stride_batch,
        PAGE_SIZE,
    )
    b_page = _tile_page(
        b_tile * BLOCK_N,
        gl.where(n_work > 2, b_len, 0),
        block_table_ptr + b_seq.to(gl.int64) * block_table_stride_batch,
        PAGE_SIZE,
    )
    mma: gl.constexpr = _token_major_mma(BLOCK_H)
    rows = gl.arange(0, BLOCK_H, gl.SliceLayout(0, mma))
    next_scales = _stage_first_tile(
        k_tile * BLOCK_N,
        k_limit,
        k_page,
        a_tile * BLOCK_N,
        a_limit,
        a_page,
        buffers,
        cache,
        PAGE_SIZE,
        LATENT_DIM,
        BLOCK_H,
        BLOCK_N,
        IS_FP8,
    )

    # One pass per sequence of the run: its tiles, then its partial output. The copies run on
    # across sequences (the a_/b_ positions cross ahead of tile i).
    i = 0
    while i < n_work:
        if i > 0:
            # A new sequence: its q rows (every warp is past the last key product's reads).
            q_up = _reload_q_rows(
                buffers.q_latent,
                buffers.q_pe,
                buffers.row_max,
                q_latent_ptr,
                q_pe_ptr,
                k_seq.to(gl.int64),
                q_latent_stride_batch,
                q_latent_stride_seq,
                q_latent_stride_head,
                q_pe_stride_batch,
                q_pe_stride_seq,
                q_pe_stride_head,
                0,
                n_heads,
                n_rows,
                BLOCK_H,
                LATENT_DIM,
                ROPE_DIM,
                IS_FP8,
                FP8_KEY_PRODUCT,
            )
        run_end = gl.minimum(n_work, i + gl.cdiv(k_len, BLOCK_N) - k_tile)
        if k_tile == 0:
            # The sequence starts in this run: where the combine finds its partials, at slots
            # sequence + program for this program and the ones its tiles reach.
            last_program = (first_tile + i + gl.cdiv(k_len, BLOCK_N) - 1) // per_program
            gl.store(partial_index_ptr + 2 * k_seq, k_seq + program)
            gl.store(partial_index_ptr + 2 * k_seq + 1, last_program - program + 1)
        max_score = gl.full([BLOCK_H], -1.0e30, gl.float32, gl.SliceLayout(0, mma))
        denominators = gl.zeros([BLOCK_N, BLOCK_H], gl.float32, mma)
        acc = gl.zeros([LATENT_DIM, BLOCK_H], gl.float32, mma)
        for tile in range(i, run_end):
            acc, denominators, max_score, next_scales = _attend_tile(
                tile % 2,
                (k_tile + tile - i) * BLOCK_N,
                k_len,
                a_tile * BLOCK_N,
                gl.where(tile + 1 < n_work, a_len, 0),
                a_page,
                b_tile * BLOCK_N,
                gl.where(tile + 2 < n_work, b_len, 0),
                b_page,
                max_score,
                denominators,
                acc,
                next_scales,
                q_up,
                rows,
                q_len,
                n_heads,
                softmax_scale_log2,
                buffers,
                cache,
                PAGE_SIZE,
                LATENT_DIM,
                ROPE_DIM,
                BLOCK_H,
                BLOCK_N,
                IS_FP8,
                FP8_KEY_PRODUCT,
            )
            # One tile on, while the value product runs: the page id of the new b_ tile is read
            # an iteration before its copy.
            a_tile, a_len, a_page = b_tile, b_len, b_page
            b_seq, b_tile, b_len = _next_tile(b_seq, b_tile, b_len, seq_lens_ptr, num_seqs, BLOCK_N)
            b_page = _tile_page(
                b_tile * BLOCK_N,
                gl.where(tile + 3 < n_work, b_len, 0),
                block_table_ptr + b_seq.to(gl.int64) * block_table_stride_batch,
                PAGE_SIZE,
            )
            acc = warpgroup_mma_wait(0, deps=(acc,))

        _store_rows(
            acc,
            denominators,
            max_score,
            rows,
            n_rows,
            None,
            (k_seq + program).to(gl.int64) * n_rows + rows,
            out_ptr,
            partial_out_ptr,
            partial_lse_ptr,
            LATENT_DIM,
            BLOCK_H,
            False,
            IS_FP8,
        )
        i = run_end
        k_seq, k_len = _next_sequence(k_seq, seq_lens_ptr, num_seqs)
        k_tile = 0
    async_copy.wait_group(0)


@gluon.jit
def mla_decode_split_sm90_wide_kernel(
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
):
    """64 query rows per program (128 heads), two warpgroups: the rows are wgmma's M (the
    compute-bound case: a tile's 64 x 64 scores cost 64 x 576 MACs each).

        scores (rows, tokens) = q @ tile^T     each warpgroup: half the tokens
        out (rows, 512)      += p @ tile       each warpgroup: half the latent columns

    p goes through shared memory (each warpgroup needs every token's weight). Two stages of
    tiles, the next one copied while this one is attended to: q (72 KiB) leaves no room for a
    third, which running the next tile's key product during this tile's softmax would need. An
    fp8 tile (one scale per token) is converted into one fp16 staging buffer before its
    products, with the token-major kernel's scaling of q, the scores and the weights."""
    gl.static_assert(BLOCK_H == 64, "the wide kernel takes 64 rows per program")
    dot_dtype: gl.constexpr = q_pe_ptr.dtype.element_ty
    cache_dtype: gl.constexpr = latent_cache_ptr.dtype.element_ty
    latent_dtype: gl.constexpr = _latent_dtype(dot_dtype, IS_FP8)
    score_mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, BLOCK_N // 2, 16]
    )
    out_mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, LATENT_DIM // 2, 16]
    )
    row_layout: gl.constexpr = gl.SliceLayout(1, score_mma)
    token_layout: gl.constexpr = gl.SliceLayout(0, score_mma)
    out_row_layout: gl.constexpr = gl.SliceLayout(1, out_mma)
    convert_layout: gl.constexpr = gl.BlockedLayout([1, 16], [8, 4], [2, 4], [1, 0])

    head_group = gl.program_id(0)
    batch = gl.program_id(1)
    split = gl.program_id(2)
    num_splits = gl.num_programs(2)
    n_rows = q_len * n_heads
    batch64 = batch.to(gl.int64)
    seq_len = gl.load(seq_lens_ptr + batch)
    split_begin, split_end, n_tiles = _split_range(seq_len, split, num_splits, BLOCK_N)
    block_table_row_ptr = block_table_ptr + batch64 * block_table_stride_batch
    cache = PagedCache(
        latent_cache_ptr,
        k_pe_cache_ptr,
        latent_scale_ptr,
        latent_stride_page,
        latent_stride_token,
        k_pe_stride_page,
        k_pe_stride_token,
        scale_stride_page,
        scale_stride_token,
    )

    latent_ring = gl.allocate_shared_memory(
        cache_dtype,
        [2, BLOCK_N, LATENT_DIM],
        gl.NVMMASharedLayout.get_default_for([BLOCK_N, LATENT_DIM], cache_dtype),
    )
    k_pe_ring = gl.allocate_shared_memory(
        dot_dtype,
        [2, BLOCK_N, ROPE_DIM],
        gl.NVMMASharedLayout.get_default_for([BLOCK_N, ROPE_DIM], dot_dtype),
    )
    if IS_FP8:
        staged = gl.allocate_shared_memory(
            latent_dtype,
            [BLOCK_N, LATENT_DIM],
            gl.NVMMASharedLayout.get_default_for([BLOCK_N, LATENT_DIM], latent_dtype),
        )
    p_smem = gl.allocate_shared_memory(
        latent_dtype,
        [BLOCK_H, BLOCK_N],
        gl.NVMMASharedLayout.get_default_for([BLOCK_H, BLOCK_N], latent_dtype),
    )

    # Tile 0 is copied before q is read; tile i + 1 while tile i is attended to.
    page = _tile_page(split_begin, split_end, block_table_row_ptr, PAGE_SIZE)
    _copy_tile(
        latent_ring.index(0),
        k_pe_ring.index(0),
        split_begin,
        split_end,
        page,
        cache,
        PAGE_SIZE,
        LATENT_DIM,
        ROPE_DIM,
        BLOCK_N,
    )
    tile_page = page
    page = _tile_page(split_begin + BLOCK_N, split_end, block_table_row_ptr, PAGE_SIZE)

    # q rows (query x head) into shared memory: the A operands of the key products.
    q_latent_smem, q_pe_smem, row_max_smem = _q_shared_memory(
        latent_dtype, dot_dtype, BLOCK_H, LATENT_DIM, ROPE_DIM, False
    )
    q_up = _q_rows_to_shared(
        q_latent_smem,
        q_pe_smem,
        row_max_smem,
        q_latent_ptr,
        q_pe_ptr,
        batch64,
        q_latent_stride_batch,
        q_latent_stride_seq,
        q_latent_stride_head,
        q_pe_stride_batch,
        q_pe_stride_seq,
        q_pe_stride_head,
        head_group,
        n_heads,
        n_rows,
        BLOCK_H,
        LATENT_DIM,
        ROPE_DIM,
        IS_FP8,
        False,
    )

    rows = head_group * BLOCK_H + gl.arange(0, BLOCK_H, row_layout)
    # Causal among the new tokens: query i sees positions <= seq_len - q_len + i.
    row_limit = seq_len - q_len + rows // n_heads
    max_score = gl.full([BLOCK_H], -1.0e30, gl.float32, row_layout)
    denominators = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, score_mma)
    acc = gl.zeros([BLOCK_H, LATENT_DIM], gl.float32, out_mma)
    for tile in range(n_tiles):
        stage = tile % 2
        tile_begin = split_begin + tile * BLOCK_N
        # This tile has landed, and both warpgroups are past the previous tile's value product:
        # the next tile's copy goes to the other stage.
        async_copy.wait_group(0)
        fence_async_shared()
        gl.thread_barrier()
        _copy_tile(
            latent_ring.index(1 - stage),
            k_pe_ring.index(1 - stage),
            tile_begin + BLOCK_N,
            split_end,
            page,
            cache,
            PAGE_SIZE,
            LATENT_DIM,
            ROPE_DIM,
            BLOCK_N,
        )
        if IS_FP8:
            token_scale = _tile_scales(
                tile_begin,
                split_end,
                tile_page,
                cache,
                PAGE_SIZE,
                BLOCK_N,
                token_layout,
            )
            # 16 rows at a time: the conversion's registers beside the accumulator's 128.
            _convert_rows(latent_ring.index(stage), staged, convert_layout, 16)
            fence_async_shared()
            gl.thread_barrier()
            latent = staged
        else:
            latent = latent_ring.index(stage)
        tile_page = page
        page = _tile_page(tile_begin + 2 * BLOCK_N, split_end, block_table_row_ptr, PAGE_SIZE)
        no_scores = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, score_mma)
        scores = warpgroup_mma(
            q_latent_smem, latent.permute((1, 0)), no_scores, use_acc=False, is_async=True
        )
        k_pe_tile = k_pe_ring.index(stage).permute((1, 0))
        if IS_FP8:
            # The token's scale multiplies its latent score only (the rope key is not fp8).
            rope_scores = warpgroup_mma(
                q_pe_smem, k_pe_tile, no_scores, use_acc=False, is_async=True
            )
            scores, rope_scores = warpgroup_mma_wait(0, deps=(scores, rope_scores))
            scores = scores * (token_scale * q_up)[None, :] + rope_scores
        else:
            scores = warpgroup_mma(q_pe_smem, k_pe_tile, scores, is_async=True)
            scores = warpgroup_mma_wait(0, deps=(scores,))
        positions = tile_begin + gl.arange(0, BLOCK_N, token_layout)
        visible = (positions[None, :] <= row_limit[:, None]) & (positions < split_end)[None, :]
        scores = gl.where(visible, scores * softmax_scale_log2, -float("inf"))
        # max_score starts finite: rows that see nothing yet keep alpha = 1 and p = 0.
        new_max = gl.maximum(max_score, gl.max(scores, axis=1))
        alpha = gl.exp2(max_score - new_max)
        p = gl.exp2(scores - new_max[:, None])
        denominators = denominators * alpha[:, None] + p
        max_score = new_max
        if IS_FP8:
            p = p * (token_scale * P_GAIN)[None, :]
        p_smem.store(p.to(latent_dtype))
        fence_async_shared()
        gl.thread_barrier()
        acc = acc * gl.convert_layout(alpha, out_row_layout)[:, None]
        acc = warpgroup_mma(p_smem, latent, acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc,))
    async_copy.wait_group(0)

    # A row that saw no token has denominator 0: output 0 and lse -inf (log2(0)).
    denominator = gl.sum(denominators, axis=1)
    has_tokens = denominator > 0.0
    safe_denominator = gl.where(has_tokens, denominator, 1.0)
    if IS_FP8:
        out = acc / gl.convert_layout(safe_denominator * P_GAIN, out_row_layout)[:, None]
    else:
        out = acc / gl.convert_layout(safe_denominator, out_row_layout)[:, None]
    rows_of_out = head_group * BLOCK_H + gl.arange(0, BLOCK_H, out_row_layout)
    out_rows = batch64 * n_rows + rows_of_out
    out_row_mask = (rows_of_out < n_rows)[:, None]
    cols = gl.arange(0, LATENT_DIM, gl.SliceLayout(0, out_mma))
    if SINGLE_SPLIT:
        gl.store(
            out_ptr + (out_rows * LATENT_DIM)[:, None] + cols[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=out_row_mask,
        )
    else:
        partial_rows = batch64 * n_rows + rows
        lse = gl.where(has_tokens, max_score + gl.log2(safe_denominator), -float("inf"))
        gl.store(partial_lse_ptr + partial_rows * num_splits + split, lse, mask=rows < n_rows)
        gl.store(
            partial_out_ptr
            + ((out_rows * num_splits + split) * LATENT_DIM)[:, None]
            + cols[None, :],
            out,
            mask=out_row_mask,
        )
