"""Absorbed MLA decode (titan_mla::mla_decode) on one GPU: the Triton kernels with a bf16 and an fp8
cache vs the PyTorch reference, eager and compiled, against the device's copy bandwidth.

Shapes: (batch, context, heads) = (128, 4096, 16), (128, 4096, 128), (64, 8192, 16) with lengths
uniform in [context / 2, context], and (1, 65536, 16), (1, 1048576, 16); q_len 1, page size 64,
kv_lora_rank 512, rope 64, pages shuffled in one pool. GB/s as FlashMLA counts it: every cached
token read once (bf16: 576 x 2 bytes; fp8: 512 + 4 x 4 scale + 64 x 2 rope bytes) plus q and out
bytes; TFLOP/s = 2 x heads x tokens x (512 + 64 + 512) / time. Every variant is checked against
the reference before it is timed. Writes benchmarks/results/mla_decode-<gpu>.json (+ .md) or --out.

    COMMIT=$(git rev-parse HEAD) python benchmarks/bench_mla_decode.py --out benchmarks/results

--sweep also times a few launch configurations and split counts per shape (several minutes) and
prints the best ones, to tune titan_mla.ops.mla_decode.default_config / default_num_splits.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.testing
from triton.runtime.errors import OutOfResources

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import write_result
from titan_mla.ops.mla_decode import (
    DecodeConfig,
    default_config,
    default_num_splits,
    mla_decode,
    mla_decode_reference,
    mla_decode_triton,
    quantize_latent_fp8,
)

LATENT_DIM, ROPE_DIM, PAGE_SIZE, FP8_GROUP_SIZE = 512, 64, 64, 128
SOFTMAX_SCALE = (128 + ROPE_DIM) ** -0.5
# The eager reference gathers the whole cache in fp32 and keeps scores per head: skip it past this.
REFERENCE_MEMORY_LIMIT = 20 * 2**30
COPY_BYTES = 2**30
DEVICE = "cuda"
# Checks before timing (relative error of the latent output).
TOLERANCE = 1e-2  # bf16 kernels vs the fp32 reference on the same cache
# fp8 kernels vs the fp32 reference on the same fp8 cache: the kernel also rounds the dequantized
# latent to bf16 for the tensor cores.
FP8_TOLERANCE = 2e-2
FP8_VS_BF16_TOLERANCE = 6e-2  # fp8 cache vs the bf16 cache it was quantized from
COMPILED_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Shape:
    batch: int
    context: int
    heads: int
    variable_lengths: bool

    @property
    def case(self) -> str:
        lengths = "_var" if self.variable_lengths else ""
        return f"b{self.batch}_ctx{self.context}{lengths}_h{self.heads}"


SHAPES = [
    Shape(128, 4096, 16, True),
    Shape(128, 4096, 128, True),
    Shape(64, 8192, 16, True),
    Shape(1, 65536, 16, False),
    Shape(1, 1 << 20, 16, False),
]


@dataclass
class Inputs:
    q_latent: torch.Tensor
    q_pe: torch.Tensor
    latent_cache: torch.Tensor  # bf16 view of the (pages, page, 576) pool
    k_pe_cache: torch.Tensor  # bf16 view of the same pool
    latent_fp8: torch.Tensor
    latent_scale: torch.Tensor
    k_pe_fp8_side: torch.Tensor  # the rope part an fp8 engine keeps beside its fp8 latent
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    tokens: int

    def bf16_args(self) -> tuple:
        return (
            self.q_latent,
            self.q_pe,
            self.latent_cache,
            self.k_pe_cache,
            self.block_table,
            self.seq_lens,
            SOFTMAX_SCALE,
        )

    def fp8_args(self) -> tuple:
        return (
            self.q_latent,
            self.q_pe,
            self.latent_fp8,
            self.k_pe_fp8_side,
            self.block_table,
            self.seq_lens,
            SOFTMAX_SCALE,
        )


def make_inputs(shape: Shape, generator: torch.Generator) -> Inputs:
    """Random queries and cache (never zeros); each sequence's pages at shuffled places in a pool."""
    device = DEVICE
    if shape.variable_lengths:
        seq_lens = torch.randint(
            shape.context // 2, shape.context + 1, (shape.batch,), generator=generator
        )
    else:
        seq_lens = torch.full((shape.batch,), shape.context)
    pages_per_seq = (seq_lens + PAGE_SIZE - 1) // PAGE_SIZE
    n_pages = int(pages_per_seq.sum())
    max_pages = shape.context // PAGE_SIZE
    page_ids = torch.randperm(n_pages, generator=generator)
    block_table = torch.zeros(shape.batch, max_pages, dtype=torch.int32)
    used = torch.arange(max_pages)[None, :] < pages_per_seq[:, None]
    block_table[used] = page_ids.to(torch.int32)

    gpu_generator = torch.Generator(device=device).manual_seed(int(generator.initial_seed()))
    pool = torch.randn(
        n_pages, PAGE_SIZE, LATENT_DIM + ROPE_DIM, generator=gpu_generator, device=device
    ).bfloat16()
    latent_fp8, latent_scale = quantize_latent_fp8(pool[..., :LATENT_DIM], FP8_GROUP_SIZE)
    queries = torch.randn(
        shape.batch, 1, shape.heads, LATENT_DIM + ROPE_DIM, generator=gpu_generator, device=device
    ).bfloat16()
    return Inputs(
        q_latent=queries[..., :LATENT_DIM].contiguous(),
        q_pe=queries[..., LATENT_DIM:].contiguous(),
        latent_cache=pool[..., :LATENT_DIM],
        k_pe_cache=pool[..., LATENT_DIM:],
        latent_fp8=latent_fp8,
        latent_scale=latent_scale,
        k_pe_fp8_side=pool[..., LATENT_DIM:].contiguous(),
        block_table=block_table.to(device),
        seq_lens=seq_lens.to(device=device, dtype=torch.int32),
        tokens=int(seq_lens.sum()),
    )


