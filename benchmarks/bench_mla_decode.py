"""Absorbed MLA decode (titan_mla::mla_decode) on one GPU: our kernels with a bf16 and an fp8 cache
vs the PyTorch reference, eager and compiled, against the device's copy bandwidth.

Shapes: (batch, context, heads) = (128, 4096, 16), (128, 4096, 128), (64, 8192, 16) with lengths
uniform in [context / 2, context], and (1, 65536, 16), (1, 1048576, 16); q_len 1, page size 64,
kv_lora_rank 512, rope 64, pages shuffled in one pool. GB/s as FlashMLA counts it: every cached
token read once (bf16: 576 x 2 bytes; fp8: 512 + 4 (per-token scale) or 4 x 4 (per-128 scales)
+ 64 x 2 rope bytes) plus q and out bytes; TFLOP/s = 2 x heads x tokens x (512 + 64 + 512) / time.
The triton_* rows are the op as the engine calls it (on sm_90 the bf16 and per-token fp8 cases take
the Gluon kernels of mla_decode_sm90); where they do, triton_*_tl rows time the Triton-language
kernel with the same configuration, its baseline. Where DeepSeek's FlashMLA package (`flash_mla`,
CUDA, sm_90) is installed, its dense decode is timed on the same bf16 cache (flashmla_bf16 rows:
its scheduling metadata made once and reused; flashmla_bf16_step: made per call, as a decode step
whose lengths have grown needs; it takes our pool layout as is). Every variant is checked against
the reference before it is timed, and timed as CUDA-graph replays of 10 back-to-back calls (a
decode step's launch path; the 1 GiB copy bandwidth is timed eagerly, see copy_bandwidth; an
elementwise kernel moving each 16-head case's bf16 bytes is timed like the kernels, as that size's
ceiling). Writes benchmarks/results/mla_decode-<gpu>.json (+ .md) or --out.

    COMMIT=$(git rev-parse HEAD) python benchmarks/bench_mla_decode.py --out benchmarks/results

--tune times, per case and cache kind, the candidates of tuning_candidates (at most 15 launch
configurations: tile shape or the Gluon kernel x programs per SM of the split heuristic), each
checked against the default configuration's checked output; the Triton rows and the summary then use
each case's best configuration (named in the rows' "config"), the default heuristic's rows stay
beside them as triton_*_default, and a TUNED_CONFIGS table for titan_mla/ops/mla_decode.py is
printed: per key, the candidate with the smallest geometric-mean slowdown over that key's cases.
--smoke runs small shapes (and two tiles x two split targets when tuning) to check the script in a
minute.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import triton
import triton.testing
from torch import Tensor
from triton.runtime.errors import OutOfResources

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import graph_time_ms, relative_error, write_result

try:  # DeepSeek's FlashMLA, the CUDA kernel this op is measured against where it is installed
    import flash_mla
except ImportError:
    flash_mla = None
from titan_mla.ops.mla_decode import (
    DecodeConfig,
    cache_kind,
    default_config,
    mla_decode,
    mla_decode_reference,
    mla_decode_triton,
    quantize_latent_fp8,
    sm90_gluon_kernel,
    tuning_key,
)

LATENT_DIM, ROPE_DIM, PAGE_SIZE = 512, 64, 64
# Cache formats by fp8 scale groups per token: bf16 (0), fp8 with one scale per token (the
# engine's fp8 default) and with one per 128 values.
CACHE_FORMATS = {"bf16": 0, "fp8": 1, "fp8_g128": LATENT_DIM // 128}
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
GRAPH_CALLS = 10  # calls per timed CUDA-graph replay


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
# --smoke: every code path (variable lengths, 128 heads, a long single sequence) in seconds.
SMOKE_SHAPES = [Shape(8, 1024, 16, True), Shape(4, 512, 128, True), Shape(1, 8192, 16, False)]


@dataclass
class Inputs:
    q_latent: torch.Tensor
    q_pe: torch.Tensor
    pool: torch.Tensor  # (pages, page, 576) bf16: each token's latent then its rope key
    fp8_latents: dict[int, tuple[torch.Tensor, torch.Tensor]]  # scale groups -> (latent, scales)
    k_pe_fp8_side: torch.Tensor  # the rope part an fp8 engine keeps beside its fp8 latent
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    tokens: int

    @property
    def latent_cache(self) -> torch.Tensor:
        return self.pool[..., :LATENT_DIM]

    @property
    def k_pe_cache(self) -> torch.Tensor:
        return self.pool[..., LATENT_DIM:]

    def args(self, scale_groups: int) -> tuple:
        """mla_decode_triton's positional arguments up to latent_scale, on the cache format with
        ``scale_groups`` fp8 scales per token (0: the bf16 cache, latent_scale None)."""
        if scale_groups == 0:
            latent, k_pe, latent_scale = self.latent_cache, self.k_pe_cache, None
        else:
            (latent, latent_scale), k_pe = self.fp8_latents[scale_groups], self.k_pe_fp8_side
        return (
            self.q_latent,
            self.q_pe,
            latent,
            k_pe,
            self.block_table,
            self.seq_lens,
            SOFTMAX_SCALE,
            latent_scale,
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
    queries = torch.randn(
        shape.batch, 1, shape.heads, LATENT_DIM + ROPE_DIM, generator=gpu_generator, device=device
    ).bfloat16()
    return Inputs(
        pool=pool,
        q_latent=queries[..., :LATENT_DIM].contiguous(),
        q_pe=queries[..., LATENT_DIM:].contiguous(),
        fp8_latents={
            groups: quantize_latent_fp8(pool[..., :LATENT_DIM], LATENT_DIM // groups)
            for groups in CACHE_FORMATS.values()
            if groups
        },
        k_pe_fp8_side=pool[..., LATENT_DIM:].contiguous(),
        block_table=block_table.to(device),
        seq_lens=seq_lens.to(device=device, dtype=torch.int32),
        tokens=int(seq_lens.sum()),
    )


def flashmla_variant(inputs: Inputs, schedule_per_call: bool) -> Callable[[], Tensor]:
    """FlashMLA's dense decode on the bf16 pool, seen as one key head of 576. Its scheduling
    metadata is made by the first call given a new one and may be reused only while the lengths
    stay the same: reused (its kernels alone), or new per call (a decode step, where every
    length has grown by one)."""
    queries = torch.cat([inputs.q_latent, inputs.q_pe], dim=-1)
    reused_schedule, _ = flash_mla.get_mla_metadata()

    def run() -> Tensor:
        schedule = flash_mla.get_mla_metadata()[0] if schedule_per_call else reused_schedule
        return flash_mla.flash_mla_with_kvcache(
            queries,
            inputs.pool.unsqueeze(2),
            inputs.block_table,
            inputs.seq_lens,
            LATENT_DIM,
            schedule,
            softmax_scale=SOFTMAX_SCALE,
        )[0]

    return run


def reference_memory(shape: Shape) -> int:
    """Peak bytes of mla_decode_reference, roughly: the gathered cache (bf16 gather, its fp32 copy,
    the masked copy) and three fp32 score-sized tensors."""
    cached = shape.batch * shape.context
    return cached * (LATENT_DIM + ROPE_DIM) * (2 + 4 + 4) + 3 * cached * shape.heads * 4


def cache_row_bytes(scale_groups: int) -> int:
    """Bytes of one cached token: the latent (+ its scales when fp8) and the bf16 rope key."""
    if scale_groups:
        return LATENT_DIM + 4 * scale_groups + 2 * ROPE_DIM
    return 2 * (LATENT_DIM + ROPE_DIM)


def bytes_moved(shape: Shape, tokens: int, scale_groups: int) -> int:
    """FlashMLA's count: cache rows read once, q read, out written (bf16)."""
    q_out_bytes = shape.batch * shape.heads * 2 * (LATENT_DIM + ROPE_DIM + LATENT_DIM)
    return tokens * cache_row_bytes(scale_groups) + q_out_bytes


