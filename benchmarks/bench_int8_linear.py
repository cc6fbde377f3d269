"""The 1B model's decode linears with int8 weights on one GPU: titan_mla's int8 kernels
(titan_mla::int8_weight_only_linear) vs torchao's int8 weight-only matmul compiled by Inductor vs
the bf16 matmul (cuBLAS, and compiled by Inductor as a decode step compiles it).

Cases: the quantized linears of one block of the flavor (wkv_b stays bf16 in the quantized model)
as a decode step runs them, plus the output head, at 1 row (batch-1 decode) and 32 rows: the
attention's wq and wkv_a of the same input together (titan_mla::int8_weight_only_concat_linear),
the SwiGLU's w1 and w3 as silu(x w1^T) * (x w3^T) (titan_mla::int8_weight_only_swiglu; Inductor
fuses either pair into one kernel), the rest alone. Each variant runs over enough
copies of its weights (different random values) that they do not fit in L2, as consecutive layers
of a decode step do not, captured in one CUDA graph; time per call = replay / copies; GB/s = that
variant's weight bytes (int8 data + scales, or bf16) / time. Every variant is checked against the
float32 product of the dequantized weights before it is timed. Writes int8_linear-<gpu>.json (+ .md).

    COMMIT=$(git rev-parse HEAD) python benchmarks/bench_int8_linear.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import graph_time_ms, relative_error, write_result
from titan_mla.models import mla_flavors
from titan_mla.models.model import MLATransformer
from titan_mla.ops.int8_linear import (
    int8_weight_only_concat_linear,
    int8_weight_only_concat_linear_reference,
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


@dataclass(frozen=True)
class Case:
    """Linears of one input: their (out, in) shapes and how their outputs combine."""

    name: str
    shapes: tuple[tuple[int, int], ...]
    combine: str = "one"  # "one" linear, "concat" outputs, or "swiglu" (gate, up)

    def label(self, rows: int) -> str:
        outs = "+".join(str(n_out) for n_out, _ in self.shapes)
        return f"{self.name}_{outs}x{self.shapes[0][1]}_rows{rows}"


def decode_cases(flavor: str) -> list[Case]:
    """The quantized linears of block 0 and the output head, paired as a decode step runs them."""
    with torch.device("meta"):
        model = MLATransformer(mla_flavors[flavor])
    shapes = {
        name.removeprefix("layers.0."): (module.out_features, module.in_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and (name.startswith("layers.0.") or name == "output")
        and name.rsplit(".", 1)[-1] not in DEFAULT_SKIP
    }
    pairs = {"attention.wq+wkv_a": "concat", "feed_forward.w1+w3": "swiglu"}
    cases = []
    for name, combine in pairs.items():
        module, linears = name.split(".")
        members = [f"{module}.{linear}" for linear in linears.split("+")]
        cases.append(Case(name, tuple(shapes.pop(member) for member in members), combine))
    return cases + [Case(name, (shape,)) for name, shape in shapes.items()]


def combined(linear: Callable, combine: str) -> Callable[..., torch.Tensor]:
    """The case's computation from one linear function (x, weight) -> x @ weight^T."""

    def one(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return linear(x, weight)

    def concat(x: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return torch.cat([linear(x, first), linear(x, second)], dim=-1)

    def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.silu(linear(x, gate)) * linear(x, up)

    return {"one": one, "concat": concat, "swiglu": swiglu}[combine]


# titan_mla's int8 op of each way of combining, and its reference.
INT8_OPS = {
    "one": (int8_weight_only_linear, int8_weight_only_linear_reference),
    "concat": (int8_weight_only_concat_linear, int8_weight_only_concat_linear_reference),
    "swiglu": (int8_weight_only_swiglu, int8_weight_only_swiglu_reference),
}


def int8_titan_mla(combine: str) -> Callable[..., torch.Tensor]:
    op, _ = INT8_OPS[combine]
    return lambda x, *weights: op(x, *(t for w in weights for t in (w.qdata, w.scale)))


def bench_case(case: Case, rows: int) -> list[dict]:
    per_call = len(case.shapes)
    call_bytes = sum(2 * n_out * n_in for n_out, n_in in case.shapes)
    copies = max(1, min(MAX_COPIES, math.ceil(L2_FLUSH_BYTES / call_bytes)))
    torch.manual_seed(call_bytes + rows)
    n_in = case.shapes[0][1]
    bf16 = nn.ModuleList(
        nn.Linear(n_in, n_out, bias=False, device="cuda", dtype=torch.bfloat16)
        for _ in range(copies)
        for n_out, _ in case.shapes
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
    baseline = combined(F.linear, case.combine)
    compiled = torch.compile(baseline, dynamic=False)
    variants = {
        "bf16_cublas": (over_copies(baseline, bf16), bf16),
        "bf16_inductor": (over_copies(compiled, bf16), bf16),
        "int8_torchao_inductor": (over_copies(compiled, int8), int8),
        "int8_titan_mla": (over_copies(int8_titan_mla(case.combine), int8), int8),
    }
    int8_weights = [t for m in int8[:per_call] for t in (m.weight.qdata, m.weight.scale)]
    _, reference = INT8_OPS[case.combine]
    int8_expected = reference(x.float(), *int8_weights)
    bf16_expected = baseline(x.float(), *(m.weight.float() for m in bf16[:per_call]))
    label = case.label(rows)
    results = []
    for impl, (fn, linears) in variants.items():
        with torch.no_grad():
            expected = int8_expected if impl.startswith("int8") else bf16_expected
            error = relative_error(fn()[0], expected)
            assert error <= TOLERANCE, (label, impl, error)
            ms = graph_time_ms(fn) / copies
        gbps = weight_bytes(linears[:per_call].parameters()) / ms / 1e6
        results += [
            {"case": label, "impl": impl, "metric": "us", "value": ms * 1e3},
            {"case": label, "impl": impl, "metric": "GB/s", "value": gbps},
        ]
        print(f"{label:40s} {impl:22s} {ms * 1e3:8.2f} us {gbps:7.0f} GB/s", flush=True)
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
    cases = decode_cases(args.flavor)
    rows = [row for batch in ROWS for case in cases for row in bench_case(case, batch)]

    def total_us(impl: str, batch: int, layer: list[Case]) -> float:
        """Summed time of the cases of one decode layer."""
        labels = {case.label(batch) for case in layer}
        return sum(
            row["value"]
            for row in rows
            if row["case"] in labels and (row["impl"], row["metric"]) == (impl, "us")
        )

    layer = [case for case in cases if case.name != "output"]
    summary = {}
    for batch in ROWS:
        ours = total_us("int8_titan_mla", batch, layer)
        for baseline in ("bf16_inductor", "bf16_cublas", "int8_torchao_inductor"):
            key = f"layer_rows{batch}_int8_speedup_vs_{baseline}"
            summary[key] = total_us(baseline, batch, layer) / ours
    summary["layer_linears"] = ", ".join(case.label(1).removesuffix("_rows1") for case in layer)
    command = "COMMIT=$(git rev-parse HEAD) python benchmarks/bench_int8_linear.py " + " ".join(
        sys.argv[1:]
    )
    path = write_result("int8_linear", command, rows, summary, args.out)
    print(summary)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