def reference_memory(shape: Shape) -> int:
    """Peak bytes of mla_decode_reference, roughly: the gathered cache (bf16 gather, its fp32 copy,
    the masked copy) and three fp32 score-sized tensors."""
    cached = shape.batch * shape.context
    return cached * (LATENT_DIM + ROPE_DIM) * (2 + 4 + 4) + 3 * cached * shape.heads * 4


def cache_row_bytes(fp8: bool) -> int:
    """Bytes of one cached token: the latent (+ its group scales when fp8) and the bf16 rope key."""
    if fp8:
        return LATENT_DIM + 4 * (LATENT_DIM // FP8_GROUP_SIZE) + 2 * ROPE_DIM
    return 2 * (LATENT_DIM + ROPE_DIM)


def bytes_moved(shape: Shape, tokens: int, fp8: bool) -> int:
    """FlashMLA's count: cache rows read once, q read, out written (bf16)."""
    q_out_bytes = shape.batch * shape.heads * 2 * (LATENT_DIM + ROPE_DIM + LATENT_DIM)
    return tokens * cache_row_bytes(fp8) + q_out_bytes


def flops(shape: Shape, tokens: int) -> int:
    return 2 * shape.heads * tokens * (LATENT_DIM + ROPE_DIM + LATENT_DIM)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.float()
    return ((actual.float() - expected).norm() / expected.norm()).item()


def time_ms(fn: Callable[[], torch.Tensor]) -> float:
    return triton.testing.do_bench(fn, return_mode="median")


def copy_bandwidth() -> float:
    """GB/s of a device-to-device copy, bytes read plus written."""
    source = torch.randint(0, 255, (COPY_BYTES,), dtype=torch.uint8, device=DEVICE)
    target = torch.empty_like(source)
    ms = time_ms(lambda: target.copy_(source))
    return 2 * COPY_BYTES / ms / 1e6


def sweep_candidates(block_h: int) -> list[DecodeConfig]:
    """Launch configurations that compile for sm_90 without spilling (checked with ptxas)."""
    if block_h < 64:
        tiles = [
            (32, 8, 5, False),
            (32, 8, 3, False),
            (64, 8, 5, False),
            (32, 4, 5, False),
            (16, 8, 5, False),
            (32, 8, 1, True),
            (64, 8, 1, True),
            (16, 4, 1, True),
        ]
    else:
        tiles = [
            (32, 8, 5, False),
            (16, 8, 5, False),
            (32, 8, 3, False),
            (16, 8, 3, False),
            (32, 8, 2, False),
            (16, 8, 2, False),
        ]
    return [DecodeConfig(block_h, *tile) for tile in tiles]


def sweep(shape: Shape, inputs: Inputs, fp8: bool, reference: torch.Tensor) -> dict:
    """Time every candidate configuration x split count; print the best few, return the best."""
    n_rows = shape.heads
    default = default_config(n_rows, torch.bfloat16, fp8)
    splits = default_num_splits(
        shape.batch,
        n_rows,
        shape.context,
        LATENT_DIM,
        cache_row_bytes(fp8),
        default.block_h,
        torch.cuda.get_device_properties(DEVICE).multi_processor_count,
    )
    split_candidates = sorted({1, max(1, splits // 2), splits, 2 * splits})
    args = inputs.fp8_args() if fp8 else inputs.bf16_args()
    latent_scale = inputs.latent_scale if fp8 else None
    results = []
    for config in sweep_candidates(default.block_h):
        for num_splits in split_candidates:

            def run(config=config, num_splits=num_splits) -> torch.Tensor:
                return mla_decode_triton(*args, latent_scale, num_splits, config)

            try:
                error = relative_error(run(), reference)
            except OutOfResources as exception:
                print(f"  {config} splits={num_splits}: {exception}")
                break
            assert error <= TOLERANCE, (config, num_splits, error)
            results.append((time_ms(run), config, num_splits))
    results.sort(key=lambda result: result[0])
    kind = "fp8" if fp8 else "bf16"
    print(f"sweep {shape.case} {kind} (default {default}, splits {splits}):")
    for ms, config, num_splits in results[:3]:
        gbps = bytes_moved(shape, inputs.tokens, fp8) / ms / 1e6
        print(f"  {ms * 1e3:8.1f} us  {gbps:7.0f} GB/s  {config} splits={num_splits}")
    ms, config, num_splits = results[0]
    return {"ms": ms, "config": f"{config} splits={num_splits}"}


def bench_shape(shape: Shape, copy_gbps: float, do_sweep: bool, notes: list[str]) -> list[dict]:
    generator = torch.Generator().manual_seed(shape.batch * shape.context + shape.heads)
    inputs = make_inputs(shape, generator)
    bf16_args, fp8_args = inputs.bf16_args(), inputs.fp8_args()
    latent_scale = inputs.latent_scale

    variants: dict[str, tuple[Callable[[], torch.Tensor], bool]] = {
        "triton_bf16": (lambda: mla_decode(*bf16_args), False),
        "triton_fp8": (lambda: mla_decode(*fp8_args, latent_scale=latent_scale), True),
    }
    ours_bf16 = variants["triton_bf16"][0]()
    ours_fp8 = variants["triton_fp8"][0]()
    fp8_error = relative_error(ours_fp8, ours_bf16)
    assert fp8_error <= FP8_VS_BF16_TOLERANCE, (shape, fp8_error)

    reference = None
    if reference_memory(shape) > REFERENCE_MEMORY_LIMIT:
        notes.append(
            f"{shape.case}: PyTorch reference skipped (needs ~{reference_memory(shape) / 2**30:.0f}"
            f" GiB > {REFERENCE_MEMORY_LIMIT / 2**30:.0f} GiB); fp8 checked against bf16 only"
        )
    else:
        reference = mla_decode_reference(*bf16_args)
        assert relative_error(ours_bf16, reference) <= TOLERANCE, shape
        fp8_reference = mla_decode_reference(*fp8_args, latent_scale)
        assert relative_error(ours_fp8, fp8_reference) <= FP8_TOLERANCE, shape
        del fp8_reference
        compiled_reference = torch.compile(mla_decode_reference, dynamic=False)
        compiled_out = compiled_reference(*bf16_args)
        assert relative_error(compiled_out, reference) <= COMPILED_TOLERANCE, shape
        variants["torch_reference_eager"] = (lambda: mla_decode_reference(*bf16_args), False)
        variants["torch_reference_compiled"] = (lambda: compiled_reference(*bf16_args), False)

    rows = []
    for impl, (fn, fp8) in variants.items():
        ms = time_ms(fn)
        gbps = bytes_moved(shape, inputs.tokens, fp8) / ms / 1e6
        tflops = flops(shape, inputs.tokens) / ms / 1e9
        rows += [
            {"case": shape.case, "impl": impl, "metric": "ms", "value": ms},
            {"case": shape.case, "impl": impl, "metric": "GB/s", "value": gbps},
            {"case": shape.case, "impl": impl, "metric": "TFLOP/s", "value": tflops},
        ]
        print(
            f"{shape.case:24s} {impl:26s} {ms * 1e3:9.1f} us {gbps:7.0f} GB/s "
            f"({gbps / copy_gbps:4.0%} of copy) {tflops:6.1f} TFLOP/s"
        )
    if do_sweep:
        # Other configurations must agree with the checked default ones.
        for fp8, check in ((False, ours_bf16), (True, ours_fp8)):
            best = sweep(shape, inputs, fp8, check)
            impl = f"triton_{'fp8' if fp8 else 'bf16'}_sweep_best"
            gbps = bytes_moved(shape, inputs.tokens, fp8) / best["ms"] / 1e6
            rows.append(
                {
                    "case": shape.case,
                    "impl": impl,
                    "metric": "GB/s",
                    "value": gbps,
                    "config": best["config"],
                }
            )
    return rows


def value(rows: list[dict], case: str, impl: str, metric: str) -> float:
    return next(
        r["value"] for r in rows if (r["case"], r["impl"], r["metric"]) == (case, impl, metric)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--sweep", action="store_true", help="also tune configs and splits")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")

    copy_gbps = copy_bandwidth()
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s")
    rows = [
        {
            "case": f"copy_{COPY_BYTES >> 20}MiB",
            "impl": "torch_copy",
            "metric": "GB/s",
            "value": copy_gbps,
        }
    ]
    notes: list[str] = []
    for shape in SHAPES:
        rows += bench_shape(shape, copy_gbps, args.sweep, notes)
        torch.cuda.empty_cache()

    memory_bound = [shape.case for shape in SHAPES if shape.heads == 16]
    h128 = next(shape.case for shape in SHAPES if shape.heads == 128)
    summary = {
        "decode_bf16_frac_of_copy_bw": min(
            value(rows, case, "triton_bf16", "GB/s") / copy_gbps for case in memory_bound
        ),
        "decode_fp8_speedup_vs_bf16": min(
            value(rows, case, "triton_bf16", "ms") / value(rows, case, "triton_fp8", "ms")
            for case in memory_bound
        ),
        "decode_h128_tflops": value(rows, h128, "triton_bf16", "TFLOP/s"),
        "copy_gbps": copy_gbps,
    }
    if notes:
        summary["notes"] = "; ".join(notes)
    command = "python " + " ".join(sys.argv)
    path = write_result("mla_decode", command, rows, summary, args.out)
    print(summary)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
