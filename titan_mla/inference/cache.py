"""The paged latent KV cache of MLA inference.

Per layer and token, MLA attention needs only the normalized latent c_kv (kv_lora_rank values) and
the rotated key k_pe shared by all heads (qk_rope_head_dim values): 576 values for the 1B model
instead of the 2 x 16 heads x 128 of multi-head attention. One preallocated pool of fixed-size pages
holds them for every layer; each sequence owns a row of the block table that lists its pages in
order, so sequences of different lengths share memory without fragmentation, and the pages of a
finished sequence go back to the free list.

Storage is bf16/fp32, or FP8: the latent as float8 e4m3 with one fp32 scale per token (the
default: the decode kernel's fastest fp8 path, see titan_mla.ops.mla_decode) or per group of
``fp8_group_size`` values of each token (the rotary key stays in the model dtype: it is small and
sensitive to rounding).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from titan_mla.models import MLAModelArgs
from titan_mla.ops import runs_triton
from titan_mla.ops.mla_decode import dequantize_latent_fp8, quantize_latent_fp8

# Page 0 is never handed out: unused block-table entries point at it, so writes for padding
# positions (batched prefill, CUDA-graph warm-up) land there instead of in another sequence's page.
NULL_PAGE = 0


@triton.jit
def _write_latent_cache_kernel(
    latent_pool_ptr,
    k_pe_pool_ptr,
    scale_pool_ptr,
    slots_ptr,
    latent_ptr,
    k_pe_ptr,
    scale_ptr,
    latent_row_stride,
    k_pe_row_stride,
    LATENT_DIM: tl.constexpr,
    ROPE_DIM: tl.constexpr,
    GROUPS: tl.constexpr,
):
    """One token's latent, rotary key and scales to its slot: the three rows in one launch."""
    token = tl.program_id(0)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    latent_dims = tl.arange(0, LATENT_DIM)
    latent = tl.load(latent_ptr + token * latent_row_stride + latent_dims)
    tl.store(latent_pool_ptr + slot * LATENT_DIM + latent_dims, latent)
    rope_dims = tl.arange(0, ROPE_DIM)
    k_pe = tl.load(k_pe_ptr + token * k_pe_row_stride + rope_dims)
    tl.store(k_pe_pool_ptr + slot * ROPE_DIM + rope_dims, k_pe)
    if GROUPS > 0:
        groups = tl.arange(0, GROUPS)
        scale = tl.load(scale_ptr + token * GROUPS + groups)
        tl.store(scale_pool_ptr + slot * GROUPS + groups, scale)


@torch.library.custom_op(
    "titan_mla::write_latent_cache", mutates_args=("latent_pool", "k_pe_pool", "scale_pool")
)
def write_latent_cache(
    latent_pool: Tensor,
    k_pe_pool: Tensor,
    scale_pool: Tensor,
    slots: Tensor,
    latent: Tensor,
    k_pe: Tensor,
    scale: Tensor,
) -> None:
    """Store rows ``latent`` (n, kv_lora_rank), ``k_pe`` (n, rope_dim) and fp8 ``scale`` (n,
    groups; groups = 0 for a bf16/fp32 cache) at flat token ``slots`` (n,) of one layer's pools
    (pages, page_size, dim), in place.

    An op with declared mutations rather than index_copy_ on views of the all-layer pool: under
    torch.compile, functionalizing a write into a view regenerates the whole multi-layer pool
    (a full copy of the cache per layer and step); this op is a single in-place node instead.
    On GPU one kernel writes all three (one launch per layer and decode step instead of two or
    three); dimensions that are not powers of two take index_copy_, as the CPU does.
    """
    if latent_pool.dtype == torch.float8_e4m3fn:  # no float8 copies in ATen: copy the bytes
        latent_pool, latent = latent_pool.view(torch.uint8), latent.view(torch.uint8)
    dims = (latent.shape[-1], k_pe.shape[-1], scale.shape[-1])
    if runs_triton(latent) and all(d & (d - 1) == 0 for d in dims):
        latent, k_pe = (
            rows if rows.stride(-1) == 1 else rows.contiguous() for rows in (latent, k_pe)
        )
        _write_latent_cache_kernel[(slots.numel(),)](
            latent_pool,
            k_pe_pool,
            scale_pool,
            slots,
            latent,
            k_pe,
            scale.contiguous(),
            latent.stride(0),
            k_pe.stride(0),
            LATENT_DIM=dims[0],
            ROPE_DIM=dims[1],
            GROUPS=dims[2],
        )
        return
    latent_pool.flatten(0, 1).index_copy_(0, slots, latent)
    k_pe_pool.flatten(0, 1).index_copy_(0, slots, k_pe)
    scale_pool.flatten(0, 1).index_copy_(0, slots, scale)


class CacheFullError(RuntimeError):
    """A sequence asked for more pages than the pool has free, or than a block-table row holds."""