def flops(shape: Shape, tokens: int) -> int:
    return 2 * shape.heads * tokens * (LATENT_DIM + ROPE_DIM + LATENT_DIM)


def copy_bandwidth(n_bytes: int) -> float:
    """GB/s of a device-to-device copy, bytes read plus written. Timed as eager launches: one copy
    of ~1 GiB has no launch cost to hide, and captured in a CUDA graph (a memcpy node) it measured
    2440 GB/s on H100 instead of 3000."""
    source = torch.randint(0, 255, (n_bytes,), dtype=torch.uint8, device=DEVICE)
    target = torch.empty_like(source)
    ms = triton.testing.do_bench(lambda: target.copy_(source), return_mode="median")
    return 2 * n_bytes / ms / 1e6


def tuning_candidates(key: tuple[str, int, bool], smoke: bool) -> list[DecodeConfig]:
    """The launch configurations --tune times for a TUNED_CONFIGS key (at most 15): tile shapes
    that compile for sm_90 without register spills and within shared memory (ptxas -v, checked by
    hand), each with the split heuristic aiming at a few programs per SM (fewer, longer splits for
    long single sequences); where a Gluon kernel takes the key (sm_90), also that kernel at
    those targets. At 64 rows (128 heads) only the tile shape varies: the fp32 partials there
    cost as much as the cache, so the heuristic splits only to fill a wave."""
    kind, block_h, few_programs = key
    if block_h < 64:
        # (block_n, num_warps, num_stages, prefetch, fp8_grouped_dots)
        tiles = {
            "bf16": [
                (32, 4, 3, False, False),
                (32, 4, 2, False, False),
                (64, 8, 3, False, False),
                (32, 8, 5, False, False),
            ],
            "fp8": [
                (32, 8, 1, True, False),
                (32, 8, 3, False, False),
                (16, 8, 3, False, False),
                (16, 4, 2, False, True),
            ],
            "fp8_token": [
                (64, 8, 3, False, False),
                (64, 8, 2, False, False),
                (32, 8, 3, False, False),
                (32, 8, 4, False, False),
            ],
        }[kind]
        programs_per_sm = [0.25, 1.0, 4.0] if few_programs else [2.0, 4.0, 8.0]
    else:
        tiles = {
            "bf16": [
                (64, 8, 2, False, False),
                (32, 8, 4, False, False),
                (32, 8, 3, False, False),
                (16, 8, 5, False, False),
            ],
            # Grouped dots spill from 32 rows on: not a candidate here.
            "fp8": [(32, 8, 2, False, False), (16, 8, 2, False, False)],
            "fp8_token": [(32, 8, 3, False, False), (32, 8, 2, False, False)],
        }[kind]
        programs_per_sm = [4.0]
    if smoke:
        tiles, programs_per_sm = tiles[:2], programs_per_sm[:2]
    candidates = [
        DecodeConfig(block_h, block_n, warps, stages, prefetch, pps, grouped)
        for block_n, warps, stages, prefetch, grouped in tiles
        for pps in programs_per_sm
    ]
    scale_groups = next(groups for groups in CACHE_FORMATS.values() if cache_kind(groups) == kind)
    cache_dtype = torch.float8_e4m3fn if scale_groups else torch.bfloat16
    if sm90_gluon_kernel(block_h, PAGE_SIZE, cache_dtype, scale_groups):
        # A Gluon kernel has its own tile: only the split target varies. The first tile's
        # fields are its fallback off sm_90.
        candidates += [
            replace(candidates[0], programs_per_sm=pps, sm90_gluon=True) for pps in programs_per_sm
        ]
    return candidates


