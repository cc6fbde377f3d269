"""The FP8-vs-INT8 deployment ablation: one checkpoint, several quantization variants, one table.

    python -m titan_mla.ablate --job.config_file train_configs/mla_1b.toml \\
        --checkpoint outputs/mla_1b/checkpoint --schemes bf16,int8_weight_only,fp8_rowwise --out DIR

Per variant (a scheme of titan_mla.quantization, optionally ``+fp8cache`` for the FP8 latent
cache), through the inference engine (MLAEngine) on a fresh copy of the model:

- held-out perplexity: the default corpus's validation split, the first ``--eval-tokens`` tokens
  in windows of ``--eval-seq-len``, scored by chunked prefill (so an FP8 cache counts);
- prefill tokens/s (``--prefill-batch`` prompts of ``--prefill-len`` tokens, median of repeats);
- decode tokens/s at each ``--decode-batches`` size after ``--decode-context`` prompt tokens, with
  the decode step compiled (torch.compile) and replayed as a CUDA graph on GPU;
- weight bytes (quantized data and scales) and, on GPU, peak memory;
- with ``--passkey-len L``: passkey retrieval accuracy through the variant's model and cache
  (titan_mla.longctx.eval, repeat haystack, prompts of L - 8 tokens at five depths, greedy), for a
  checkpoint trained on passkey data (e.g. train_configs/passkey_debug.toml);
- with ``--profile-decode``: each decode batch once more under torch.profiler, a trace that
  TensorBoard's profiler plugin reads (``<out>/profiles/<variant>_b<batch>/decode.pt.trace.json``)
  and the top ops beside it (``top_ops.txt``); on GPU the device kernel time and the kernel count
  per step join the table.

Writes ``quant_ablation-<gpu>.json`` and ``.md`` (shared/notes/BENCHMARKS.md format), a PNG plot
(with matplotlib) and TensorBoard scalars (``<out>/tb``) into ``--out``; with ``--mlflow`` each
variant is also an MLflow run of the experiment ``quant_ablation`` (titan_mla.tracking).
The job config and ``--section.key value`` overrides select the model as for training.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import gc
import importlib.util
import math
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

import titan_mla  # noqa: F401  (first: picks the device for torchtitan)
from titan_mla.data import builtin_documents
from titan_mla.inference import MLAEngine, PagedLatentCache
from titan_mla.inference.checkpoint import checkpoint_cli_parser
from titan_mla.inference.generator import Generator
from titan_mla.longctx.eval import ANSWER_ROOM, PASSKEY_DEPTHS, cache_seq_len, evaluate
from titan_mla.longctx.needles import NeedleGenerator
from titan_mla.models import MLATransformer
from titan_mla.quantization import (
    DEFAULT_SKIP,
    Variant,
    compile_decode_step,
    parse_variant,
    quantize_model,
    weight_bytes,
)

BENCHMARK = "quant_ablation"
MLFLOW_EXPERIMENT = "quant_ablation"
# Summary keys of issue 6: (key prefix, variant) -> {prefix}_decode_speedup, {prefix}_ppl_rel_delta.
SUMMARY_VARIANTS = {"int8wo": "int8_weight_only", "fp8_rowwise": "fp8_rowwise"}
BASELINE = "bf16"
PROFILE_STEPS = 16  # decode steps under the profiler (at most --decode-steps: what the cache holds)
# The decode step is captured in our own CUDA graphs: no mode that adds Inductor's.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


@dataclasses.dataclass
class Settings:
    eval_tokens: int = 8192
    eval_seq_len: int = 1024
    eval_batch: int = 4
    prefill_len: int = 2048
    prefill_batch: int = 1
    decode_batches: tuple[int, ...] = (1, 32)
    decode_context: int = 512
    decode_steps: int = 64
    repeats: int = 3
    compile: bool = True
    compile_mode: str = "default"  # torch.compile's mode for the decode step
    torchao_matmuls_only: bool = False  # no titan_mla decode kernels for quantized weights
    cuda_graph: bool = True
    profile_dir: Path | None = None  # profile each decode batch into this folder
    passkey_len: int = 0  # context length of the passkey score; 0: none
    passkey_samples: int = 10  # prompts per depth
    skip: tuple[str, ...] = DEFAULT_SKIP

    @property
    def max_seq_len(self) -> int:
        # Each decode pass starts from a fresh prefill: context + decode_steps tokens at most.
        return max(self.eval_seq_len, self.prefill_len, self.decode_context + self.decode_steps)

    @property
    def max_batch(self) -> int:
        return max(self.eval_batch, self.prefill_batch, *self.decode_batches)


@dataclasses.dataclass
class VariantResult:
    variant: str
    ppl: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: dict[int, float]  # batch -> tokens/s
    weight_bytes: int
    peak_memory_bytes: int | None  # None on CPU
    quantized_modules: int
    # Measurements that failed (e.g. "decode_b1" -> the error); the others are still reported.
    errors: dict[str, str] = dataclasses.field(default_factory=dict)
    # batch -> per decode step: device kernel ms and kernel count (GPU, --profile-decode)
    decode_profile: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)
    passkey_acc: float | None = None  # --passkey-len


def describe_error(err: Exception) -> str:
    """A failed measurement as the result file records it."""
    return f"{type(err).__name__}: {err}"[:2000]


def validation_tokens(tokenizer: Any, count: int) -> torch.Tensor:
    """The first ``count`` tokens of the default corpus's validation split, each text encoded as
    training encodes it (BOS ... EOS) and concatenated."""
    tokens: list[int] = []
    for text in builtin_documents("validation"):
        tokens += tokenizer.encode(text, add_bos=True, add_eos=True)
        if len(tokens) >= count:
            return torch.tensor(tokens[:count])
    raise ValueError(
        f"--eval-tokens {count} exceeds the {len(tokens)} tokens of the validation split"
    )


class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, fn: Callable[[], Any]) -> float:
        """Seconds ``fn`` takes, device work included."""
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def build_engine(model: MLATransformer, settings: Settings, fp8_cache: bool) -> MLAEngine:
    device = model.output.weight.device
    cache = PagedLatentCache.for_model(
        model.model_args,
        max_tokens=settings.max_batch * settings.max_seq_len,
        max_tokens_per_seq=settings.max_seq_len,
        max_seqs=settings.max_batch,
        dtype=model.tok_embeddings.weight.dtype,
        fp8=fp8_cache,
        device=device,
    )
    engine = MLAEngine(model, cache)
    if settings.compile:
        # Dynamo keys its cache on the code object every engine shares: without a reset, the ninth
        # (variant, batch) graph of a run passes the recompile limit and silently runs eagerly
        # (how fp8 weight-only decode once measured 0.14x bf16).
        torch._dynamo.reset()
        compile_decode_step(engine, mode=settings.compile_mode)
    return engine


def perplexity(engine: MLAEngine, tokens: torch.Tensor, settings: Settings) -> float:
    """exp(mean next-token cross-entropy) over windows of eval_seq_len tokens, scored through
    prefill (each window alone: no context from the window before)."""
    windows = tokens[: len(tokens) // settings.eval_seq_len * settings.eval_seq_len]
    windows = windows.view(-1, settings.eval_seq_len)
    total_nll, count = 0.0, 0
    for start in range(0, len(windows), settings.eval_batch):
        batch = windows[start : start + settings.eval_batch]
        seqs = list(range(len(batch)))
        try:
            logits = engine.prefill(batch.tolist(), seqs, all_logits=True)
        finally:
            for seq in seqs:
                engine.cache.free(seq)
        targets = batch[:, 1:].to(logits.device)
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().flatten(0, 1), targets.flatten(), reduction="sum"
        )
        total_nll += nll.item()
        count += targets.numel()
    return math.exp(total_nll / count)


def prompts_from(tokens: torch.Tensor, batch: int, length: int) -> list[list[int]]:
    """``batch`` prompts of ``length`` tokens, consecutive slices of tokens (wrapping around)."""
    needed = batch * length
    repeated = tokens.repeat(math.ceil(needed / len(tokens)))[:needed]
    return repeated.view(batch, length).tolist()


def prefill_throughput(
    engine: MLAEngine, tokens: torch.Tensor, settings: Settings, timer: Timer
) -> float:
    prompts = prompts_from(tokens, settings.prefill_batch, settings.prefill_len)
    seqs = list(range(len(prompts)))

    def run() -> None:
        engine.prefill(prompts, seqs)

    times = []
    for _ in range(settings.repeats + 1):  # the first is warm-up
        try:
            times.append(timer(run))
        finally:
            for seq in seqs:
                engine.cache.free(seq)
    return settings.prefill_batch * settings.prefill_len / statistics.median(times[1:])


@contextlib.contextmanager
def prefilled(
    engine: MLAEngine, prompts: list[list[int]]
) -> Iterator[tuple[torch.Tensor, list[int]]]:
    """Prefill ``prompts`` as sequences 0 .. n-1: yields their first greedy tokens and the
    sequences, and frees them on exit."""
    seqs = list(range(len(prompts)))
    try:
        yield engine.prefill(prompts, seqs).argmax(-1), seqs
    finally:
        for seq in seqs:
            engine.cache.free(seq)


def greedy_steps(engine: MLAEngine, next_tokens: torch.Tensor, seqs: list[int], steps: int) -> None:
    """``steps`` greedy decode steps of ``seqs``, starting from ``next_tokens``."""
    for _ in range(steps):
        next_tokens = engine.decode(next_tokens[:, None], seqs)[:, -1].argmax(-1)


def decode_throughput(
    engine: MLAEngine, tokens: torch.Tensor, batch: int, settings: Settings, timer: Timer
) -> float:
    """Greedy decode tokens/s of ``batch`` sequences after decode_context prompt tokens: a warm-up
    pass (compilation), then the timed pass, each from a fresh prefill."""
    if settings.cuda_graph and engine.device.type == "cuda":
        engine.capture_cuda_graph(batch)
    prompts = prompts_from(tokens, batch, settings.decode_context)
    rates = []
    for steps in (min(settings.decode_steps, 4), settings.decode_steps):
        with prefilled(engine, prompts) as (next_tokens, seqs):
            run = functools.partial(greedy_steps, engine, next_tokens, seqs, steps)
            rates.append(batch * steps / timer(run))
    return rates[-1]


def passkey_accuracy(
    model: MLATransformer, tokenizer: Any, fp8_cache: bool, settings: Settings
) -> float:
    """Passkey accuracy of a variant's model and cache kind: ``passkey_samples`` prompts of
    ``passkey_len - ANSWER_ROOM`` tokens at each of PASSKEY_DEPTHS, answered greedily through a
    generator of its own (eager decode, a cache sized for these prompts)."""
    prompt_tokens = settings.passkey_len - ANSWER_ROOM
    batch = max(1, min(settings.passkey_samples, 2**16 // settings.passkey_len))
    generator = Generator(
        model,
        tokenizer,
        max_batch=batch,
        max_seq_len=cache_seq_len([prompt_tokens]),
        fp8_cache=fp8_cache,
        cuda_graph=False,
    )
    needles = NeedleGenerator("passkey", "repeat", tokenizer=tokenizer)
    result = evaluate(
        generator,
        needles,
        [prompt_tokens],
        PASSKEY_DEPTHS,
        samples=settings.passkey_samples,
        batch=batch,
        log=lambda _: None,
    )
    return result["accuracy_overall"]


def profile_decode(
    engine: MLAEngine,
    tokens: torch.Tensor,
    batch: int,
    settings: Settings,
    timer: Timer,
    folder: Path,
) -> dict[str, float]:
    """PROFILE_STEPS decode steps of ``batch`` sequences under torch.profiler, run
    after ``decode_throughput`` (compiled and captured as measured): ``decode.pt.trace.json`` (the
    name TensorBoard's profiler plugin reads) and ``top_ops.txt`` in ``folder``. Returns, on GPU,
    the device kernel time (ms) and the number of kernels per step; on CPU nothing (the trace
    holds CPU ops only)."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = engine.device.type == "cuda"
    steps = min(PROFILE_STEPS, settings.decode_steps)
    prompts = prompts_from(tokens, batch, settings.decode_context)
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_gpu else [])]
    with prefilled(engine, prompts) as (next_tokens, seqs):
        timer.sync()  # the prefill stays out of the profile
        with profile(activities=activities) as profiler:
            timer(functools.partial(greedy_steps, engine, next_tokens, seqs, steps))
    folder.mkdir(parents=True, exist_ok=True)
    profiler.export_chrome_trace(str(folder / "decode.pt.trace.json"))
    sort_by = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    (folder / "top_ops.txt").write_text(
        profiler.key_averages().table(sort_by=sort_by, row_limit=25) + "\n"
    )
    if not on_gpu:
        return {}
    kernels = [e for e in profiler.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return {
        "kernel ms/step": sum(e.time_range.elapsed_us() for e in kernels) / steps / 1e3,
        "kernels/step": len(kernels) / steps,
    }


def measure_variant(
    base_model: MLATransformer,
    variant: Variant,
    tokens: torch.Tensor,
    settings: Settings,
    device: torch.device,
    log: Callable[[str], None] = print,
    tokenizer: Any = None,
) -> VariantResult:
    """Every figure of one variant, on its own copy of ``base_model`` moved to ``device`` (keep
    the base on the CPU: peak memory is then the variant's own)."""
    timer = Timer(device)
    # The earlier variant's compiled decode step holds its engine (model, cache, CUDA graphs) in
    # reference cycles: on H100 the int8 variant's peak included bf16's 3.4 GiB until this.
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = copy.deepcopy(base_model).to(device)
    quantized = quantize_model(
        model,
        variant.scheme,
        skip=settings.skip,
        torchao_matmuls_only=settings.torchao_matmuls_only,
    )
    engine = build_engine(model, settings, variant.fp8_cache)
    start = time.perf_counter()
    ppl = perplexity(engine, tokens, settings)
    log(f"   ppl {ppl:.4f} ({time.perf_counter() - start:.1f}s)")
    prefill = prefill_throughput(engine, tokens, settings, timer)
    log(f"   prefill {prefill:,.0f} tokens/s")
    decode, errors, profile = {}, {}, {}
    for batch in settings.decode_batches:
        start = time.perf_counter()
        try:
            decode[batch] = decode_throughput(engine, tokens, batch, settings, timer)
        except Exception as err:  # e.g. a batch size a quantized matmul cannot compile for
            errors[f"decode_b{batch}"] = describe_error(err)
            log(f"   decode batch {batch}: FAILED: {errors[f'decode_b{batch}']}")
            continue
        log(
            f"   decode batch {batch}: {decode[batch]:,.1f} tokens/s "
            f"({time.perf_counter() - start:.1f}s with compile/capture)"
        )
        if settings.profile_dir is not None:
            folder = settings.profile_dir / f"{variant.name}_b{batch}"
            profile[batch] = profile_decode(engine, tokens, batch, settings, timer, folder)
            log(f"   decode batch {batch} profiled: {profile[batch] or folder}")
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    passkey = None  # after the peak: its generator's cache is not the variant's
    if settings.passkey_len:
        start = time.perf_counter()
        passkey = passkey_accuracy(model, tokenizer, variant.fp8_cache, settings)
        log(
            f"   passkey at {settings.passkey_len}: {passkey:.0%} ({time.perf_counter() - start:.1f}s)"
        )
    return VariantResult(
        variant=variant.name,
        ppl=ppl,
        prefill_tokens_per_s=prefill,
        decode_tokens_per_s=decode,
        weight_bytes=weight_bytes(model.parameters()),
        peak_memory_bytes=peak,
        quantized_modules=len(quantized),
        errors=errors,
        decode_profile=profile,
        passkey_acc=passkey,
    )


def run_ablation(
    model: MLATransformer,
    tokenizer: Any,
    variants: Sequence[Variant],
    settings: Settings,
    device: torch.device,
    on_result: Callable[[VariantResult], None] | None = None,
    log: Callable[[str], None] = print,
    failures: dict[str, str] | None = None,
) -> list[VariantResult]:
    """Measure every variant of ``model`` (loaded, eval mode) on ``device``; ``on_result`` is
    called as each variant finishes. With ``failures``, a variant that raises is recorded there
    (name -> error), as is each failed measurement of the others ("name what" -> error), and the
    rest still runs: one scheme the stack cannot compile does not cost the whole ablation."""
    if any(variant.scheme.config is not None for variant in variants) and settings.compile:
        # The Inductor settings torchao recommends for quantized models, for every variant alike
        # (the baseline included), so that they compile the same way.
        from torchao.quantization.utils import recommended_inductor_config_setter

        recommended_inductor_config_setter()
    tokens = validation_tokens(tokenizer, settings.eval_tokens)
    results = []
    for i, variant in enumerate(variants, 1):
        log(f"== [{i}/{len(variants)}] {variant.name}: {variant.scheme.description}")
        try:
            result = measure_variant(model, variant, tokens, settings, device, log, tokenizer)
        except Exception as err:
            if failures is None:
                raise
            failures[variant.name] = describe_error(err)
            log(f"   FAILED: {failures[variant.name]}")
            continue
        if failures is not None:
            failures.update({f"{variant.name} {what}": e for what, e in result.errors.items()})
        if on_result is not None:
            on_result(result)
        results.append(result)
    return results


def result_rows(results: Sequence[VariantResult], settings: Settings) -> list[dict]:
    """Rows of the BENCHMARKS.md result file: (case, impl = variant, metric, value)."""
    rows = []
    for r in results:
        figures = [
            (f"validation_{settings.eval_tokens}tok", "ppl", r.ppl),
            (
                f"prefill_b{settings.prefill_batch}_len{settings.prefill_len}",
                "tokens/s",
                r.prefill_tokens_per_s,
            ),
            *(
                (f"decode_b{batch}_ctx{settings.decode_context}", "tokens/s", rate)
                for batch, rate in r.decode_tokens_per_s.items()
            ),
            *(
                (f"decode_b{batch}_ctx{settings.decode_context}", metric, value)
                for batch, figures in r.decode_profile.items()
                for metric, value in figures.items()
            ),
            ("weights", "MiB", r.weight_bytes / 2**20),
        ]
        if r.peak_memory_bytes is not None:
            figures.append(("peak_memory", "GiB", r.peak_memory_bytes / 2**30))
        if r.passkey_acc is not None:
            figures.append((f"passkey_len{settings.passkey_len}", "accuracy", r.passkey_acc))
        rows += [
            {"case": case, "impl": r.variant, "metric": metric, "value": value}
            for case, metric, value in figures
        ]
    return rows


def summary(results: Sequence[VariantResult]) -> dict[str, float | None]:
    """Ratios against the bf16 variant measured in the same run: ``<key>_decode_speedup`` (batch-1
    decode), ``<key>_decode_b<N>_speedup`` (other batches) and ``<key>_ppl_rel_delta``
    (ppl / bf16 ppl - 1) for each variant of SUMMARY_VARIANTS that ran; with the passkey score,
    ``passkey_acc`` of every variant."""
    by_name = {r.variant: r for r in results}
    baseline = by_name.get(BASELINE)
    out: dict[str, float | None] = {}
    if baseline is None:
        return out
    for key, name in SUMMARY_VARIANTS.items():
        ours = by_name.get(name)
        if ours is None:
            continue
        for batch, rate in ours.decode_tokens_per_s.items():
            if batch not in baseline.decode_tokens_per_s:
                continue
            suffix = "" if batch == 1 else f"_b{batch}"
            out[f"{key}_decode{suffix}_speedup"] = round(
                rate / baseline.decode_tokens_per_s[batch], 4
            )
        out[f"{key}_ppl_rel_delta"] = round(ours.ppl / baseline.ppl - 1, 6)
    passkey = {r.variant: r.passkey_acc for r in results if r.passkey_acc is not None}
    if passkey:
        out["passkey_acc"] = passkey
    return out


def plot(results: Sequence[VariantResult], path: Path) -> Path | None:
    """Bar charts of ppl, decode tokens/s per batch and weight MiB per variant; None (and a
    printed note) when matplotlib is not installed."""
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed: no PNG plot (pip install matplotlib)")
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.variant for r in results]
    panels = [("held-out perplexity", [r.ppl for r in results])]
    for batch in sorted({batch for r in results for batch in r.decode_tokens_per_s}):
        rates = [r.decode_tokens_per_s.get(batch, math.nan) for r in results]  # failed: no bar
        panels.append((f"decode tokens/s, batch {batch}", rates))
    panels.append(("weights (MiB)", [r.weight_bytes / 2**20 for r in results]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.5))
    for ax, (title, values) in zip(axes, panels, strict=True):
        ax.bar(names, values, color=["tab:gray" if n == BASELINE else "tab:blue" for n in names])
        ax.set_title(title)
        ax.tick_params(axis="x", labelrotation=60)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def variant_metrics(result: VariantResult) -> dict[str, float]:
    """A variant's figures as MLflow metric names."""
    metrics = {
        "ppl": result.ppl,
        "prefill_tokens_per_s": result.prefill_tokens_per_s,
        "weight_MiB": result.weight_bytes / 2**20,
        "quantized_modules": float(result.quantized_modules),
    }
    for batch, rate in result.decode_tokens_per_s.items():
        metrics[f"decode_b{batch}_tokens_per_s"] = rate
    if result.peak_memory_bytes is not None:
        metrics["peak_memory_GiB"] = result.peak_memory_bytes / 2**30
    if result.passkey_acc is not None:
        metrics["passkey_acc"] = result.passkey_acc
    return metrics


