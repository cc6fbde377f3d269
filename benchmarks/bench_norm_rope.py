"""RMSNorm and MLA RoPE Triton ops vs PyTorch (eager and torch.compile) on one GPU.

Every variant is checked against the float32 reference before it is timed. Timings are medians of
triton.testing.do_bench over a CUDA-graph replay of the variant (L2 flushed between repetitions), so
that they measure the kernels, not Python dispatch: the small shapes take a few microseconds, less
than one eager launch through a custom op. Bandwidth is counted as in ../shared/notes/STACK.md:
forward x read + y written + weight; forward+backward x, y, dy and dx once each; RoPE q, k_pe in and
out (and their gradients for forward+backward). Writes benchmarks/results/norm_rope-<gpu>.json (+ .md).

    COMMIT=$(git rev-parse HEAD) python benchmarks/bench_norm_rope.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import graph_time_ms, relative_error, write_result
from titan_mla.models.args import MLAModelArgs
from titan_mla.models.rope import rope_cos_sin
from titan_mla.ops.rmsnorm import rms_norm, rms_norm_reference
from titan_mla.ops.rope import mla_rope, mla_rope_reference

REPO = Path(__file__).resolve().parents[1]
NORM_SHAPES = [(16384, 2048), (32768, 4096), (8192, 512), (65536, 512)]
EPS = 1e-6
COPY_BYTES = 1 << 30


def median_ms(fn: Callable[[], object]) -> float:
    """fn captured in a CUDA graph after 3 warm-up calls (which also compile it), replays timed
    for 200 ms."""
    return graph_time_ms(fn, warmup_calls=3, rep_ms=200)


def assert_close(name: str, actual: tuple, expected: tuple, tolerance: float = 1e-2) -> None:
    for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
        error = relative_error(a, e)
        assert error <= tolerance, f"{name}: output {index} relative error {error:.2e}"


def copy_gbps() -> float:
    """Eager copy_ of 1 GiB (a graph would make it a memcpy node, which may take a copy engine)."""
    src = torch.randn(COPY_BYTES // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * COPY_BYTES / ms / 1e6


def kernel_copy_gbps(x: torch.Tensor) -> float:
    """An elementwise kernel's copy of x, timed as the variants are: the ceiling at x's size."""
    out = torch.empty_like(x)
    return 2 * x.numel() * x.element_size() / median_ms(lambda: torch.mul(x, 1, out=out)) / 1e6


def measure(
    rows: list[dict],
    case: str,
    impl: str,
    calls: tuple[Callable[[], tuple], Callable[[], tuple]],
    expected: tuple[tuple, tuple],
    nbytes: tuple[int, int],
) -> tuple[float, float]:
    """Check then time (forward, forward+backward) of one variant; appends its rows, returns ms."""
    times = []
    for call, reference, n, phase in zip(calls, expected, nbytes, ("fwd", "fwdbwd"), strict=True):
        assert_close(f"{case} {impl} {phase}", call(), reference)
        ms = median_ms(call)
        times.append(ms)
        rows += [
            {"case": f"{case}_{phase}", "impl": impl, "metric": "GB/s", "value": n / ms / 1e6},
            {"case": f"{case}_{phase}", "impl": impl, "metric": "us", "value": ms * 1e3},
        ]
    print(f"{case} {impl}: fwd {times[0] * 1e3:.1f} us, fwd+bwd {times[1] * 1e3:.1f} us")
    return times[0], times[1]


def rms_norm_calls(fn, x: torch.Tensor, weight: torch.Tensor, grad_y: torch.Tensor):
    """(forward, forward+backward) closures of one RMSNorm implementation."""
    x_leaf, weight_leaf = x.clone().requires_grad_(), weight.clone().requires_grad_()

    def forward() -> tuple:
        return (fn(x, weight, EPS),)

    def forward_backward() -> tuple:
        return torch.autograd.grad(fn(x_leaf, weight_leaf, EPS), (x_leaf, weight_leaf), grad_y)

    return forward, forward_backward


def f_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def float32_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm_reference(x.float(), weight.float(), eps)


def bench_rms_norm(rows: list[dict]) -> tuple[list[float], list[float], list[float]]:
    """Rows for every shape; returns per shape ours fwd GB/s, that over a same-size kernel copy's,
    and ours fwd+bwd speedup vs F."""
    impls = {
        "triton": rms_norm,
        "F.rms_norm": f_rms_norm,
        "compiled_reference": torch.compile(rms_norm_reference, dynamic=False),
    }
    fwd_gbps, fwd_fracs_of_same_size_copy, fwdbwd_speedups = [], [], []
    for n_rows, hidden in NORM_SHAPES:
        case = f"rmsnorm_{n_rows}x{hidden}_bf16"
        x = torch.randn(n_rows, hidden, device="cuda", dtype=torch.bfloat16)
        weight = torch.rand(hidden, device="cuda", dtype=torch.bfloat16) + 0.5
        grad_y = torch.randn_like(x)
        expected = tuple(call() for call in rms_norm_calls(float32_rms_norm, x, weight, grad_y))
        tensor_bytes = x.numel() * x.element_size()
        copy = kernel_copy_gbps(x)
        rows.append(
            {"case": f"{case}_copy", "impl": "torch.mul(x, 1)", "metric": "GB/s", "value": copy}
        )
        nbytes = (2 * tensor_bytes + weight.numel() * weight.element_size(), 4 * tensor_bytes)
        times = {
            impl: measure(rows, case, impl, rms_norm_calls(fn, x, weight, grad_y), expected, nbytes)
            for impl, fn in impls.items()
        }
        fwd_gbps.append(nbytes[0] / times["triton"][0] / 1e6)
        fwd_fracs_of_same_size_copy.append(fwd_gbps[-1] / copy)
        fwdbwd_speedups.append(times["F.rms_norm"][1] / times["triton"][1])
    return fwd_gbps, fwd_fracs_of_same_size_copy, fwdbwd_speedups


def rope_calls(fn, q, k_pe, rope_cache, grad_q_out, grad_k_pe_out):
    """(forward, forward+backward) closures of one MLA RoPE implementation."""
    q_leaf, k_pe_leaf = q.detach().requires_grad_(), k_pe.detach().requires_grad_()

    def forward() -> tuple:
        return fn(q, k_pe, rope_cache)

    def forward_backward() -> tuple:
        outputs = fn(q_leaf, k_pe_leaf, rope_cache)
        return torch.autograd.grad(outputs, (q_leaf, k_pe_leaf), (grad_q_out, grad_k_pe_out))

    return forward, forward_backward


def float32_mla_rope(q, k_pe, rope_cache):
    return mla_rope_reference(q.float(), k_pe.float(), rope_cache)


def bench_rope(rows: list[dict]) -> float:
    """The 1B model's shapes; returns ours fwd+bwd speedup vs the compiled reference."""
    args = MLAModelArgs()
    batch, seq_len = 4, args.max_seq_len
    case = f"mla_rope_b{batch}_s{seq_len}_h{args.n_heads}_bf16"
    rope_cache = rope_cos_sin(args, "cuda")
    q = torch.randn(batch, seq_len, args.n_heads, args.qk_head_dim, device="cuda")
    # k_pe is the tail of the latent projection's output, as in the model.
    kv = torch.randn(batch, seq_len, args.kv_lora_rank + args.qk_rope_head_dim, device="cuda")
    q, k_pe = q.bfloat16(), kv.bfloat16()[..., args.kv_lora_rank :]
    grads = torch.randn_like(q), torch.randn_like(k_pe)
    expected = tuple(call() for call in rope_calls(float32_mla_rope, q, k_pe, rope_cache, *grads))
    io_bytes = 2 * (q.numel() + k_pe.numel()) * q.element_size()
    impls = {
        "triton": mla_rope,
        "compiled_reference": torch.compile(mla_rope_reference, dynamic=False),
    }
    times = {
        impl: measure(
            rows,
            case,
            impl,
            rope_calls(fn, q, k_pe, rope_cache, *grads),
            expected,
            (io_bytes, 2 * io_bytes),
        )
        for impl, fn in impls.items()
    }
    return times["compiled_reference"][1] / times["triton"][1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_norm_rope.py needs a CUDA GPU")
    torch.manual_seed(0)
    # One static graph per shape and grad mode for the compiled references: more than the default.
    torch._dynamo.config.recompile_limit = 64

    copy = copy_gbps()
    rows = [{"case": "copy_1GiB_bf16", "impl": "torch.copy_", "metric": "GB/s", "value": copy}]
    print(f"device-to-device copy: {copy:.0f} GB/s")
    fwd_gbps, fwd_fracs_of_same_size_copy, fwdbwd_speedups = bench_rms_norm(rows)
    rope_speedup = bench_rope(rows)
    summary = {
        "copy_gbps": round(copy, 1),
        "rmsnorm_fwd_frac_of_copy_bw": round(min(fwd_gbps) / copy, 4),
        # Small shapes cannot reach the 1 GiB copy's bandwidth: a copy of the same bytes is the
        # ceiling there (8192x512 moves 16 MiB in about 11 us).
        "rmsnorm_fwd_frac_of_same_size_copy": round(min(fwd_fracs_of_same_size_copy), 4),
        "rmsnorm_fwdbwd_speedup_vs_F": round(min(fwdbwd_speedups), 4),
        "rope_fwdbwd_speedup_vs_compile": round(rope_speedup, 4),
        "goal_rmsnorm_fwd_ge_0.85_copy": min(fwd_gbps) / copy >= 0.85,
        "goal_rmsnorm_fwdbwd_ge_1.5x_F": min(fwdbwd_speedups) >= 1.5,
        "goal_rope_fwdbwd_faster_than_compile": rope_speedup > 1.0,
    }
    command = f"COMMIT=$(git rev-parse HEAD) python benchmarks/bench_norm_rope.py --out {args.out}"
    path = write_result("norm_rope", command, rows, summary, args.out)
    print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