def tune(
    shape: Shape, inputs: Inputs, scale_groups: int, check: torch.Tensor, smoke: bool
) -> tuple[tuple, dict[DecodeConfig, float]]:
    """Time every candidate configuration on the cache format of ``scale_groups`` (each checked
    against ``check``, the default configuration's checked output); returns the TUNED_CONFIGS key
    and ms per candidate."""
    sm_count = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    key = tuning_key(shape.batch, shape.heads, cache_kind(scale_groups), sm_count)
    args = inputs.args(scale_groups)
    timings = {}
    for config in tuning_candidates(key, smoke):

        def run(config=config) -> torch.Tensor:
            return mla_decode_triton(*args, None, config)

        try:
            error = relative_error(run(), check)
        except OutOfResources as exception:
            print(f"  {config}: skipped, {exception}")
            continue
        assert error <= TOLERANCE, (shape, config, error)
        timings[config] = graph_time_ms(run, GRAPH_CALLS)
    best = min(timings, key=timings.get)
    print(
        f"  tune {shape.case} {key[0]}: {len(timings)} configs, best {timings[best] * 1e3:.1f} us "
        f"{best}"
    )
    return key, timings


def heuristic_table(tuned: dict[tuple, list[dict[DecodeConfig, float]]]) -> str:
    """TUNED_CONFIGS source: per key, the candidate with the smallest geometric mean of its time
    over the best time, across the cases of that key."""
    lines = ["TUNED_CONFIGS: dict[tuple[str, int, bool], DecodeConfig] = {"]
    for key in sorted(tuned):
        cases = tuned[key]
        common = set.intersection(*(set(timings) for timings in cases))

        def slowdown(config: DecodeConfig, cases=cases) -> float:
            ratios = [timings[config] / min(timings.values()) for timings in cases]
            return math.prod(ratios) ** (1 / len(ratios))

        best = min(common, key=slowdown)
        kind, block_h, few_programs = key
        lines.append(
            f'    ("{kind}", {block_h}, {few_programs}): {best!r},'
            f"  # {slowdown(best):.3f}x the per-case best over {len(cases)} case(s)"
        )
    return "\n".join([*lines, "}"])