def log_mlflow(result: VariantResult, params: dict[str, Any], tracking_uri: str | None) -> None:
    import mlflow

    from titan_mla.tracking import start_variant_run

    with start_variant_run(
        MLFLOW_EXPERIMENT, result.variant, {**params, "variant": result.variant}, tracking_uri
    ):
        mlflow.log_metrics(variant_metrics(result))


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    defaults = Settings()
    parser = checkpoint_cli_parser("python -m titan_mla.ablate", __doc__.splitlines()[0])
    parser.add_argument(
        "--schemes",
        default="bf16,int8_weight_only,int8_dynamic",
        help="comma-separated variants: a scheme, or <scheme>+fp8cache; bf16 is the baseline",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the results")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--eval-tokens", type=int, default=defaults.eval_tokens)
    parser.add_argument("--eval-seq-len", type=int, default=defaults.eval_seq_len)
    parser.add_argument("--eval-batch", type=int, default=defaults.eval_batch)
    parser.add_argument("--prefill-len", type=int, default=defaults.prefill_len)
    parser.add_argument("--prefill-batch", type=int, default=defaults.prefill_batch)
    parser.add_argument(
        "--decode-batches", default=",".join(map(str, defaults.decode_batches)), help="e.g. 1,32"
    )
    parser.add_argument("--decode-context", type=int, default=defaults.decode_context)
    parser.add_argument("--decode-steps", type=int, default=defaults.decode_steps)
    parser.add_argument("--repeats", type=int, default=defaults.repeats)
    parser.add_argument("--no-compile", action="store_true", help="decode eagerly")
    parser.add_argument(
        "--compile-mode",
        choices=COMPILE_MODES,
        default=defaults.compile_mode,
        help="torch.compile mode of the decode step (max-autotune: Triton GEMM templates that "
        "read int8/fp8 weights directly; minutes more compilation)",
    )
    parser.add_argument(
        "--torchao-matmuls-only",
        action="store_true",
        help="quantized matmuls exactly as torchao runs them (no titan_mla int8 decode kernel)",
    )
    parser.add_argument("--no-cuda-graph", action="store_true")
    parser.add_argument(
        "--passkey-len",
        type=int,
        default=defaults.passkey_len,
        help="score passkey retrieval at this context length (a passkey-trained checkpoint)",
    )
    parser.add_argument("--passkey-samples", type=int, default=defaults.passkey_samples)
    parser.add_argument(
        "--profile-decode",
        action="store_true",
        help="profile each decode batch: TensorBoard traces and top ops under <out>/profiles",
    )
    parser.add_argument(
        "--skip-modules",
        default=",".join(DEFAULT_SKIP),
        help="nn.Linear names left unquantized (last name part, e.g. wkv_b,output)",
    )
    parser.add_argument("--mlflow", action="store_true", help="log each variant as an MLflow run")
    parser.add_argument("--mlflow-uri", help="tracking URI; default: sqlite under --out")
    return parser.parse_known_args(argv)


