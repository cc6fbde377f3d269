"""Deployment quantization (titan_mla.quantization) and the FP8-vs-INT8 ablation runner
(titan_mla.ablate) on CPU with small models: int8 schemes really quantize, stay close to the
unquantized model through the training forward, the inference engine and torch.compile; unknown
or unsupported schemes are clear errors; the runner writes its table, JSON, plot, TensorBoard
scalars and one MLflow run per variant."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from expecttest import assert_expected_inline
from helpers import REPO

from titan_mla import ablate
from titan_mla.inference import MLAEngine, PagedLatentCache
from titan_mla.models import MLATransformer, mla_flavors
from titan_mla.ops import dispatch
from titan_mla.quantization import (
    SCHEMES,
    compile_decode_step,
    is_quantized,
    parse_variant,
    quantize_model,
    supported_schemes,
    weight_bytes,
)

TINY = dataclasses.replace(mla_flavors["debugmodel"], n_layers=2, kernels="torch")
INT8_SCHEMES = ["int8_weight_only", "int8_dynamic"]
# Measured on the tiny model: the largest logit moves by 0.4% (weight-only) and 0.8% (dynamic
# activations too) of the largest logit magnitude.
LOGIT_TOLERANCE = {"int8_weight_only": 0.01, "int8_dynamic": 0.02}


@pytest.fixture(autouse=True)
def restore_inductor_config():
    """torchao's quantize_ sets process-wide Inductor options; keep them out of other tests."""
    saved = torch._inductor.config.save_config()
    yield
    torch._inductor.config.load_config(saved)


@pytest.fixture
def reference_decode(monkeypatch):
    """The decode op's PyTorch reference instead of the interpreted kernel (same semantics)."""
    monkeypatch.setattr(dispatch, "KERNELS_INTERPRETED", False)


def tiny_model() -> MLATransformer:
    torch.manual_seed(0)
    model = MLATransformer(TINY)
    with torch.no_grad():
        model.init_weights()
    return model.eval()


def tokens(*shape: int) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, shape, generator=torch.Generator().manual_seed(1))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("scheme", INT8_SCHEMES)
def test_int8_schemes_quantize_every_linear_but_wkv_b(scheme):
    model = tiny_model()
    x = tokens(2, 24)
    with torch.no_grad():
        expected = model(x)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantized = quantize_model(model, scheme)

    assert sorted(quantized) == sorted(n for n in linears if not n.endswith("wkv_b"))
    for name, linear in linears.items():
        assert is_quantized(linear.weight) == (name in quantized), name
        if name in quantized:
            assert linear.weight.qdata.dtype == torch.int8
            assert linear.weight.scale.shape == (linear.out_features, 1)  # per output channel
    # Quantized linears: 1 byte per weight, a 4-byte scale and a 1-byte zero point per row (torchao
    # keeps one, 0, even for symmetric int8); the rest stays fp32.
    params = dict(model.named_parameters())
    expected_bytes = sum(
        p.numel() + 5 * p.shape[0] if name.removesuffix(".weight") in quantized else 4 * p.numel()
        for name, p in params.items()
    )
    assert weight_bytes(model.parameters()) == expected_bytes

    with torch.no_grad():
        actual = model(x)
    assert 0 < relative_error(actual, expected) < LOGIT_TOLERANCE[scheme]


def test_quantized_model_through_engine_and_compile_matches_its_forward(reference_decode):
    """The engine's prefill and its absorbed decode step compiled by torch.compile (one graph:
    mla_decode is an opaque op inside it) compute the quantized model's own logits."""
    model = tiny_model()
    quantize_model(model, "int8_weight_only")
    sequence = tokens(1, 20)
    with torch.no_grad():
        expected = model(sequence)[0]

    cache = PagedLatentCache.for_model(TINY, max_tokens=64, page_size=16, dtype=torch.float32)
    engine = MLAEngine(model, cache)
    compile_decode_step(engine, backend="aot_eager", fullgraph=True)
    logits = [engine.prefill([sequence[0, :16].tolist()], [0], all_logits=True)[0]]
    for position in range(16, 20):
        logits.append(engine.decode(sequence[:, position : position + 1], [0])[0])
    assert relative_error(torch.cat(logits), expected) < 1e-5