def bench_shape(
    shape: Shape, copy_gbps: float, tuning: dict | None, smoke: bool, notes: list[str]
) -> list[dict]:
    """Check and time every variant at ``shape``. With ``tuning`` (a dict collecting each
    TUNED_CONFIGS key's candidate timings), the Triton rows use the case's best configuration,
    and the default heuristic's rows are kept beside them as triton_*_default."""
    generator = torch.Generator().manual_seed(shape.batch * shape.context + shape.heads)
    inputs = make_inputs(shape, generator)
    bf16_args = inputs.args(0)[:-1]

    def triton_variant(scale_groups: int, config: DecodeConfig | None) -> Callable[[], Tensor]:
        *args, latent_scale = inputs.args(scale_groups)
        if config is None:  # the custom op, as the engine calls it
            return lambda: mla_decode(*args, latent_scale=latent_scale)
        return lambda: mla_decode_triton(*args, latent_scale, None, config)

    # name -> (function, cache scale groups, config)
    variants: dict[str, tuple[Callable[[], Tensor], int, DecodeConfig | None]] = {
        f"triton_{name}": (triton_variant(groups, None), groups, None)
        for name, groups in CACHE_FORMATS.items()
    }
    # Where the default takes the Gluon kernel (sm_90), the Triton-language kernel with the same
    # configuration is timed beside it (triton_*_tl): the baseline of mla_decode_sm90.
    sm_count = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    for name, groups in CACHE_FORMATS.items():
        default = default_config(
            shape.batch, shape.heads, torch.bfloat16, cache_kind(groups), sm_count
        )
        if default.sm90_gluon:
            language_config = replace(default, sm90_gluon=False)
            variants[f"triton_{name}_tl"] = (
                triton_variant(groups, language_config),
                groups,
                language_config,
            )
    if flash_mla is not None:
        variants["flashmla_bf16"] = (flashmla_variant(inputs, False), 0, None)
        variants["flashmla_bf16_step"] = (flashmla_variant(inputs, True), 0, None)
    ours = {groups: variants[f"triton_{name}"][0]() for name, groups in CACHE_FORMATS.items()}
    fp8_outputs = {groups: out for groups, out in ours.items() if groups}
    for impl, (fn, groups, _) in variants.items():
        # The Triton-language kernels and FlashMLA agree with the default ones.
        if impl.endswith("_tl") or impl.startswith("flashmla"):
            assert relative_error(fn(), ours[groups]) <= TOLERANCE, (shape, impl)
    for groups, out in fp8_outputs.items():
        fp8_error = relative_error(out, ours[0])
        assert fp8_error <= FP8_VS_BF16_TOLERANCE, (shape, groups, fp8_error)

    if reference_memory(shape) > REFERENCE_MEMORY_LIMIT:
        notes.append(
            f"{shape.case}: PyTorch reference skipped (needs ~{reference_memory(shape) / 2**30:.0f}"
            f" GiB > {REFERENCE_MEMORY_LIMIT / 2**30:.0f} GiB); fp8 checked against bf16 only"
        )
    else:
        reference = mla_decode_reference(*bf16_args)
        assert relative_error(ours[0], reference) <= TOLERANCE, shape
        for groups, out in fp8_outputs.items():
            fp8_reference = mla_decode_reference(*inputs.args(groups))
            assert relative_error(out, fp8_reference) <= FP8_TOLERANCE, (shape, groups)
            del fp8_reference
        compiled_reference = torch.compile(mla_decode_reference, dynamic=False)
        compiled_out = compiled_reference(*bf16_args)
        assert relative_error(compiled_out, reference) <= COMPILED_TOLERANCE, shape
        variants["torch_reference_eager"] = (lambda: mla_decode_reference(*bf16_args), 0, None)
        variants["torch_reference_compiled"] = (lambda: compiled_reference(*bf16_args), 0, None)

    if tuning is not None:
        # Other configurations must agree with the checked default ones.
        for name, groups in CACHE_FORMATS.items():
            key, timings = tune(shape, inputs, groups, ours[groups], smoke)
            tuning.setdefault(key, []).append(timings)
            best = min(timings, key=timings.get)
            variants[f"triton_{name}_default"] = variants[f"triton_{name}"]
            variants[f"triton_{name}"] = (triton_variant(groups, best), groups, best)

    rows = []
    if shape.heads == 16:
        # The same bytes moved by an elementwise kernel launched the same way (reads half, writes
        # half): the ceiling at this size, where launch, ramp and tail weigh more than at 1 GiB.
        # A kernel, not copy_: a captured copy_ is a memcpy node, slower than either (2.4 TB/s).
        source = torch.ones(
            bytes_moved(shape, inputs.tokens, 0) // 4, dtype=torch.bfloat16, device=DEVICE
        )
        target = torch.empty_like(source)
        copy_ms = graph_time_ms(lambda: torch.neg(source, out=target), GRAPH_CALLS)
        same_size_gbps = 4 * source.numel() / copy_ms / 1e6
        rows.append(
            {
                "case": shape.case,
                "impl": "torch_neg_same_bytes",
                "metric": "GB/s",
                "value": same_size_gbps,
            }
        )
        print(f"{shape.case:24s} {'torch_neg_same_bytes':26s} {same_size_gbps:7.0f} GB/s")
        del source, target
    for impl, (fn, groups, config) in variants.items():
        ms = graph_time_ms(fn, GRAPH_CALLS)
        gbps = bytes_moved(shape, inputs.tokens, groups) / ms / 1e6
        tflops = flops(shape, inputs.tokens) / ms / 1e9
        extra = {} if config is None else {"config": repr(config)}
        rows += [
            {"case": shape.case, "impl": impl, "metric": metric, "value": number, **extra}
            for metric, number in (("ms", ms), ("GB/s", gbps), ("TFLOP/s", tflops))
        ]
        print(
            f"{shape.case:24s} {impl:26s} {ms * 1e3:9.1f} us {gbps:7.0f} GB/s "
            f"({gbps / copy_gbps:4.0%} of copy) {tflops:6.1f} TFLOP/s",
            flush=True,
        )
    return rows


