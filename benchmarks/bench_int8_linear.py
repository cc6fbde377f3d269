"""The 1B model's decode linears with int8 weights on one GPU: titan_mla's int8 kernels
(titan_mla::int8_weight_only_linear) vs torchao's int8 weight-only matmul compiled by Inductor vs
the bf16 matmul (cuBLAS, and compiled by Inductor as a decode step compiles it).

Shapes: every quantized nn.Linear of one block of the flavor plus the output head (wkv_b stays
bf16 in the quantized model), at 1 row (batch-1 decode) and 32 rows; the SwiGLU's w1 and w3 as one
case, silu(x w1^T) * (x w3^T), as a decode step runs them (titan_mla::int8_weight_only_swiglu;
Inductor fuses the pair into one reduction). Each variant runs over enough
copies of its weight (different random values) that they do not fit in L2, as consecutive layers
of a decode step do not, captured in one CUDA graph; time per call = replay / copies; GB/s = that
variant's weight bytes (int8 data + scales, or bf16) / time. Every variant is checked against the
float32 product of the dequantized weight before it is timed. Writes int8_linear-<gpu>.json (+ .md).

    COMMIT=$(git rev-parse HEAD) python benchmarks/bench_int8_linear.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import graph_time_ms, relative_error, write_result
from titan_mla.models import mla_flavors
from titan_mla.models.model import MLATransformer
from titan_mla.ops.int8_linear import (
    int8_weight_only_linear,
    int8_weight_only_linear_reference,
    int8_weight_only_swiglu,
    int8_weight_only_swiglu_reference,
)
from titan_mla.quantization import quantize_model
from titan_mla.quantization.schemes import DEFAULT_SKIP, weight_bytes

ROWS = (1, 32)
L2_FLUSH_BYTES = 256 * 2**20  # bf16 bytes of the copies per variant: well past H100's 50 MB L2
MAX_COPIES = 64
TOLERANCE = 1e-2  # bf16 outputs vs the float32 product of the same dequantized weights
SWIGLU = "feed_forward.w1+w3"  # the case of the SwiGLU's gate and up projections together


def decode_linears(flavor: str) -> dict[str, tuple[int, int]]:
    """(out, in) of the quantized linears of block 0 and of the output head, by module name, with
    w1 and w3 as the one SWIGLU case."""
    with torch.device("meta"):
        model = MLATransformer(mla_flavors[flavor])
    shapes = {
        name.removeprefix("layers.0."): (module.out_features, module.in_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and (name.startswith("layers.0.") or name == "output")
        and name.rsplit(".", 1)[-1] not in DEFAULT_SKIP
    }
    shapes[SWIGLU] = shapes.pop("feed_forward.w1")
    del shapes["feed_forward.w3"]
    return shapes


def swiglu_hidden(linear: Callable, x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    return F.silu(linear(x, gate)) * linear(x, up)


def int8_titan_mla(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return int8_weight_only_linear(x, weight.qdata, weight.scale)


def int8_titan_mla_swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return int8_weight_only_swiglu(x, gate.qdata, gate.scale, up.qdata, up.scale)


def bench_linear(name: str, n_out: int, n_in: int, rows: int) -> list[dict]:
    """One case; the SWIGLU case holds (gate, up) pairs of weights."""
    per_call = 2 if name == SWIGLU else 1
    copies = max(1, min(MAX_COPIES, math.ceil(L2_FLUSH_BYTES / (2 * per_call * n_out * n_in))))
    torch.manual_seed(n_out * n_in + rows)
    bf16 = nn.ModuleList(
        nn.Linear(n_in, n_out, bias=False, device="cuda", dtype=torch.bfloat16)
        for _ in range(copies * per_call)
    )
    # torchao's int8 weights, read by its matmul and by our op alike.
    int8 = copy.deepcopy(bf16)
    quantize_model(int8, "int8_weight_only", skip=(), torchao_matmuls_only=True)
    x = torch.randn(rows, n_in, device="cuda", dtype=torch.bfloat16)

    def over_copies(op: Callable, linears: nn.ModuleList) -> Callable[[], list[torch.Tensor]]:
        # The weights are graph inputs: one compiled graph serves every copy.
        weights = [module.weight for module in linears]
        calls = [weights[i : i + per_call] for i in range(0, len(weights), per_call)]
        return lambda: [op(x, *call) for call in calls]

    torch._dynamo.reset()
    if per_call == 1:
        ours, baseline = int8_titan_mla, F.linear
    else:
        ours, baseline = int8_titan_mla_swiglu, functools.partial(swiglu_hidden, F.linear)
    compiled = torch.compile(baseline, dynamic=False)
    variants = {
        "bf16_cublas": (over_copies(baseline, bf16), bf16),
        "bf16_inductor": (over_copies(compiled, bf16), bf16),
        "int8_torchao_inductor": (over_copies(compiled, int8), int8),
        "int8_titan_mla": (over_copies(ours, int8), int8),
    }
    int8_weights = [(m.weight.qdata, m.weight.scale) for m in int8[:per_call]]
    bf16_weights = [m.weight.float() for m in bf16[:per_call]]
    if per_call == 1:
        int8_expected = int8_weight_only_linear_reference(x.float(), *int8_weights[0])
        bf16_expected = x.float() @ bf16_weights[0].t()
    else:
        int8_expected = int8_weight_only_swiglu_reference(
            x.float(), *int8_weights[0], *int8_weights[1]
        )
        bf16_expected = swiglu_hidden(F.linear, x.float(), *bf16_weights)
    case = f"{name}_{n_out}x{n_in}_rows{rows}"
    results = []
    for impl, (fn, linears) in variants.items():
        with torch.no_grad():
            expected = int8_expected if impl.startswith("int8") else bf16_expected
            error = relative_error(fn()[0], expected)
            assert error <= TOLERANCE, (case, impl, error)
            ms = graph_time_ms(fn) / copies
        gbps = weight_bytes(linears[:per_call].parameters()) / ms / 1e6
        results += [
            {"case": case, "impl": impl, "metric": "us", "value": ms * 1e3},
            {"case": case, "impl": impl, "metric": "GB/s", "value": gbps},
        ]
        print(f"{case:34s} {impl:22s} {ms * 1e3:8.2f} us {gbps:7.0f} GB/s", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--flavor", default="1B")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_int8_linear.py needs a CUDA GPU")
    # As compile_decode_step does: without Inductor's CPU passes, which on CUDA would turn the
    # 32-row int8 matmul into ATen's fp32-loop _weight_int8pack_mm.
    torch.backends.mkldnn.enabled = False
    shapes = decode_linears(args.flavor)
    rows = [
        row
        for batch in ROWS
        for name, (n_out, n_in) in shapes.items()
        for row in bench_linear(name, n_out, n_in, batch)
    ]

    def total_us(impl: str, batch: int, names: list[str]) -> float:
        """Summed time of the named linears (one decode layer: every name but the head)."""
        return sum(
            row["value"]
            for row in rows
            for name in names
            if row["case"] == f"{name}_{shapes[name][0]}x{shapes[name][1]}_rows{batch}"
            and (row["impl"], row["metric"]) == (impl, "us")
        )

    layer = [name for name in shapes if name != "output"]
    summary = {}
    for batch in ROWS:
        ours = total_us("int8_titan_mla", batch, layer)
        for baseline in ("bf16_inductor", "bf16_cublas", "int8_torchao_inductor"):
            key = f"layer_rows{batch}_int8_speedup_vs_{baseline}"
            summary[key] = total_us(baseline, batch, layer) / ours
    summary["layer_linears"] = ", ".join(f"{n} {o}x{i}" for n, (o, i) in shapes.items())
    command = "COMMIT=$(git rev-parse HEAD) python benchmarks/bench_int8_linear.py " + " ".join(
        sys.argv[1:]
    )
    path = write_result("int8_linear", command, rows, summary, args.out)
    print(summary)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