def main(argv: Sequence[str] | None = None, command: str | None = None) -> list[VariantResult]:
    """The CLI; ``command`` is what the result file names as the command that reproduces it
    (default: this module's command line)."""
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    prog = "titan_mla.ablate"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        variants = [parse_variant(name, device) for name in args.schemes.split(",") if name]
        settings = Settings(
            eval_tokens=args.eval_tokens,
            eval_seq_len=args.eval_seq_len,
            eval_batch=args.eval_batch,
            prefill_len=args.prefill_len,
            prefill_batch=args.prefill_batch,
            decode_batches=tuple(int(b) for b in args.decode_batches.split(",")),
            decode_context=args.decode_context,
            decode_steps=args.decode_steps,
            repeats=args.repeats,
            compile=not args.no_compile,
            compile_mode=args.compile_mode,
            torchao_matmuls_only=args.torchao_matmuls_only,
            profile_dir=args.out / "profiles" if args.profile_decode else None,
            passkey_len=args.passkey_len,
            passkey_samples=args.passkey_samples,
            cuda_graph=not args.no_cuda_graph,
            skip=tuple(name for name in args.skip_modules.split(",") if name),
        )
        if args.mlflow:
            from titan_mla.tracking import require_mlflow

            require_mlflow()
        generator = Generator.from_checkpoint(
            args.config_file,
            args.checkpoint,
            overrides=overrides,
            device=device,
            max_batch=1,
            max_seq_len=64,
            cuda_graph=False,
        )
    except (FileNotFoundError, ValueError, ImportError) as err:
        sys.exit(f"{prog}: error: {err}")

    args.out.mkdir(parents=True, exist_ok=True)
    params = {
        "checkpoint": str(Path(args.checkpoint).resolve()),
        "config_file": args.config_file,
        "overrides": " ".join(overrides),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        **{f"settings.{k}": v for k, v in dataclasses.asdict(settings).items()},
    }
    mlflow_uri = args.mlflow_uri or f"sqlite:///{(args.out / 'mlflow' / 'mlflow.db').resolve()}"
    command = command or shlex.join(
        ["python", "-m", "titan_mla.ablate", *(sys.argv[1:] if argv is None else argv)]
    )
    results: list[VariantResult] = []
    failures: dict[str, str] = {}

    def on_result(result: VariantResult) -> None:
        results.append(result)
        # The result file is rewritten after every variant: a run cut short keeps what it
        # measured (the plot and TensorBoard scalars follow once, at the end).
        write_result_file(results, settings, args.out, command, failures)
        if args.mlflow:
            log_mlflow(result, params, mlflow_uri)

    # The base model waits on the CPU; each variant copies it to the device.
    model, tokenizer = generator.model.to("cpu"), generator.tokenizer
    del generator  # and its small cache: each variant builds its own engine
    run_ablation(model, tokenizer, variants, settings, device, on_result, failures=failures)
    json_path = write_outputs(results, settings, args.out, command, failures)
    print(json_path.with_suffix(".md").read_text())
    if failures:
        sys.exit(f"{prog}: {len(failures)} measurement(s) failed: {', '.join(failures)}")
    return results


def write_result_file(
    results: Sequence[VariantResult],
    settings: Settings,
    out: Path,
    command: str,
    failures: dict[str, str] | None = None,
) -> Path:
    """The result file and its markdown table; ``failures`` (what -> error) go into the summary.
    Returns the JSON path."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.common import write_result

    figures = {**summary(results), **({"failures": failures} if failures else {})}
    return write_result(BENCHMARK, command, result_rows(results, settings), figures, out)


def write_outputs(
    results: Sequence[VariantResult],
    settings: Settings,
    out: Path,
    command: str,
    failures: dict[str, str] | None = None,
) -> Path:
    """``write_result_file``, then the PNG plot and the TensorBoard scalars (``out/tb``);
    returns the JSON path."""
    from titan_mla.tensorboard import log_result_file

    path = write_result_file(results, settings, out, command, failures)
    plot(results, path.with_suffix(".png"))
    log_result_file(path, out / "tb")
    return path


if __name__ == "__main__":
    main()