class PagedLatentCache:
    """Latents ``latent[layer, page, slot]`` and rotary keys ``k_pe[layer, page, slot]`` of all layers
    in one page pool, with a free-list page allocator and one block-table row per sequence.

    Sequences are the integers ``0 .. max_seqs - 1`` (block-table rows). ``extend(seq, n)`` reserves
    room for ``n`` more tokens and advances the sequence's length; the model then writes those
    tokens' latents at the positions it was given.
    """

    def __init__(
        self,
        n_layers: int,
        kv_lora_rank: int,
        rope_dim: int,
        num_pages: int,
        *,
        page_size: int = 64,
        max_seqs: int = 1,
        max_pages_per_seq: int | None = None,
        dtype: torch.dtype = torch.bfloat16,
        fp8: bool = False,
        fp8_group_size: int | None = None,
        device: torch.device | str = "cpu",
    ):
        fp8_group_size = _effective_group_size(kv_lora_rank, fp8_group_size)
        if fp8 and kv_lora_rank % fp8_group_size:
            raise ValueError(f"fp8_group_size={fp8_group_size} does not divide {kv_lora_rank}")
        self.n_layers, self.kv_lora_rank, self.rope_dim = n_layers, kv_lora_rank, rope_dim
        self.num_pages, self.page_size, self.max_seqs = num_pages, page_size, max_seqs
        self.max_pages_per_seq = max_pages_per_seq or num_pages
        self.dtype, self.fp8 = dtype, fp8
        self.fp8_group_size = fp8_group_size
        n_groups = kv_lora_rank // self.fp8_group_size if fp8 else 0

        # Zero-filled, so that what attention reads beyond a sequence's end is finite (masked
        # scores times NaN values would still be NaN). +1: the null page.
        shape = (n_layers, num_pages + 1, page_size)
        self.latent = torch.zeros(
            *shape, kv_lora_rank, dtype=torch.float8_e4m3fn if fp8 else dtype, device=device
        )
        self.latent_scale = torch.zeros(*shape, n_groups, dtype=torch.float32, device=device)
        self.k_pe = torch.zeros(*shape, rope_dim, dtype=dtype, device=device)
        self.block_table = torch.full(
            (max_seqs, self.max_pages_per_seq), NULL_PAGE, dtype=torch.int32, device=device
        )
        self.free_pages: list[int] = list(range(num_pages, 0, -1))  # pop() hands out 1, 2, ...
        self.pages: list[list[int]] = [[] for _ in range(max_seqs)]
        self.lengths: list[int] = [0] * max_seqs

    @classmethod
    def for_model(
        cls,
        args: MLAModelArgs,
        *,
        max_tokens: int | None = None,
        memory_gib: float | None = None,
        page_size: int = 64,
        max_seqs: int = 1,
        max_tokens_per_seq: int | None = None,
        dtype: torch.dtype = torch.bfloat16,
        fp8: bool = False,
        fp8_group_size: int | None = None,
        device: torch.device | str = "cpu",
    ) -> PagedLatentCache:
        """A cache for ``args``' model sized by a token count or a memory budget (exactly one)."""
        if (max_tokens is None) == (memory_gib is None):
            raise ValueError("give exactly one of max_tokens and memory_gib")
        per_token = cache_bytes_per_token(
            args.n_layers, args.kv_lora_rank, args.qk_rope_head_dim, dtype, fp8, fp8_group_size
        )
        if max_tokens is not None:
            num_pages = math.ceil(max_tokens / page_size)
        else:
            num_pages = int(memory_gib * 2**30 // (per_token * page_size))
        max_pages_per_seq = (
            math.ceil(max_tokens_per_seq / page_size) if max_tokens_per_seq else None
        )
        return cls(
            args.n_layers,
            args.kv_lora_rank,
            args.qk_rope_head_dim,
            num_pages,
            page_size=page_size,
            max_seqs=max_seqs,
            max_pages_per_seq=max_pages_per_seq,
            dtype=dtype,
            fp8=fp8,
            fp8_group_size=fp8_group_size,
            device=device,
        )

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token takes over all layers (latent, its fp8 scales, rotary key)."""
        return cache_bytes_per_token(
            self.n_layers,
            self.kv_lora_rank,
            self.rope_dim,
            self.dtype,
            self.fp8,
            self.fp8_group_size,
        )

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for t in (self.latent, self.latent_scale, self.k_pe)
        )

    def extend(self, seq: int, num_tokens: int) -> int:
        """Reserve room for ``num_tokens`` more tokens of ``seq``; returns the first new position."""
        start = self.lengths[seq]
        end = start + num_tokens
        pages = self.pages[seq]
        needed = math.ceil(end / self.page_size)
        new = needed - len(pages)
        if needed > self.max_pages_per_seq or new > len(self.free_pages):
            if start == 0:
                what = f"request of {num_tokens} tokens needs {needed} pages of {self.page_size}"
            else:
                what = (
                    f"extending sequence {seq} from {start} to {end} tokens needs {new} more "
                    f"page{'s' if new > 1 else ''} of {self.page_size}"
                )
            limit = (
                f"a sequence holds at most {self.max_pages_per_seq} pages"
                if needed > self.max_pages_per_seq
                else f"{len(self.free_pages)} free"
            )
            raise CacheFullError(
                f"{what}; {limit} (pool of {self.num_pages} pages, {self.capacity_tokens} tokens)"
            )
        if new > 0:
            fresh = [self.free_pages.pop() for _ in range(new)]
            self.block_table[seq, len(pages) : needed] = host_to_device(
                fresh, self.block_table.device
            )
            pages.extend(fresh)
        self.lengths[seq] = end
        return start

    def truncate(self, seq: int, length: int) -> None:
        """Drop the tokens of ``seq`` from ``length`` on (rejected speculative tokens) and the
        pages no longer needed."""
        keep = math.ceil(length / self.page_size)
        self._release(seq, keep)
        self.lengths[seq] = min(self.lengths[seq], length)

    def free(self, seq: int) -> None:
        """Return all pages of ``seq`` to the pool; the row can start a new sequence."""
        self._release(seq, 0)
        self.lengths[seq] = 0

    def _release(self, seq: int, keep: int) -> None:
        pages = self.pages[seq]
        self.free_pages.extend(reversed(pages[keep:]))
        self.block_table[seq, keep : len(pages)] = NULL_PAGE
        del pages[keep:]

    def slots(self, block_table: Tensor, positions: Tensor) -> Tensor:
        """Flat slot indices (page * page_size + offset) of ``positions`` (batch, seq) of the
        sequences whose block-table rows are ``block_table`` (batch, pages). Device-side only, so a
        CUDA graph can capture it."""
        pages = block_table.gather(1, torch.div(positions, self.page_size, rounding_mode="floor"))
        return pages.long() * self.page_size + positions % self.page_size

    def write(self, layer: int, slots: Tensor, latent: Tensor, k_pe: Tensor) -> None:
        """Store latents (..., kv_lora_rank) and rotary keys (..., rope_dim) at ``slots`` (...)."""
        self.write_pools(self.layer_pools(layer), slots, latent, k_pe)

    def write_pools(
        self, pools: tuple[Tensor, Tensor, Tensor], slots: Tensor, latent: Tensor, k_pe: Tensor
    ) -> None:
        """``write`` into one layer's ``layer_pools``: a compiled decode layer takes the pools as
        inputs, so that one graph serves every layer."""
        latent = latent.flatten(0, -2).to(self.dtype)
        if self.fp8:
            latent, scale = quantize_latent_fp8(latent, group_size=self.fp8_group_size)
        else:
            scale = latent.new_empty(latent.shape[0], 0, dtype=torch.float32)
        k_pe = k_pe.flatten(0, -2).to(self.dtype)
        write_latent_cache(*pools, slots.flatten(), latent, k_pe, scale)

    def read(self, layer: int, block_table: Tensor, num_tokens: int) -> tuple[Tensor, Tensor]:
        """Latents (batch, num_tokens, kv_lora_rank), dequantized to the cache dtype, and rotary keys
        (batch, num_tokens, rope_dim) of positions 0 .. num_tokens - 1 of each block-table row."""
        pages = block_table[:, : math.ceil(num_tokens / self.page_size)].long()
        latent = self.latent[layer][pages].flatten(1, 2)[:, :num_tokens]
        if self.fp8:
            scale = self.latent_scale[layer][pages].flatten(1, 2)[:, :num_tokens]
            latent = dequantize_latent_fp8(latent, scale, self.dtype)
        return latent, self.k_pe[layer][pages].flatten(1, 2)[:, :num_tokens]

    def layer_pools(self, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        """(latent, k_pe, latent_scale) pools of one layer, (num_pages, page_size, dim) each; the
        scale pool has 0 groups unless the cache is FP8."""
        return self.latent[layer], self.k_pe[layer], self.latent_scale[layer]


def host_to_device(
    values: list[int], device: torch.device | str, dtype: torch.dtype = torch.int32
) -> Tensor:
    """A small tensor of host ``values`` on ``device``, sent without waiting for the device: a
    plain copy from pageable memory synchronizes the stream, which every decode step would pay
    (the GPU idles while the host prepares the next step)."""
    tensor = torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _effective_group_size(kv_lora_rank: int, fp8_group_size: int | None) -> int:
    """The fp8 scale group a cache uses: None, or a group as wide as the latent (or wider), is one
    scale per token."""
    return min(fp8_group_size or kv_lora_rank, kv_lora_rank)


def cache_bytes_per_token(
    n_layers: int,
    kv_lora_rank: int,
    rope_dim: int,
    dtype: torch.dtype,
    fp8: bool,
    fp8_group_size: int | None = None,
) -> int:
    """Bytes per cached token over all layers: the latent (1 byte per value plus a 4-byte scale per
    group when FP8; ``fp8_group_size`` None: per token) and the rotary key in ``dtype``."""
    if fp8:
        n_groups = kv_lora_rank // _effective_group_size(kv_lora_rank, fp8_group_size)
        latent_bytes = kv_lora_rank + 4 * n_groups
    else:
        latent_bytes = kv_lora_rank * dtype.itemsize
    return n_layers * (latent_bytes + rope_dim * dtype.itemsize)
