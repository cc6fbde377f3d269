"""Decode with 1,048,576 cached tokens on one GPU: the 1B_long model, MLA latent cache, bf16 and FP8.

The model has random weights (bf16). The cache is NOT filled by a 1M-token prefill (minutes): its
pages get random values directly, latents of unit RMS (what kv_norm with its initial unit weight
gives) and rotary keys of unit variance, through the cache's own write path (FP8 quantization
included). Decode then reads every cached token at every step, as it would after a real prefill.
Each step is timed with CUDA events around ``MLAEngine.decode`` (host bookkeeping included), batch
1, one token, CUDA-graph replay; the median over the timed steps is reported, beside the eager
step and what a multi-head attention cache of the same model would need.

    COMMIT=$(git rev-parse HEAD) python benchmarks/bench_ctx1m.py   # ~1-2 minutes on one H100
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import titan_mla  # noqa: F401  (first: picks the device for torchtitan)
from benchmarks.common import write_result
from titan_mla.inference import MLAEngine, PagedLatentCache
from titan_mla.models import MLATransformer, mla_flavors

REPO = Path(__file__).resolve().parents[1]
CONTEXT = 1 << 20
STEPS, WARMUP = 30, 5
EAGER_STEPS = 10
CASE = "b1_ctx1048576_1B_long"
FILL_PAGES = 2048  # pages written per call while filling (128K tokens of one layer)


def build_model() -> MLATransformer:
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = MLATransformer(mla_flavors["1B_long"])
        with torch.no_grad():
            model.init_weights()
    return model.to(torch.bfloat16).eval()


def fill_with_random_tokens(cache: PagedLatentCache, seq: int, num_tokens: int) -> None:
    """Give ``seq`` ``num_tokens`` cached tokens of random latents and rotary keys, every layer."""
    cache.extend(seq, num_tokens)
    pages = torch.tensor(cache.pages[seq], device="cuda")
    offsets = torch.arange(cache.page_size, device="cuda")
    for layer in range(cache.n_layers):
        for begin in range(0, len(pages), FILL_PAGES):
            slots = (pages[begin : begin + FILL_PAGES, None] * cache.page_size + offsets).flatten()
            latent = torch.randn(len(slots), cache.kv_lora_rank, device="cuda")
            k_pe = torch.randn(len(slots), cache.rope_dim, device="cuda")
            cache.write(layer, slots, latent, k_pe)
    torch.cuda.synchronize()


def time_decode_ms(engine: MLAEngine, steps: int, warmup: int) -> float:
    """Median ms of one decode step of sequence 0, feeding back its greedy token."""
    token = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    times = []
    for step in range(warmup + steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        logits = engine.decode(token, [0])
        end.record()
        end.synchronize()
        if step >= warmup:
            times.append(start.elapsed_time(end))
        token = logits[:, -1].argmax(-1, keepdim=True)
    return statistics.median(times)


def measure_cache(model: MLATransformer, fp8: bool) -> dict[str, float]:
    label = "fp8" if fp8 else "bf16"
    started = time.perf_counter()
    room = CONTEXT + WARMUP + STEPS + 2 * EAGER_STEPS + 64
    cache = PagedLatentCache.for_model(
        model.model_args, max_tokens=room, dtype=torch.bfloat16, fp8=fp8, device="cuda"
    )
    engine = MLAEngine(model, cache)
    fill_with_random_tokens(cache, seq=0, num_tokens=CONTEXT)
    filled_s = time.perf_counter() - started
    print(f"  {label}: {cache.nbytes / 2**30:.2f} GiB cache filled in {filled_s:.1f}s", flush=True)

    eager_ms = time_decode_ms(engine, EAGER_STEPS, warmup=2)
    engine.capture_cuda_graph(batch=1)
    graph_ms = time_decode_ms(engine, STEPS, WARMUP)
    print(f"  {label}: {graph_ms:.2f} ms/token (CUDA graph), {eager_ms:.2f} eager", flush=True)
    result = {
        "cache_gib": cache.nbytes / 2**30,
        "ms_per_token": graph_ms,
        "eager_ms_per_token": eager_ms,
        # Bytes the attention must read per step, all layers: the whole cache of this sequence.
        "cache_gb_per_s": CONTEXT * cache.bytes_per_token / graph_ms / 1e6,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    del engine, cache
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return result


def measure_ctx1m() -> tuple[list[dict], dict]:
    """Result rows ({"case", "impl", "metric", "value"}) and the summary of the 1M-context decode."""
    args = mla_flavors["1B_long"]
    started = time.perf_counter()
    model = build_model()
    print(
        f"1B_long (random bf16 weights) built in {time.perf_counter() - started:.1f}s", flush=True
    )
    measured = {label: measure_cache(model, fp8) for label, fp8 in (("bf16", False), ("fp8", True))}
    # Multi-head attention would cache a key and a value per head, layer and token.
    mha_gib = args.n_layers * 2 * args.n_heads * args.v_head_dim * CONTEXT * 2 / 2**30

    rows = [{"case": CASE, "impl": "mha_bf16_cache", "metric": "cache GiB", "value": mha_gib}]
    units = {
        "cache_gib": "cache GiB",
        "ms_per_token": "ms/token",
        "eager_ms_per_token": "ms/token eager",
        "cache_gb_per_s": "cache GB/s",
        "peak_gib": "peak GiB",
    }
    for label, result in measured.items():
        rows += [
            {"case": CASE, "impl": f"mla_{label}_cache", "metric": unit, "value": result[key]}
            for key, unit in units.items()
        ]
    summary = {
        "ctx1m_cache_gib": round(measured["bf16"]["cache_gib"], 3),
        "ctx1m_ms_per_token": round(measured["bf16"]["ms_per_token"], 3),
        "ctx1m_fp8_cache_gib": round(measured["fp8"]["cache_gib"], 3),
        "ctx1m_fp8_ms_per_token": round(measured["fp8"]["ms_per_token"], 3),
        "ctx1m_mha_cache_gib": mha_gib,
        "ctx1m_cache_contents": "random latents written directly (no 1M-token prefill)",
    }
    return rows, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_ctx1m.py needs a CUDA GPU")
    rows, summary = measure_ctx1m()
    for row in rows:
        print(f"{row['impl']:>16} {row['metric']:>15}: {row['value']:.3f}")
    print(summary)
    command = "COMMIT=$(git rev-parse HEAD) python benchmarks/bench_ctx1m.py"
    path = write_result("ctx1m", command, rows, summary, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