def test_each_variant_starts_without_the_earlier_variants_models(monkeypatch, reference_decode):
    """Peak memory is each variant's own: when a variant's copy is quantized, no earlier copy
    (held by its compiled decode step, with its cache) is alive."""
    monkeypatch.setattr(
        ablate,
        "compile_decode_step",
        lambda engine, mode: compile_decode_step(engine, backend="aot_eager", fullgraph=True),
    )
    earlier_models = []
    quantize = ablate.quantize_model

    def quantize_first_alone(model, *args, **kwargs):
        assert [model() for model in earlier_models] == [None] * len(earlier_models)
        earlier_models.append(weakref.ref(model))
        return quantize(model, *args, **kwargs)

    monkeypatch.setattr(ablate, "quantize_model", quantize_first_alone)
    settings = ablate.Settings(
        eval_tokens=64, eval_seq_len=32, eval_batch=1, prefill_len=16, decode_batches=(1,),
        decode_context=8, decode_steps=2, repeats=1, cuda_graph=False,
    )  # fmt: skip
    base, device = tiny_model(), torch.device("cpu")
    for name in ("bf16", "int8_weight_only", "bf16"):
        variant = parse_variant(name, device)
        ablate.measure_variant(base, variant, tokens(64), settings, device, log=lambda _: None)
    assert len(earlier_models) == 3


def test_unknown_and_unsupported_schemes_are_clear_errors():
    def error(name: str) -> str:
        with pytest.raises(ValueError) as raised:
            parse_variant(name, "cpu")
        return str(raised.value)

    assert_expected_inline(
        error("int4"),
        """unknown quantization scheme 'int4'; supported on cpu: bf16, int8_weight_only, int8_dynamic (each also as <scheme>+fp8cache: FP8 latent cache)""",
    )
    assert_expected_inline(
        error("fp8_rowwise+fp8cache"),
        """quantization scheme 'fp8_rowwise' needs a CUDA GPU of compute capability 8.9+ (float8 matmuls); supported on cpu: bf16, int8_weight_only, int8_dynamic (each also as <scheme>+fp8cache: FP8 latent cache)""",
    )
    variant = parse_variant("int8_dynamic+fp8cache", "cpu")
    assert (variant.scheme.name, variant.fp8_cache, variant.name) == (
        "int8_dynamic",
        True,
        "int8_dynamic+fp8cache",
    )
    assert supported_schemes("cpu") == ["bf16", *INT8_SCHEMES]
    assert len(SCHEMES) == 6


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed")
def run_tiny_ablation(
    tmp_path, schemes: str, decode_batches: str, *options: str
) -> tuple[MLATransformer, Path]:
    """Save a debugmodel checkpoint and run the ablation CLI over it at tiny sizes, eagerly;
    returns the model and the output folder."""
    torch.manual_seed(0)
    model = MLATransformer(mla_flavors["debugmodel"])
    with torch.no_grad():
        model.init_weights()
    dcp.save(model.state_dict(), checkpoint_id=tmp_path / "checkpoint" / "step-1")
    out = tmp_path / "out"
    ablate.main([
        "--job.config_file", str(REPO / "train_configs" / "debug_model.toml"),
        "--model.kernels=torch", "--checkpoint", str(tmp_path / "checkpoint"),
        "--schemes", schemes, "--out", str(out),
        "--eval-tokens", "256", "--eval-seq-len", "128", "--eval-batch", "2",
        "--prefill-len", "16", "--decode-batches", decode_batches, "--decode-context", "8",
        "--decode-steps", "2", "--repeats", "1", "--no-compile", *options,
    ])  # fmt: skip
    return model, out


