"""titan_mla::mla_decode (absorbed MLA flash-decoding over a paged cache) against float64 attention
over the expanded keys and values.

On CPU the op runs its Triton kernels under TRITON_INTERPRET=1 (small shapes) and the PyTorch
reference otherwise; tests marked by ``requires_cuda`` run the compiled kernels at the 1B model's
shapes, check opcheck on the Triton branch and CUDA-graph capture.
"""

from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass, replace

import pytest
import torch
from expecttest import assert_expected_inline
from helpers import relative_error, requires_cuda, run_without_interpreter

from titan_mla.ops import mla_decode as mla_decode_module
from titan_mla.ops.mla_decode import (
    DecodeConfig,
    dequantize_latent_fp8,
    mla_decode,
    mla_decode_reference,
    mla_decode_triton,
    quantize_latent_fp8,
    runs_triton,
    sm90_gluon_kernel,
)

# Where the raw launcher (mla_decode_triton) runs: the GPU, or the CPU under the interpreter.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Relative error of the up-projected output vs float64 attention over expanded K/V. Measured under
# the interpreter (max over test_matches_float64_attention): fp32 1.4e-7 (exact fp32 dots), bf16
# 3.8e-3 (q_latent, the cache and the softmax weights rounded to bf16).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# An fp8 cache vs the bf16 cache it was quantized from (e4m3 keeps 3 mantissa bits). Measured over
# 12 seeds of the fp8 test's shapes: mean 3.5e-2, max 3.9e-2, per-128-group and per-token alike.
FP8_TOLERANCE = 6e-2


@dataclass
class Dims:
    heads: int = 4
    latent: int = 64
    rope: int = 16
    nope: int = 32
    v: int = 32
    page_size: int = 16


@dataclass
class DecodeCase:
    """A batch of sequences in a paged cache, with the per-head up-projections to check the
    absorbed op against plain attention over expanded keys and values (all float64)."""

    dims: Dims
    w_uk: torch.Tensor  # (heads, nope, latent)
    w_uv: torch.Tensor  # (heads, v, latent)
    latents: list[torch.Tensor]  # per sequence (seq_len, latent)
    k_pes: list[torch.Tensor]  # per sequence (seq_len, rope)
    q_nope: torch.Tensor  # (batch, q_len, heads, nope)
    q_pe: torch.Tensor  # (batch, q_len, heads, rope)
    latent_cache: torch.Tensor  # (pages, page_size, latent), NaN in unused pages
    k_pe_cache: torch.Tensor  # (pages, page_size, rope)
    block_table: torch.Tensor  # int32 (batch, max_pages), garbage past each sequence's pages
    seq_lens: torch.Tensor  # int32 (batch,)
    softmax_scale: float

    @property
    def q_latent(self) -> torch.Tensor:
        """W_UK absorbed into the query: q_latent_h = W_UK_h^T q_nope_h."""
        return torch.einsum("bqhn,hnr->bqhr", self.q_nope, self.w_uk)

    def expected(self) -> torch.Tensor:
        """Non-absorbed attention: K_h = [W_UK_h c ; k_pe], V_h = W_UV_h c, causal among the new
        tokens; (batch, q_len, heads, v) float64."""
        q_len = self.q_nope.shape[1]
        outputs = []
        for b, (latent, k_pe) in enumerate(zip(self.latents, self.k_pes, strict=True)):
            seq_len = latent.shape[0]
            k_nope = torch.einsum("tr,hnr->htn", latent, self.w_uk)
            keys = torch.cat([k_nope, k_pe.expand(self.dims.heads, -1, -1)], dim=-1)
            values = torch.einsum("tr,hvr->htv", latent, self.w_uv)
            queries = torch.cat([self.q_nope[b], self.q_pe[b]], dim=-1)  # (q_len, heads, qk)
            scores = torch.einsum("qhd,htd->qht", queries, keys) * self.softmax_scale
            positions = torch.arange(seq_len)
            query_positions = seq_len - q_len + torch.arange(q_len)
            visible = positions[None, :] <= query_positions[:, None]
            scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
            outputs.append(torch.einsum("qht,htv->qhv", scores.softmax(dim=-1), values))
        return torch.stack(outputs)

    def up_project(self, out_latent: torch.Tensor) -> torch.Tensor:
        """The caller's W_UV after the op: (batch, q_len, heads, v) float64."""
        return torch.einsum("bqhr,hvr->bqhv", out_latent.double(), self.w_uv)