def value(rows: list[dict], case: str, impl: str, metric: str) -> float:
    return next(
        r["value"] for r in rows if (r["case"], r["impl"], r["metric"]) == (case, impl, metric)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--tune",
        action="store_true",
        help="time candidate configurations per case, report with the best, print TUNED_CONFIGS",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")

    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    copy_bytes = COPY_BYTES >> 4 if args.smoke else COPY_BYTES
    copy_gbps = copy_bandwidth(copy_bytes)
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s")
    rows = [
        {
            "case": f"copy_{copy_bytes >> 20}MiB",
            "impl": "torch_copy",
            "metric": "GB/s",
            "value": copy_gbps,
        }
    ]
    notes: list[str] = []
    tuning: dict | None = {} if args.tune else None
    for shape in shapes:
        rows += bench_shape(shape, copy_gbps, tuning, args.smoke, notes)
        torch.cuda.empty_cache()

    memory_bound = [shape.case for shape in shapes if shape.heads == 16]
    h128 = next(shape.case for shape in shapes if shape.heads == 128)
    summary = {
        "decode_bf16_frac_of_copy_bw": min(
            value(rows, case, "triton_bf16", "GB/s") / copy_gbps for case in memory_bound
        ),
        # The same bytes read and written by an elementwise kernel (CUDA graph of 10 calls).
        "decode_bf16_frac_of_same_size_copy": min(
            value(rows, case, "triton_bf16", "GB/s")
            / value(rows, case, "torch_neg_same_bytes", "GB/s")
            for case in memory_bound
        ),
        # fp8: the engine's default format (one scale per token), then per-128 groups.
        "decode_fp8_speedup_vs_bf16": min(
            value(rows, case, "triton_bf16", "ms") / value(rows, case, "triton_fp8", "ms")
            for case in memory_bound
        ),
        "decode_fp8_g128_speedup_vs_bf16": min(
            value(rows, case, "triton_bf16", "ms") / value(rows, case, "triton_fp8_g128", "ms")
            for case in memory_bound
        ),
        "decode_h128_tflops": value(rows, h128, "triton_bf16", "TFLOP/s"),
        "copy_gbps": copy_gbps,
        "configs": "best per case (--tune)" if args.tune else "default heuristic",
    }
    if flash_mla is not None:
        summary["flashmla_bf16_frac_of_copy_bw"] = min(
            value(rows, case, "flashmla_bf16", "GB/s") / copy_gbps for case in memory_bound
        )
        summary["flashmla_h128_tflops"] = value(rows, h128, "flashmla_bf16", "TFLOP/s")
    if notes:
        summary["notes"] = "; ".join(notes)
    command = "python " + " ".join(sys.argv)
    path = write_result("mla_decode", command, rows, summary, args.out)
    print(summary)
    if tuning is not None:
        print("\nHeuristic table for titan_mla/ops/mla_decode.py (paste over TUNED_CONFIGS):")
        print(heuristic_table(tuning))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