def test_ablation_cli_writes_table_json_plot_tensorboard_and_mlflow(tmp_path, reference_decode):
    model, out = run_tiny_ablation(tmp_path, "bf16,int8_weight_only,bf16+fp8cache", "1", "--mlflow")

    [json_path] = out.glob("quant_ablation-*.json")
    result = json.loads(json_path.read_text())
    rows = {(r["case"], r["impl"], r["metric"]): r["value"] for r in result["rows"]}
    variants = ["bf16", "int8_weight_only", "bf16+fp8cache"]
    assert sorted({impl for _, impl, _ in rows}) == sorted(variants)
    ppl = {v: rows[("validation_256tok", v, "ppl")] for v in variants}
    for v in variants:
        assert math.isfinite(ppl[v]) and ppl[v] > 1
        for case in ("prefill_b1_len16", "decode_b1_ctx8"):
            assert rows[(case, v, "tokens/s")] > 0
    # Random weights: near-uniform predictions over the 8192-token vocabulary.
    assert 2000 < ppl["bf16"] < 50000
    assert abs(ppl["int8_weight_only"] / ppl["bf16"] - 1) < 0.01
    assert abs(ppl["bf16+fp8cache"] / ppl["bf16"] - 1) < 0.01
    assert ppl["bf16+fp8cache"] != ppl["bf16"]  # the cache really is FP8
    weights = {v: rows[("weights", v, "MiB")] for v in variants}
    assert (
        weights["bf16"]
        == weights["bf16+fp8cache"]
        == pytest.approx(weight_bytes(model.parameters()) / 2**20)
    )
    assert 0.3 < weights["int8_weight_only"] / weights["bf16"] < 0.6
    summary = result["summary"]
    assert summary["int8wo_ppl_rel_delta"] == pytest.approx(
        ppl["int8_weight_only"] / ppl["bf16"] - 1, abs=1e-6
    )
    assert summary["int8wo_decode_speedup"] == pytest.approx(
        rows[("decode_b1_ctx8", "int8_weight_only", "tokens/s")]
        / rows[("decode_b1_ctx8", "bf16", "tokens/s")],
        abs=5e-5,  # the summary keeps 4 decimals
    )
    assert (
        "| validation_256tok | int8_weight_only | ppl |" in json_path.with_suffix(".md").read_text()
    )
    assert json_path.with_suffix(".png").stat().st_size > 1000
    assert any((out / "tb" / json_path.stem).glob("events.out.tfevents.*"))

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(ablate.MLFLOW_EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(run.info.run_name for run in runs) == sorted(variants)
    for run in runs:
        assert run.data.metrics["ppl"] == pytest.approx(ppl[run.info.run_name])
        assert run.data.params["variant"] == run.info.run_name
        assert run.info.status == "FINISHED"


@pytest.mark.usefixtures("cpu_reference_branch")  # the kernels' numerics are tested elsewhere
def test_passkey_column_scores_each_variant_through_its_own_cache_kind(tmp_path, monkeypatch):
    seen = []

    def evaluate_and_record(generator, needles, lengths, depths, **kwargs):
        result = evaluate(generator, needles, lengths, depths, **kwargs)
        seen.append((generator.engine.cache.fp8, lengths, depths, result["accuracy_overall"]))
        return result

    evaluate = ablate.evaluate
    monkeypatch.setattr(ablate, "evaluate", evaluate_and_record)
    _, out = run_tiny_ablation(
        tmp_path, "bf16,bf16+fp8cache", "1", "--passkey-len", "96", "--passkey-samples", "2"
    )
    depths = [0.0, 0.25, 0.5, 0.75, 1.0]
    # Prompts of 96 - 8 tokens; the second variant's generator has an FP8 cache.
    assert [(fp8, lengths, d) for fp8, lengths, d, _ in seen] == [
        (False, [88], depths),
        (True, [88], depths),
    ]
    [json_path] = out.glob("quant_ablation-*.json")
    result = json.loads(json_path.read_text())
    rows = {(r["case"], r["impl"], r["metric"]): r["value"] for r in result["rows"]}
    for (*_, accuracy), variant in zip(seen, ["bf16", "bf16+fp8cache"], strict=True):
        assert rows[("passkey_len96", variant, "accuracy")] == accuracy
        assert result["summary"]["passkey_acc"][variant] == accuracy


def test_profile_decode_writes_a_tensorboard_trace_and_top_ops_per_variant_and_batch(tmp_path):
    _, out = run_tiny_ablation(tmp_path, "bf16,int8_weight_only", "1,2", "--profile-decode")
    runs = sorted(path.name for path in (out / "profiles").iterdir())
    assert runs == ["bf16_b1", "bf16_b2", "int8_weight_only_b1", "int8_weight_only_b2"]
    for run in runs:
        trace = json.loads((out / "profiles" / run / "decode.pt.trace.json").read_text())
        names = {event.get("name") for event in trace["traceEvents"]}
        assert "titan_mla::mla_decode" in names, run
        # The int8 variant's decode steps run our int8 kernel's op: batch 2 in every linear,
        # batch 1 in those of at most ONE_ROW_KERNEL_MAX_OUT outputs (all of the debug model's).
        assert ("titan_mla::int8_weight_only_linear" in names) == run.startswith("int8"), run
        assert "Self CPU" in (out / "profiles" / run / "top_ops.txt").read_text()


def test_failed_variants_and_measurements_are_recorded_and_the_rest_still_runs(
    tmp_path, monkeypatch
):
    measure, decode = ablate.measure_variant, ablate.decode_throughput

    def measure_or_fail(base_model, variant, *args, **kwargs):
        if variant.name == "int8_dynamic":
            raise RuntimeError("Inductor could not compile it")
        return measure(base_model, variant, *args, **kwargs)

    def decode_or_fail(engine, tokens, batch, *args, **kwargs):
        if batch == 2 and is_quantized(engine.model.output.weight):
            raise RuntimeError("self.size(0) needs to be greater than 16, but got 2")
        return decode(engine, tokens, batch, *args, **kwargs)

    monkeypatch.setattr(ablate, "measure_variant", measure_or_fail)
    monkeypatch.setattr(ablate, "decode_throughput", decode_or_fail)
    with pytest.raises(SystemExit) as exit_info:
        run_tiny_ablation(tmp_path, "int8_dynamic,bf16,int8_weight_only", "1,2")
    out = tmp_path / "out"
    assert_expected_inline(
        str(exit_info.value),
        """titan_mla.ablate: 2 measurement(s) failed: int8_dynamic, int8_weight_only decode_b2""",
    )
    [json_path] = out.glob("quant_ablation-*.json")
    result = json.loads(json_path.read_text())
    decode_rows = {(r["case"], r["impl"]) for r in result["rows"] if r["case"].startswith("decode")}
    assert decode_rows == {
        ("decode_b1_ctx8", "bf16"),
        ("decode_b2_ctx8", "bf16"),
        ("decode_b1_ctx8", "int8_weight_only"),
    }
    assert result["summary"]["failures"] == {
        "int8_dynamic": "RuntimeError: Inductor could not compile it",
        "int8_weight_only decode_b2": "RuntimeError: self.size(0) needs to be greater than 16, "
        "but got 2",
    }
    assert "int8wo_decode_speedup" in result["summary"]
    assert "int8wo_decode_b2_speedup" not in result["summary"]


def test_float8_training_configs_are_mla_1b_plus_the_converter():
    """bench_train compares float8 and bf16 at equal settings: the float8 configs differ from
    mla_1b.toml only in the job name, the converter and its section."""
    from torchtitan.config import ConfigManager

    def config(name: str) -> dict:
        parsed = ConfigManager().parse_args([f"--job.config_file={REPO / 'train_configs' / name}"])
        return parsed.to_dict()

    bf16 = config("mla_1b.toml")
    for name, recipe, fsdp_float8, bf16_linears in (
        # tensorwise keeps the KV down-projection in bf16 too: measured faster (train_fp8-h100)
        ("mla_1b_fp8.toml", None, True, ["output", "wkv_a", "wq_a"]),
        ("mla_1b_fp8_rowwise.toml", "rowwise", False, ["output"]),
    ):
        fp8 = config(name)
        assert fp8["model"].pop("converters") == ["quantize.linear.float8"]
        float8 = fp8["quantize"]["linear"]["float8"]
        assert (float8["recipe_name"], float8["enable_fsdp_float8_all_gather"]) == (
            recipe,
            fsdp_float8,
        )
        assert float8["filter_fqns"] == bf16_linears
        for section in ("model", "training", "activation_checkpoint", "compile", "optimizer"):
            assert {k: v for k, v in fp8[section].items() if k != "converters"} == {
                k: v for k, v in bf16[section].items() if k != "converters"
            }, section


NEEDS_FP8_GPU = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="float8 needs a CUDA GPU of compute capability 8.9+",
)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "scheme",
    [
        "int8_weight_only",
        # Batch 1: below torch._int_mm's 17 rows, Int8DynamicLinear's path (our int8 kernel).
        "int8_dynamic",
        pytest.param("fp8_rowwise", marks=NEEDS_FP8_GPU),
        pytest.param("fp8_tensorwise", marks=NEEDS_FP8_GPU),
        pytest.param("fp8_weight_only", marks=NEEDS_FP8_GPU),
    ],
)
def test_gpu_schemes_through_compiled_cuda_graph_engine_close_to_bf16(scheme):
    """Inductor compiles the whole quantized decode step (fullgraph) and it is captured in a CUDA
    graph: the deployment path of the ablation."""
    model = tiny_model().to(device="cuda", dtype=torch.bfloat16)
    sequence = tokens(1, 20).cuda()
    with torch.no_grad():
        expected = model(sequence)[0].float()
    quantized = quantize_model(model, parse_variant(scheme, "cuda").scheme)
    assert quantized and all(is_quantized(model.get_submodule(name).weight) for name in quantized)
    cache = PagedLatentCache.for_model(
        TINY, max_tokens=64, page_size=16, dtype=torch.bfloat16, device="cuda"
    )
    engine = MLAEngine(model, cache)
    compile_decode_step(engine, fullgraph=True)
    engine.capture_cuda_graph(1)
    logits = [engine.prefill([sequence[0, :16].tolist()], [0], all_logits=True)[0]]
    for position in range(16, 20):
        logits.append(engine.decode(sequence[:, position : position + 1], [0])[0])
    assert relative_error(torch.cat(logits).float(), expected) < 0.1