def make_case(
    seed: int,
    seq_lens: list[int],
    q_len: int,
    dims: Dims | None = None,
    dtype: torch.dtype = torch.float32,
) -> DecodeCase:
    """Random weights and cache contents (rounded to ``dtype``, kept in float64), the pages of all
    sequences shuffled in a pool with spare NaN pages, garbage ids in unused table entries."""
    dims = dims or Dims()
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        values = torch.randn(*shape, generator=generator, dtype=torch.float64) * scale
        return values.to(dtype).double()  # exactly representable in dtype

    w_uk = randn(dims.heads, dims.nope, dims.latent, scale=dims.latent**-0.5)
    w_uv = randn(dims.heads, dims.v, dims.latent, scale=dims.latent**-0.5)
    latents = [randn(n, dims.latent) for n in seq_lens]
    k_pes = [randn(n, dims.rope) for n in seq_lens]
    batch = len(seq_lens)
    # Scores of a few units: the softmax is peaked enough for the running max to matter.
    q_nope = randn(batch, q_len, dims.heads, dims.nope, scale=2.0)
    q_pe = randn(batch, q_len, dims.heads, dims.rope, scale=2.0)

    page_size = dims.page_size
    pages_per_seq = [-(-n // page_size) for n in seq_lens]
    max_pages = max(pages_per_seq) + 1  # one spare column of garbage for every sequence
    n_pages = sum(pages_per_seq) + 3
    page_ids = torch.randperm(n_pages, generator=generator)
    latent_cache = torch.full((n_pages, page_size, dims.latent), float("nan"), dtype=dtype)
    k_pe_cache = torch.full((n_pages, page_size, dims.rope), float("nan"), dtype=dtype)
    block_table = torch.randint(-(10**6), 10**6, (batch, max_pages), generator=generator)
    block_table = block_table.to(torch.int32)
    next_page = 0
    for b, n in enumerate(seq_lens):
        for page in range(pages_per_seq[b]):
            page_id = int(page_ids[next_page])
            next_page += 1
            block_table[b, page] = page_id
            tokens = slice(page * page_size, min((page + 1) * page_size, n))
            count = tokens.stop - tokens.start
            latent_cache[page_id, :count] = latents[b][tokens].to(dtype)
            k_pe_cache[page_id, :count] = k_pes[b][tokens].to(dtype)
    return DecodeCase(
        dims=dims,
        w_uk=w_uk,
        w_uv=w_uv,
        latents=latents,
        k_pes=k_pes,
        q_nope=q_nope,
        q_pe=q_pe,
        latent_cache=latent_cache,
        k_pe_cache=k_pe_cache,
        block_table=block_table,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        softmax_scale=(dims.nope + dims.rope) ** -0.5,
    )


def run_op(case: DecodeCase, dtype: torch.dtype, **kwargs) -> torch.Tensor:
    return mla_decode(
        case.q_latent.to(dtype),
        case.q_pe.to(dtype),
        case.latent_cache,
        case.k_pe_cache,
        case.block_table,
        case.seq_lens,
        case.softmax_scale,
        **kwargs,
    )


def fp8_cache(case: DecodeCase, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The case's latent cache quantized to e4m3 (NaN pages stay NaN: e4m3fn has NaN)."""
    return quantize_latent_fp8(case.latent_cache, group_size)


# Lengths 1, page multiples and not, the longest forcing several tiles and splits.
SEQ_LENS = [1, 37, 16, 70]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_len", [1, 2, 3, 4])
def test_matches_float64_attention(dtype, q_len):
    seq_lens = [max(n, q_len) for n in SEQ_LENS]
    case = make_case(seed=q_len, seq_lens=seq_lens, q_len=q_len, dtype=dtype)
    out = run_op(case, dtype, num_splits=2)
    assert out.dtype == dtype and out.shape == (len(seq_lens), q_len, case.dims.heads, 64)
    assert not out.isnan().any()
    assert relative_error(case.up_project(out), case.expected()) <= TOLERANCE[dtype]


@pytest.mark.parametrize(
    ("config", "page_size", "heads", "q_len"),
    [
        # the pipeliner's loop, one table entry per tile, then tiles spanning two pages
        (DecodeConfig(16, 16, 4, 2, prefetch=False), 16, 4, 1),
        (DecodeConfig(16, 32, 4, 2, prefetch=False), 16, 4, 1),
        # register prefetch, tiles spanning two pages (one table entry per token)
        (DecodeConfig(16, 32, 4, 1, prefetch=True), 16, 4, 2),
        # two head groups: 20 heads x 4 queries = 80 rows
        (DecodeConfig(64, 16, 8, 2, prefetch=True), 8, 20, 4),
        (DecodeConfig(32, 16, 8, 2, prefetch=False), 32, 3, 3),
    ],
)
def test_configs(config, page_size, heads, q_len):
    dims = Dims(heads=heads, page_size=page_size)
    case = make_case(seed=5, seq_lens=[70, 9, 33], q_len=q_len, dims=dims)
    q_latent, q_pe = case.q_latent.float(), case.q_pe.float()
    tensors = (q_latent, q_pe, case.latent_cache, case.k_pe_cache, case.block_table, case.seq_lens)
    tensors = [t.to(KERNEL_DEVICE) for t in tensors]
    for num_splits in (1, 3):
        out = mla_decode_triton(
            *tensors, case.softmax_scale, num_splits=num_splits, config=config
        ).cpu()
        assert relative_error(case.up_project(out), case.expected()) <= 1e-5


def test_num_splits_agree(monkeypatch):
    # Chunks of 16 splits in the combine kernel: 40 splits take three.
    monkeypatch.setattr(mla_decode_module, "_COMBINE_MAX_SPLITS", 16)
    case = make_case(seed=6, seq_lens=[70, 2, 45], q_len=2)
    outputs = [run_op(case, torch.float32, num_splits=n) for n in (None, 1, 3, 7, 40)]
    for out in outputs[1:]:
        torch.testing.assert_close(out, outputs[0], rtol=1e-5, atol=1e-6)
    assert relative_error(case.up_project(outputs[0]), case.expected()) <= 1e-5


def test_empty_sequences_give_zeros():
    """Padding entries of a CUDA-graph batch (seq_len 0) and queries that see no token."""
    case = make_case(seed=7, seq_lens=[20, 3], q_len=1)
    case.seq_lens[1] = 0
    for num_splits in (1, 2):
        out = run_op(case, torch.float32, num_splits=num_splits)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        torch.testing.assert_close(
            out[1:],
            mla_decode_reference(
                case.q_latent.float()[1:],
                case.q_pe.float()[1:],
                case.latent_cache,
                case.k_pe_cache,
                case.block_table[1:],
                case.seq_lens[1:],
                case.softmax_scale,
            ),
        )
        assert not out.isnan().any()


def test_combine_reads_the_persistent_index():
    """The combine in the persistent split kernel's layout: partials at (slot, row), each
    sequence's (first slot, count) in partial_index. Slots outside every sequence's range and
    the partials of splits whose rows saw no token (lse -inf) hold NaN: never read. A row that
    no split saw, and a sequence with count 0, give zeros."""
    generator = torch.Generator().manual_seed(3)
    n_rows, latent_dim, n_slots = 2, 32, 9
    index = torch.tensor([[0, 3], [3, 1], [5, 0], [5, 4]], dtype=torch.int32)
    partial_out = torch.full((n_slots, n_rows, latent_dim), float("nan"))
    partial_lse = torch.full((n_slots, n_rows), float("nan"))
    expected = torch.zeros(len(index), n_rows, latent_dim, dtype=torch.float64)
    for seq, (first, count) in enumerate(index.tolist()):
        if not count:
            continue
        values = torch.randn(count, n_rows, latent_dim, generator=generator)
        lse = torch.randn(count, n_rows, generator=generator) * 3
        lse[0, 0], values[0, 0] = -float("inf"), float("nan")
        partial_out[first : first + count], partial_lse[first : first + count] = values, lse
        weights = torch.exp2(lse.double() - lse.max(0).values)  # log2-sum-exps
        merged = (weights[..., None] * values.double().nan_to_num()).sum(0)
        expected[seq] = (merged / weights.sum(0)[:, None]).nan_to_num()
    out = torch.empty(len(index), n_rows, latent_dim, device=KERNEL_DEVICE)
    mla_decode_module._mla_decode_combine_kernel[(len(index) * n_rows, 1)](
        partial_out.to(KERNEL_DEVICE),
        partial_lse.to(KERNEL_DEVICE),
        out,
        index.to(KERNEL_DEVICE),
        n_rows,
        NUM_SPLITS=n_slots,
        LATENT_DIM=latent_dim,
        BLOCK_SPLITS=2,
        BLOCK_D=latent_dim,
        PERSISTENT=True,
    )
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-5, atol=1e-6)


def test_pool_views_and_strides():
    """latent and k_pe as two views of one (pages, page_size, latent + rope + pad) pool, and
    non-contiguous queries: same result as contiguous tensors."""
    case = make_case(seed=8, seq_lens=[50, 17], q_len=2)
    latent_dim, rope_dim = case.dims.latent, case.dims.rope
    pool = torch.full((*case.latent_cache.shape[:2], latent_dim + rope_dim + 8), float("nan"))
    pool[..., :latent_dim] = case.latent_cache
    pool[..., latent_dim : latent_dim + rope_dim] = case.k_pe_cache
    q_latent = case.q_latent.float().transpose(1, 2).contiguous().transpose(1, 2)
    out = mla_decode(
        q_latent,
        case.q_pe.float(),
        pool[..., :latent_dim],
        pool[..., latent_dim : latent_dim + rope_dim],
        case.block_table,
        case.seq_lens,
        case.softmax_scale,
        num_splits=2,
    )
    torch.testing.assert_close(out, run_op(case, torch.float32, num_splits=2))


@pytest.mark.parametrize("group_size", [128, 256])
def test_fp8_cache_close_to_bf16(group_size):
    dims = Dims(latent=256)
    case = make_case(seed=9, seq_lens=[70, 5, 40], q_len=2, dims=dims, dtype=torch.bfloat16)
    latent_fp8, latent_scale = fp8_cache(case, group_size)
    assert latent_scale.shape == (*case.latent_cache.shape[:2], 256 // group_size)
    bf16_out = run_op(case, torch.bfloat16, num_splits=2)
    q_latent, q_pe = case.q_latent.bfloat16(), case.q_pe.bfloat16()
    args = (case.k_pe_cache, case.block_table, case.seq_lens, case.softmax_scale)
    fp8_out = mla_decode(q_latent, q_pe, latent_fp8, *args, latent_scale=latent_scale, num_splits=2)
    assert fp8_out.dtype == torch.bfloat16 and not fp8_out.isnan().any()
    assert relative_error(case.up_project(fp8_out), case.up_project(bf16_out)) <= FP8_TOLERANCE
    # Against the reference on the same fp8 cache: only bf16 rounding apart.
    reference = mla_decode_reference(q_latent, q_pe, latent_fp8, *args, latent_scale)
    assert relative_error(fp8_out, reference) <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("group_size", [64, 128])
def test_fp8_tile_handlings_agree(group_size):
    """The fp8 tile dequantized in registers (register prefetch or the pipeliner's loop) and the
    grouped dots that apply the scales to scores and weights: the same attention."""
    dims = Dims(latent=128)
    case = make_case(seed=10, seq_lens=[70, 21], q_len=1, dims=dims)
    latent_fp8, latent_scale = fp8_cache(case, group_size)
    args = (
        case.q_latent.float(),
        case.q_pe.float(),
        latent_fp8,
        case.k_pe_cache,
        case.block_table,
        case.seq_lens,
        case.softmax_scale,
        latent_scale,
        2,
    )
    on_device = [t.to(KERNEL_DEVICE) if isinstance(t, torch.Tensor) else t for t in args]
    outputs = [
        mla_decode_triton(
            *on_device,
            config=DecodeConfig(16, 16, 4, 1, prefetch=prefetch, fp8_grouped_dots=grouped),
        ).cpu()
        for prefetch, grouped in ((False, False), (True, False), (False, True), (True, True))
    ]
    for out in outputs[1:]:
        torch.testing.assert_close(out, outputs[0])
    reference = mla_decode_reference(*args[:-1])
    assert relative_error(outputs[0], reference) <= 1e-5


def test_quantize_latent_fp8_round_trip():
    torch.manual_seed(11)
    latent = torch.randn(3, 5, 256) * torch.logspace(-3, 2, 256)
    latent[0, 0] = 0.0  # an all-zero token must not divide by zero
    for group_size, groups in ((128, 2), (256, 1), (None, 1)):  # None: one scale per token
        quantized, scales = quantize_latent_fp8(latent, group_size)
        assert quantized.dtype == torch.float8_e4m3fn and scales.dtype == torch.float32
        assert scales.shape == (3, 5, groups)
        restored = dequantize_latent_fp8(quantized, scales, torch.float32)
        assert torch.equal(restored[0, 0], torch.zeros(256))
        # e4m3: 3 mantissa bits, relative step 2^-3 for normal values.
        assert relative_error(restored, latent) <= 2**-4
    with pytest.raises(ValueError, match="multiple"):
        quantize_latent_fp8(latent, 96)


def test_input_checks():
    case = make_case(seed=12, seq_lens=[5], q_len=1)
    q_latent, q_pe = case.q_latent.float(), case.q_pe.float()
    args = (case.latent_cache, case.k_pe_cache, case.block_table, case.seq_lens, 0.1)
    with pytest.raises(ValueError, match="q_len"):
        mla_decode(q_latent.expand(1, 5, -1, -1), q_pe.expand(1, 5, -1, -1), *args)
    with pytest.raises(ValueError, match="needs latent_scale"):
        mla_decode(q_latent, q_pe, case.latent_cache.to(torch.float8_e4m3fn), *args[1:])
    with pytest.raises(ValueError, match="block_table"):
        mla_decode(q_latent, q_pe, *args[:2], case.block_table.long(), *args[3:])
    with pytest.raises(ValueError, match="power of 2"):
        mla_decode(q_latent[..., :48], q_pe, case.latent_cache[..., :48], *args[1:])


def test_default_num_splits():
    splits = mla_decode_module.default_num_splits
    bf16_token = 512 * 2 + 64 * 2
    # 16 heads: programs for 4 per SM of 132, rounded down to whole splits (4.1 -> 4); one program
    # per sequence per split.
    assert splits(128, 16, 4096, 512, bf16_token, 16, 132) == 4
    assert splits(1, 16, 1 << 20, 512, bf16_token, 16, 132) == 528
    # 128 heads: the fp32 partials would cost more than 10% of the cache bytes: no split.
    assert splits(128, 128, 4096, 512, bf16_token, 64, 132) == 1
    # Never below one wave, never below 128 tokens per split.
    assert splits(1, 16, 65536, 512, bf16_token, 16, 132) == 132
    # ... except that 2 splits of 64 programs (97% of the wave) beat 3 (a second wave of 60).
    assert splits(32, 128, 8192, 512, bf16_token, 64, 132) == 2
    assert splits(8, 128, 8192, 512, bf16_token, 64, 132) == 8
    assert splits(1, 16, 300, 512, bf16_token, 16, 132) == 2
    # A target below one program per SM: fewer, longer splits (a quarter wave).
    assert splits(1, 16, 65536, 512, bf16_token, 16, 132, programs_per_sm=0.25) == 33
    # 8 per SM would be 9 splits; the partials' traffic cap (10% of 4096 tokens) allows 7.
    assert splits(128, 16, 4096, 512, bf16_token, 16, 132, programs_per_sm=8.0) == 7


def test_default_config_reads_the_tuned_table(monkeypatch):
    table = {
        ("bf16", 16, False): DecodeConfig(16, 32, 8, 5, prefetch=False),
        ("bf16", 16, True): DecodeConfig(16, 64, 4, 3, prefetch=False, programs_per_sm=0.25),
        ("bf16", 64, False): DecodeConfig(64, 16, 8, 3, prefetch=False),
        ("fp8", 16, False): DecodeConfig(16, 16, 4, 2, prefetch=False, fp8_grouped_dots=True),
    }
    monkeypatch.setattr(mla_decode_module, "TUNED_CONFIGS", table)
    config = mla_decode_module.default_config
    # (batch, n_rows, q dtype, cache kind, SMs): batch x head groups <= SMs / 8 is "few programs".
    assert config(128, 16, torch.bfloat16, "bf16", 132) == table["bf16", 16, False]
    assert config(1, 16, torch.bfloat16, "bf16", 132) == table["bf16", 16, True]
    assert config(128, 128, torch.bfloat16, "bf16", 132) == table["bf16", 64, False]
    assert config(17, 16, torch.bfloat16, "bf16", 132) == table["bf16", 16, False]
    assert config(16, 16, torch.bfloat16, "bf16", 132) == table["bf16", 16, True]
    # 128 sequences x 2 groups of 64 rows: many programs; 1 x 2 is few, without an entry: the
    # nearest block_h first (register budgets depend on it), then the program count.
    assert config(1, 128, torch.bfloat16, "bf16", 132) == table["bf16", 64, False]
    # No fp8 entry for few programs: the fp8 one of the other count, with this call's block_h.
    assert config(1, 32, torch.bfloat16, "fp8", 132) == DecodeConfig(
        32, 16, 4, 2, prefetch=False, fp8_grouped_dots=True
    )
    # Per-token fp8 scales are a kind of their own (see cache_kind); no entry: no fallback.
    assert [mla_decode_module.cache_kind(groups) for groups in (0, 1, 4)] == [
        "bf16",
        "fp8_token",
        "fp8",
    ]
    with pytest.raises(ValueError, match="no entry for a fp8_token cache"):
        config(1, 16, torch.bfloat16, "fp8_token", 132)
    # fp32 (tests): small tiles whatever the table says.
    assert config(1, 16, torch.float32, "bf16", 132).block_n == 16


def test_sm90_gluon_kernel_choice():
    """The Gluon kernel (and warp count) that takes a call on sm_90, by rows per program, page
    size, cache format, sequences and query rows per sequence; None leaves the call to the
    Triton-language kernel."""
    cases = [
        (16, 64, torch.bfloat16, 0, 1, 16),
        (16, 128, torch.float16, 0, 31, 16),
        (16, 64, torch.float8_e4m3fn, 1, 32, 16),
        (16, 64, torch.bfloat16, 0, 1024, 4),
        (16, 64, torch.bfloat16, 0, 1025, 4),
        (16, 64, torch.bfloat16, 0, 64, 32),
        (16, 64, torch.float8_e4m3fn, 4, 64, 16),
        (16, 32, torch.bfloat16, 0, 1, 16),
        (32, 64, torch.bfloat16, 0, 1, 32),
        (64, 64, torch.bfloat16, 0, 64, 128),
        (64, 64, torch.float8_e4m3fn, 1, 1, 128),
        (64, 64, torch.float8_e4m3fn, 4, 1, 128),
        (64, 64, torch.float32, 0, 1, 128),
    ]
    lines = []
    for block_h, page_size, dtype, scale_groups, batch, n_rows in cases:
        found = sm90_gluon_kernel(block_h, page_size, dtype, scale_groups, batch, n_rows)
        name = "-" if found is None else f"{found[0].__name__}, {found[1]} warps"
        lines.append(
            f"{block_h} rows, pages of {page_size}, {dtype}, {scale_groups}, "
            f"{batch} x {n_rows} rows: {name}"
        )
    assert_expected_inline(
        "\n".join(lines),
        """\
16 rows, pages of 64, torch.bfloat16, 0, 1 x 16 rows: mla_decode_split_sm90_kernel, 4 warps
16 rows, pages of 128, torch.float16, 0, 31 x 16 rows: mla_decode_split_sm90_kernel, 4 warps
16 rows, pages of 64, torch.float8_e4m3fn, 1, 32 x 16 rows: mla_decode_persistent_sm90_kernel, 4 warps
16 rows, pages of 64, torch.bfloat16, 0, 1024 x 4 rows: mla_decode_persistent_sm90_kernel, 4 warps
16 rows, pages of 64, torch.bfloat16, 0, 1025 x 4 rows: mla_decode_split_sm90_kernel, 4 warps
16 rows, pages of 64, torch.bfloat16, 0, 64 x 32 rows: mla_decode_split_sm90_kernel, 4 warps
16 rows, pages of 64, torch.float8_e4m3fn, 4, 64 x 16 rows: -
16 rows, pages of 32, torch.bfloat16, 0, 1 x 16 rows: -
32 rows, pages of 64, torch.bfloat16, 0, 1 x 32 rows: -
64 rows, pages of 64, torch.bfloat16, 0, 64 x 128 rows: mla_decode_split_sm90_wide_kernel, 8 warps
64 rows, pages of 64, torch.float8_e4m3fn, 1, 1 x 128 rows: mla_decode_split_sm90_wide_kernel, 8 warps
64 rows, pages of 64, torch.float8_e4m3fn, 4, 1 x 128 rows: -
64 rows, pages of 64, torch.float32, 0, 1 x 128 rows: -""",
    )


def test_fp8_conversion_without_bank_conflicts():
    """The token-major fp8 kernels convert each tile through registers in sm90.CONVERT_LAYOUT:
    reading the fp8 stage and writing the fp16 staging buffer (both in wgmma's swizzled layouts)
    must take no extra shared-memory wavefronts (a conflict of 1 on the read cost the fp8
    kernel 3-7% on H100). Counted by Triton's layout model, without a GPU."""
    from triton._C.libtriton import gluon_ir, ir
    from triton.experimental.gluon import language as gl

    context = ir.context()
    ir.load_dialects(context)
    builder = gluon_ir.GluonOpBuilder(context)
    tile = [mla_decode_module.sm90.BLOCK_N, 512]
    layout = mla_decode_module.sm90.CONVERT_LAYOUT.value._to_ir(builder)
    conflicts = [
        builder.get_shared_bank_conflicts(
            layout,
            gl.NVMMASharedLayout.get_default_for(tile, dtype)._to_ir(builder),
            tile,
            dtype.primitive_bitwidth,
        )
        for dtype in (gl.float8e4nv, gl.float16)
    ]
    assert conflicts == [0, 0]


def test_cpu_branch_follows_triton_interpret():
    assert runs_triton(torch.ones(2)) == (os.environ.get("TRITON_INTERPRET") == "1")
    assert runs_triton(torch.ones(2, device="meta")) is False


def opcheck_samples(device: str) -> list[tuple]:
    samples = []
    for dtype, group_size, num_splits in (
        (torch.float32, None, None),
        (torch.bfloat16, None, 3),
        (torch.bfloat16, 64, 2),
    ):
        case = make_case(seed=13, seq_lens=[40, 7], q_len=2, dtype=dtype)
        latent_cache, latent_scale = case.latent_cache, None
        if group_size is not None:
            latent_cache, latent_scale = fp8_cache(case, group_size)
        tensors = [
            case.q_latent.to(dtype),
            case.q_pe.to(dtype),
            latent_cache,
            case.k_pe_cache,
            case.block_table,
            case.seq_lens,
        ]
        tensors = [t.to(device) for t in tensors]
        scale = None if latent_scale is None else latent_scale.to(device)
        samples.append((*tensors, case.softmax_scale, scale, num_splits))
    return samples


def opcheck(args: tuple) -> None:
    # opcheck's test_schema compares inputs before and after the call with arithmetic that has no
    # float8 kernels: the fp8 samples run the other checks.
    fp8 = args[2].dtype == torch.float8_e4m3fn
    checks = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(
        torch.ops.titan_mla.mla_decode.default,
        args,
        test_utils=checks if fp8 else ("test_schema", *checks),
    )


@pytest.mark.usefixtures("cpu_reference_branch")
def test_opcheck_cpu_reference_branch():
    for args in opcheck_samples("cpu"):
        assert not runs_triton(args[0])
        opcheck(args)


def decode_then_project(q_latent, q_pe, latent_cache, k_pe_cache, block_table, seq_lens, w_uv):
    out = mla_decode(q_latent, q_pe, latent_cache, k_pe_cache, block_table, seq_lens, 0.2)
    return torch.einsum("bqhr,hvr->bqhv", out, w_uv)


def test_compile_cpu_reference_branch():
    """torch.compile traces the reference branch (fake tensors); eager here runs the kernels
    under the interpreter when TRITON_INTERPRET=1."""
    case = make_case(seed=14, seq_lens=[33, 12], q_len=2)
    args = (
        case.q_latent.float(),
        case.q_pe.float(),
        case.latent_cache,
        case.k_pe_cache,
        case.block_table,
        case.seq_lens,
        case.w_uv.float(),
    )
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    # aot_eager: dynamo and fake-tensor tracing of the op body as Inductor sees it, without
    # Inductor's C++ build on a 2-core CPU.
    compiled = torch.compile(decode_then_project, backend="aot_eager", fullgraph=True)
    compiled_out = compiled(*args)
    assert not torch._dynamo.utils.counters["graph_break"]
    torch.testing.assert_close(compiled_out, decode_then_project(*args), rtol=1e-5, atol=1e-5)


SM90_COMPILE_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    sys.path.insert(0, "tests")
    from sm90 import MAX_SHARED, compile_for_sm90
    from titan_mla.ops import mla_decode as m

    def split_signature(kernel, fp8):
        signature = {name: "*bf16" if name.endswith("_ptr") else "i32" for name in kernel.arg_names}
        signature.update(block_table_ptr="*i32", seq_lens_ptr="*i32", partial_out_ptr="*fp32",
                         partial_lse_ptr="*fp32", softmax_scale_log2="fp32")
        if "partial_index_ptr" in signature:
            signature["partial_index_ptr"] = "*i32"
        if fp8:
            signature.update(latent_cache_ptr="*fp8e4nv", latent_scale_ptr="*fp32")
        return signature

    kernel = m._mla_decode_split_kernel
    failures = []
    # Every distinct entry of the table (keys differing in program count often share one).
    for kind, config in sorted({(key[0], c) for key, c in m.TUNED_CONFIGS.items()}, key=repr):
        scale_groups = {"bf16": 0, "fp8_token": 1, "fp8": 4}[kind]
        signature = split_signature(kernel, scale_groups > 0)
        constants = dict(SINGLE_SPLIT=False, PAGE_SIZE=64, LATENT_DIM=512, ROPE_DIM=64,
                         SCALE_GROUPS=scale_groups,
                         GROUP_LAYOUT=4 if kind == "fp8" and config.fp8_grouped_dots else 0,
                         BLOCK_H=config.block_h,
                         BLOCK_N=config.block_n, FP32_DOTS=False,
                         PREFETCH=config.prefetch, USE_FOR_LOOP=True)
        build = compile_for_sm90(kernel, signature, constants, config.num_warps, config.num_stages)
        print(kind, config, build)
        if build.spill_stores or build.shared > MAX_SHARED or build.wgmma_serialized:
            failures.append((kind, config, build))
    # The Gluon kernels of the keys that take them: 16 rows (token-major) at most, 64 (wide).
    gluon_keys = sorted({(key[0], key[1]) for key, c in m.TUNED_CONFIGS.items() if c.sm90_gluon})
    for kind, block_h in gluon_keys:
        fp8 = kind != "bf16"
        dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
        gluon, num_warps = m.sm90_gluon_kernel(block_h, 64, dtype, int(fp8))
        # 16 rows: the grid kernel, and the persistent one for batches up to 128.
        kernels = [gluon]
        if gluon is m.sm90.mla_decode_split_sm90_kernel:
            kernels.append(m.sm90.mla_decode_persistent_sm90_kernel)
        for kernel in kernels:
            # Token strides are constexprs: the engine's pools (bf16: one 576-wide pool).
            constants = dict(PAGE_SIZE=64, LATENT_DIM=512, ROPE_DIM=64,
                             IS_FP8=fp8, BLOCK_H=block_h, BLOCK_N=m.sm90.BLOCK_N,
                             latent_stride_token=512 if fp8 else 576,
                             k_pe_stride_token=64 if fp8 else 576)
            if "BLOCK_B" in kernel.arg_names:
                constants["BLOCK_B"] = 128
            else:
                constants["SINGLE_SPLIT"] = False
            build = compile_for_sm90(kernel, split_signature(kernel, fp8), constants, num_warps)
            print(kernel.fn.__name__, kind, block_h, build)
            if build.spill_stores or build.shared > MAX_SHARED or build.wgmma_serialized:
                failures.append((kernel.fn.__name__, kind, block_h, build))
    combine = m._mla_decode_combine_kernel
    for persistent in (False, True):
        compile_for_sm90(combine,
                         dict(partial_out_ptr="*fp32", partial_lse_ptr="*fp32", out_ptr="*bf16",
                              partial_index_ptr="*i32", n_rows="i32"),
                         dict(NUM_SPLITS=5, LATENT_DIM=512, BLOCK_SPLITS=8, BLOCK_D=512,
                              PERSISTENT=persistent), num_warps=4)
    sys.exit(f"spills, too much shared memory or serialized wgmma: {failures}" if failures else 0)
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA tests compile the real thing")
def test_kernels_compile_for_sm90_without_spills():
    """Triton compiles for a target without the GPU: the default configs at the 1B shapes, and
    the Gluon kernel the 16-head ones take on sm_90, must build for H100 without register spills
    and without ptxas serializing their wgmma. A subprocess: this one has the interpreter."""
    result = run_without_interpreter(SM90_COMPILE_SCRIPT, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


# The 1B model: 16 heads (and 128 as in DeepSeek-V3), kv_lora_rank 512, rope 64, FlashMLA pages.
GPU_DIMS = [Dims(heads=16, latent=512, rope=64, nope=128, v=128, page_size=64)]
GPU_DIMS.append(Dims(heads=128, latent=512, rope=64, nope=128, v=128, page_size=64))


def to_cuda(case: DecodeCase) -> DecodeCase:
    for name in ("latent_cache", "k_pe_cache", "block_table", "seq_lens"):
        setattr(case, name, getattr(case, name).cuda())
    return case


def bf16_cuda_args(
    case: DecodeCase, latent: torch.Tensor, latent_scale: torch.Tensor | None
) -> tuple:
    """mla_decode_triton's arguments up to latent_scale for a to_cuda case: bf16 queries on the
    GPU, ``latent`` (the case's cache or an fp8 one with ``latent_scale``) beside its rope keys."""
    return (
        case.q_latent.bfloat16().cuda(),
        case.q_pe.bfloat16().cuda(),
        latent,
        case.k_pe_cache,
        case.block_table,
        case.seq_lens,
        case.softmax_scale,
        latent_scale,
    )


@requires_cuda
@pytest.mark.parametrize("dims", GPU_DIMS, ids=lambda d: f"h{d.heads}")
@pytest.mark.parametrize("q_len", [1, 2])
def test_cuda_1b_shapes(dims, q_len):
    # A sequence holds at least its q_len new tokens.
    seq_lens = [max(n, q_len) for n in (1, 64, 1000, 2049, 513, 2)]
    case = to_cuda(
        make_case(seed=15, seq_lens=seq_lens, q_len=q_len, dims=dims, dtype=torch.bfloat16)
    )
    q_latent, q_pe = case.q_latent.bfloat16().cuda(), case.q_pe.bfloat16().cuda()
    args = (case.k_pe_cache, case.block_table, case.seq_lens, case.softmax_scale)
    out = mla_decode(q_latent, q_pe, case.latent_cache, *args)
    assert not out.isnan().any()
    assert relative_error(case.up_project(out.cpu()), case.expected()) <= TOLERANCE[torch.bfloat16]
    reference = mla_decode_reference(q_latent, q_pe, case.latent_cache, *args)
    assert relative_error(out, reference) <= 1e-2
    for group_size in (128, 512):
        latent_fp8, latent_scale = fp8_cache(case, group_size)
        fp8_out = mla_decode(q_latent, q_pe, latent_fp8, *args, latent_scale=latent_scale)
        assert not fp8_out.isnan().any()
        assert relative_error(fp8_out, out) <= FP8_TOLERANCE
        fp8_reference = mla_decode_reference(q_latent, q_pe, latent_fp8, *args, latent_scale)
        assert relative_error(fp8_out, fp8_reference) <= TOLERANCE[torch.bfloat16]


@requires_cuda
@pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.get_device_capability() != (9, 0),
    reason="the Gluon kernels are for sm_90",
)
@pytest.mark.parametrize(
    ("fp8", "heads", "q_len"),
    [
        (False, 16, 1),
        (True, 16, 1),
        (False, 128, 1),
        (False, 128, 2),
        (True, 128, 1),
        (True, 128, 2),
    ],
    ids=["bf16-h16", "fp8-h16", "bf16-h128", "bf16-h128-q2", "fp8-h128", "fp8-h128-q2"],
)
@pytest.mark.parametrize("page_size", [64, 128])
def test_cuda_sm90_gluon_kernels(fp8, heads, q_len, page_size):
    """mla_decode_sm90's kernels (16 rows: token-major; 64 rows: the wide one) against float64
    attention (the fp8 cache: the fp32 reference on it) and the Triton-language kernel:
    single-token, page-boundary and multi-split sequences (splits past a sequence's end are
    empty), speculative queries, over NaN-poisoned pages."""
    dims = replace(GPU_DIMS[0], heads=heads, page_size=page_size)
    seq_lens = [max(n, q_len) for n in (1, 63, 64, 65, 1000, 3001)]
    case = to_cuda(
        make_case(seed=21, seq_lens=seq_lens, q_len=q_len, dims=dims, dtype=torch.bfloat16)
    )
    latent, latent_scale = fp8_cache(case, dims.latent) if fp8 else (case.latent_cache, None)
    args = bf16_cuda_args(case, latent, latent_scale)
    # The Triton-language kernel's tuned tiles at these row counts.
    if heads == 16:
        language = DecodeConfig(16, 32, 4, 3, prefetch=False)
    elif fp8:
        language = DecodeConfig(64, 32, 8, 3, prefetch=False)
    else:
        language = DecodeConfig(64, 64, 8, 2, prefetch=False)
    assert sm90_gluon_kernel(language.block_h, page_size, latent.dtype, int(fp8))
    expected = mla_decode_reference(*args) if fp8 else case.expected()
    for num_splits in (1, 3, 16):
        out = mla_decode_triton(
            *args, num_splits=num_splits, config=replace(language, sm90_gluon=True)
        )
        assert not out.isnan().any()
        assert relative_error(out, mla_decode_triton(*args, num_splits, language)) <= 1e-2
        compared = out if fp8 else case.up_project(out.cpu())
        assert relative_error(compared, expected) <= TOLERANCE[torch.bfloat16]


@requires_cuda
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_cuda_persistent_schedule(fp8, monkeypatch):
    """The persistent token-major kernel's runs of tiles across sequence boundaries (taken here
    from two sequences on): programs covering many sequences (one-tile ones among them) or part
    of one, sequences without tokens between them (zeros), over NaN-poisoned pages, against the
    fp32 reference."""
    monkeypatch.setattr(mla_decode_module.sm90, "PERSISTENT_MIN_BATCH", 2)
    seq_lens = [5, 1000, 7, 3, 64, 1, 9, 130, 3001, 65]
    empty = [0, 2, 3, 6]
    case = to_cuda(make_case(seed=22, seq_lens=seq_lens, q_len=1, dims=GPU_DIMS[0]))
    case.seq_lens[empty] = 0
    latent, latent_scale = fp8_cache(case, 512) if fp8 else (case.latent_cache.bfloat16(), None)
    case.k_pe_cache = case.k_pe_cache.bfloat16()
    args = bf16_cuda_args(case, latent, latent_scale)
    kept = [seq for seq in range(len(seq_lens)) if seq not in empty]
    expected = mla_decode_reference(
        *(arg[kept] if index in (0, 1, 4, 5) else arg for index, arg in enumerate(args))
    )
    for num_splits in (1, 2, 16):  # 10, 20 and 132 programs' worth (at most one per SM)
        out = mla_decode_triton(*args, num_splits=num_splits)
        assert torch.equal(out[empty], torch.zeros_like(out[empty]))
        assert relative_error(out[kept], expected) <= 1e-2


@requires_cuda
@pytest.mark.parametrize("group_size", [128, 512])
def test_cuda_fp8_grouped_dots(group_size):
    """The grouped-dots fp8 path (3-d dots, a --tune candidate at 16 heads) at the 1B shapes."""
    dims = GPU_DIMS[0]
    seq_lens = [1, 64, 1000, 2049, 513]
    case = to_cuda(make_case(seed=18, seq_lens=seq_lens, q_len=1, dims=dims, dtype=torch.bfloat16))
    args = bf16_cuda_args(case, *fp8_cache(case, group_size))
    config = DecodeConfig(16, 16, 4, 2, prefetch=False, fp8_grouped_dots=True)
    for num_splits in (1, 7):
        out = mla_decode_triton(*args, num_splits=num_splits, config=config)
        assert not out.isnan().any()
        assert relative_error(out, mla_decode_reference(*args)) <= TOLERANCE[torch.bfloat16]


@requires_cuda
def test_opcheck_cuda_triton_branch():
    for args in opcheck_samples("cuda"):
        opcheck(args)


def append_tokens(
    generator: torch.Generator,
    latent_cache: torch.Tensor,
    k_pe_cache: torch.Tensor,
    latent_scale: torch.Tensor | None,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
) -> None:
    """Write one new random token at the end of every sequence (in its last page) and count it."""
    page_size = latent_cache.shape[1]
    device = latent_cache.device
    for b, seq_len in enumerate(seq_lens.tolist()):
        page, slot = int(block_table[b, seq_len // page_size]), seq_len % page_size
        latent = torch.randn(latent_cache.shape[-1], generator=generator, device=device)
        k_pe_cache[page, slot] = torch.randn(
            k_pe_cache.shape[-1], generator=generator, device=device
        ).to(k_pe_cache.dtype)
        if latent_scale is None:
            latent_cache[page, slot] = latent.to(latent_cache.dtype)
        else:
            group_size = latent_cache.shape[-1] // latent_scale.shape[-1]
            latent_cache[page, slot], latent_scale[page, slot] = quantize_latent_fp8(
                latent, group_size
            )
    seq_lens.add_(1)


@requires_cuda
@pytest.mark.parametrize("fp8", [False, True])
def test_cuda_graph_replay(fp8):
    """Capture one decode call, then replay it with new queries and new tokens written into the
    cache in place (as an engine does), and once with a padding entry (seq_len 0): the replays
    match eager references."""
    dims = GPU_DIMS[0]
    # Every sequence has room for 3 more tokens in its last page.
    case = make_case(seed=16, seq_lens=[300, 5, 120], q_len=1, dims=dims, dtype=torch.bfloat16)
    case = to_cuda(case)
    latent_cache, latent_scale = case.latent_cache, None
    if fp8:
        latent_cache, latent_scale = fp8_cache(case, 128)
    static_q_latent = case.q_latent.bfloat16().cuda()
    static_q_pe = case.q_pe.bfloat16().cuda()
    args = (latent_cache, case.k_pe_cache, case.block_table, case.seq_lens, case.softmax_scale)

    def decode() -> torch.Tensor:
        return mla_decode(static_q_latent, static_q_pe, *args, latent_scale=latent_scale)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        decode()  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = decode()

    generator = torch.Generator(device="cuda").manual_seed(17)
    for step in range(3):
        static_q_latent.normal_(generator=generator)
        static_q_pe.normal_(generator=generator)
        append_tokens(
            generator, latent_cache, case.k_pe_cache, latent_scale, case.block_table, case.seq_lens
        )
        seq_lens = case.seq_lens.clone()
        if step == 1:
            case.seq_lens[1] = 0
        graph.replay()
        expected = mla_decode_reference(
            static_q_latent,
            static_q_pe,
            latent_cache,
            case.k_pe_cache,
            case.block_table,
            case.seq_lens,
            case.softmax_scale,
            latent_scale,
        )
        assert not static_out.isnan().any()
        assert relative_error(static_out, expected) <= 1e-2
        if step == 1:
            assert torch.equal(static_out[1], torch.zeros_like(static_out[1]))
            case.seq_lens.copy_(seq_lens)
