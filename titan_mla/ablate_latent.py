"""Latent-dimension ablation: how small can MLA's KV latent be?

Trains the same model at several ``kv_lora_rank`` values and as MHA and GQA baselines of the same
width (same seed, same tokens in the same order, the project's model, AdamW and LR schedule), then
reports per variant: validation loss and perplexity on held-out text, passkey accuracy at the
training length, KV-cache bytes per token, decode tokens/s at a long context and parameters. Writes
``latent_ablation-<gpu>.json`` (the shared/notes/BENCHMARKS.md format) and ``.md`` beside it, and a
PNG of validation loss against cache bytes per token.

    python -m titan_mla.ablate_latent --size full --gpus 0,1,2,3 --out results/   # one variant per GPU
    python -m titan_mla.ablate_latent --size debug --steps 4 --out /tmp/ablation    # CPU

Decode: MLA through the latent-cache MLAEngine (titan_mla::mla_decode over the paged latents);
MHA/GQA through a dense (layer, batch, kv_heads, position, head_dim) KV cache and an SDPA decode
step. Both run every layer of the model at the same batch and context, as CUDA graphs on GPU.

Passkey: the pretraining corpus (Python source) holds no passkey prompts, so after the validation
loss is measured every variant is fine-tuned on the same ``--passkey-steps`` batches of passkey rows
(titan_mla.longctx's supervised rows at the training length, loss on the answer only; the same
optimizer and schedule as pretraining; 0: no fine-tune), then scored on ``--passkey-samples``
prompts per needle depth that with their answer fill the training length, completed greedily
through the training forward (titan_mla.longctx.eval.passkey_accuracy_full_forward: any attention).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import queue
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from titan_mla.data import STDLIB_CORPUS, load_corpus
from titan_mla.data.tokenizer import BOS_TOKEN, EOS_TOKEN, TOKENIZER_DIR
from titan_mla.inference import MLAEngine, PagedLatentCache
from titan_mla.inference.cache import cache_bytes_per_token
from titan_mla.longctx.datasets import NeedleDataset
from titan_mla.longctx.eval import (
    ANSWER_ROOM,
    PASSKEY_DEPTHS,
    passkey_accuracy_full_forward,
)
from titan_mla.longctx.needles import NeedleGenerator, load_tokenizer
from titan_mla.models import MLAModelArgs, MLATransformer
from titan_mla.models.rope import rope_cos_sin

BENCHMARK = "latent_ablation"
MLFLOW_EXPERIMENT = "latent_ablation"

# Model widths: "debug" trains on a 2-core CPU in seconds; "full" is ~170M parameters (~110M with
# MLA rank 64), the 100-350M range, for an H100 per variant.
SIZES: dict[str, dict[str, Any]] = {
    "debug": dict(
        model=dict(
            dim=256,
            n_layers=4,
            n_heads=8,
            vocab_size=8192,
            ffn_hidden_dim=768,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
        ),
        steps=20,
        batch=8,
        seq_len=256,
        val_tokens=16384,
        lr=3e-3,
        decode_batch=4,
        decode_context=2048,
        passkey_steps=10,
        passkey_samples=4,
    ),
    "full": dict(
        model=dict(
            dim=1024,
            n_layers=12,
            n_heads=16,
            vocab_size=8192,
            ffn_hidden_dim=2816,
            qk_nope_head_dim=64,
            qk_rope_head_dim=32,
            v_head_dim=64,
        ),
        steps=240,
        batch=32,
        seq_len=1024,
        val_tokens=196608,
        lr=1.5e-3,
        decode_batch=32,
        decode_context=16384,
        # Per variant on an H100, estimated from the pretraining's step time (0.1-0.14 s): 20-30 s
        # of fine-tuning, a few seconds of scoring (5 depths x 32 prompts, ~6 forwards each).
        passkey_steps=200,
        passkey_samples=32,
    ),
}


@dataclass
class Variant:
    name: str
    attention: str  # "mla", "mha" or "gqa"
    kv_lora_rank: int = 0  # MLA only
    n_kv_heads: int = 0  # GQA only


@dataclass
class Setup:
    """Everything but the attention that every variant shares."""

    model: dict[str, Any]
    steps: int
    batch: int
    seq_len: int
    val_tokens: int
    lr: float
    warmup_steps: int
    seed: int
    compile: bool
    decode_batch: int
    decode_context: int
    decode_iters: int
    kernels: str
    passkey_steps: int  # fine-tune batches of ``batch`` rows
    passkey_samples: int  # prompts per depth

    @property
    def passkey_prompt_tokens(self) -> int:
        return self.seq_len - ANSWER_ROOM


def default_variants(ranks: list[int], gqa_kv_heads: int) -> list[Variant]:
    return [
        *(Variant(f"mla_r{rank}", "mla", kv_lora_rank=rank) for rank in ranks),
        Variant("mha", "mha"),
        Variant(f"gqa_kv{gqa_kv_heads}", "gqa", n_kv_heads=gqa_kv_heads),
    ]


def model_args(setup: Setup, variant: Variant) -> MLAModelArgs:
    extra = dict(attention=variant.attention, n_kv_heads=variant.n_kv_heads)
    if variant.attention == "mla":
        extra["kv_lora_rank"] = variant.kv_lora_rank
    return MLAModelArgs(
        **setup.model,
        **extra,
        kernels=setup.kernels,
        max_seq_len=setup.seq_len,
        original_seq_len=setup.seq_len,
    )


def kv_cache_bytes_per_token(args: MLAModelArgs, dtype: torch.dtype) -> int:
    """What an inference cache holds per token over all layers: MLA's latent and shared rotary key,
    layers x (kv_lora_rank + qk_rope_head_dim) x bytes; plain attention's keys and values,
    layers x 2 x n_kv_heads x head_dim x bytes."""
    if args.attention == "mla":
        return cache_bytes_per_token(
            args.n_layers, args.kv_lora_rank, args.qk_rope_head_dim, dtype, fp8=False
        )
    return args.n_layers * 2 * args.n_kv_heads * args.head_dim * dtype.itemsize


def token_sequences(
    corpus: str, split: str, num_sequences: int, seq_len: int, seed: int | None
) -> torch.Tensor:
    """(num_sequences, seq_len + 1) token ids: the corpus' documents (bos + text + eos, in corpus
    order) cut into consecutive rows, the corpus repeated if it is too short; rows shuffled by
    ``seed`` (None: corpus order). Every variant trains on these very rows."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    bos, eos = tokenizer.token_to_id(BOS_TOKEN), tokenizer.token_to_id(EOS_TOKEN)
    texts = load_corpus(corpus, split)["text"]
    needed = num_sequences * (seq_len + 1)
    stream: list[int] = []
    for start in range(0, len(texts), 64):
        for encoding in tokenizer.encode_batch(texts[start : start + 64]):
            stream += [bos, *encoding.ids, eos]
        if len(stream) >= needed:
            break
    if len(stream) < needed:
        print(f"{corpus} {split}: {len(stream):,} tokens, read {needed / len(stream):.2f} times")
        stream *= math.ceil(needed / len(stream))
    rows = torch.tensor(stream[:needed], dtype=torch.long).view(num_sequences, seq_len + 1)
    if seed is None:
        return rows
    return rows[torch.randperm(num_sequences, generator=torch.Generator().manual_seed(seed))]


def _time_per_call(step, device: torch.device, iters: int) -> float:
    """Median seconds of one call of ``step``: a replayed CUDA graph on GPU, eager on CPU."""
    if device.type == "cuda":
        import triton

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up (kernel autotuning, allocations) off the capture
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        return triton.testing.do_bench(graph.replay, return_mode="median") / 1e3
    step()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def dense_decode_step(
    model: MLATransformer,
    tokens: torch.Tensor,
    rope_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    position: int,
) -> torch.Tensor:
    """Logits (batch, 1, vocab) of one new token per sequence at ``position`` of an MHA/GQA model,
    its keys and values written into the dense caches (layers, batch, n_kv_heads, positions,
    head_dim), attending to positions 0 .. position."""
    positions = torch.full_like(tokens, position)
    h = model.tok_embeddings(tokens)
    for i, layer in enumerate(model.layers.values()):
        attention = layer.attention
        q, k, v = attention.project(layer.attention_norm(h), rope_cache, positions)
        k_cache[i, :, :, position] = k[:, 0]
        v_cache[i, :, :, position] = v[:, 0]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k_cache[i, :, :, : position + 1],
            v_cache[i, :, :, : position + 1],
            scale=attention.softmax_scale,
            enable_gqa=attention.n_kv_heads != attention.n_heads,
        )
        ffn_in, h = layer.ffn_norm(attention.wo(out.transpose(1, 2).flatten(2)), residual=h)
        h = h + layer.feed_forward(ffn_in)
    return model.output(model.norm(h))


def decode_tokens_per_s(model: MLATransformer, setup: Setup, device: torch.device) -> float:
    """Tokens/s of decode steps of decode_batch sequences that hold decode_context tokens each
    (random cache contents: the cost of a step does not depend on them)."""
    args, batch, context = model.model_args, setup.decode_batch, setup.decode_context
    dtype = model.output.weight.dtype
    tokens = torch.randint(0, args.vocab_size, (batch, 1), device=device)
    if args.attention == "mla":
        cache = PagedLatentCache.for_model(
            args,
            max_tokens=batch * (context + 64),
            max_seqs=batch,
            max_tokens_per_seq=context + 1,
            dtype=dtype,
            device=device,
        )
        for seq in range(batch):
            cache.extend(seq, context + 1)
        cache.latent.normal_()
        cache.k_pe.normal_()
        engine = MLAEngine(model, cache)
        seq_lens = torch.full((batch,), context + 1, dtype=torch.int32, device=device)
        block_table = cache.block_table[:batch]

        def step() -> torch.Tensor:
            return engine.decode_step(tokens, block_table, seq_lens)
    else:
        shape = (args.n_layers, batch, args.n_kv_heads, context + 1, args.head_dim)
        k_cache = torch.randn(shape, dtype=dtype, device=device)
        v_cache = torch.randn(shape, dtype=dtype, device=device)
        rope_cache = rope_cos_sin(dataclasses.replace(args, max_seq_len=context + 1), device)

        def step() -> torch.Tensor:
            return dense_decode_step(model, tokens, rope_cache, k_cache, v_cache, context)

    return batch / _time_per_call(step, device, setup.decode_iters)


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module, rows: torch.Tensor, batch: int, device: torch.device
) -> float:
    """Mean next-token cross-entropy (nats) over every token of ``rows``."""
    from torchtitan.components.loss import cross_entropy_loss

    total = 0.0
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch].to(device)
        with _autocast(device):
            total += cross_entropy_loss(model(chunk[:, :-1]), chunk[:, 1:]).item()
    return total / rows[:, 1:].numel()


def _autocast(device: torch.device):
    # bf16 compute on GPU with float32 master weights; float32 on CPU (bf16 there is slow).
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def passkey_rows(setup: Setup) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels), each (passkey_steps x batch, seq_len): titan_mla.longctx's supervised
    passkey rows (repeat haystack, key at a spread of depths, labels on the answer and its
    end-of-sequence token only), drawn from ``setup.seed``: every variant fine-tunes on these."""
    dataset = NeedleDataset(
        NeedleGenerator("passkey", "repeat"), setup.seq_len, dpo=False, seed=setup.seed
    )
    inputs = torch.empty(setup.passkey_steps * setup.batch, setup.seq_len, dtype=torch.long)
    labels = torch.empty_like(inputs)
    for i in range(len(inputs)):
        row, labels[i] = dataset.sample(i)
        inputs[i] = row["input"]
    return inputs, labels


def train_steps(
    model: MLATransformer,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    setup: Setup,
    steps: int,
    warmup_steps: int,
    device: torch.device,
    log_name: str,
) -> tuple[list[float], float]:
    """``steps`` optimizer steps on consecutive batches of ``setup.batch`` rows of inputs and
    labels (IGNORE_INDEX: no loss): AdamW at setup.lr, warmup then cosine decay to a tenth,
    gradients clipped to norm 1, the loss averaged over labelled tokens. Returns the losses and
    the seconds taken."""
    from torchtitan.components.loss import IGNORE_INDEX, cross_entropy_loss
    from torchtitan.components.lr_scheduler import build_lr_schedulers
    from torchtitan.components.optimizer import build_optimizers
    from torchtitan.config.job_config import LRScheduler, Optimizer
    from torchtitan.distributed.parallel_dims import ParallelDims

    single = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)
    optimizer_config = Optimizer(
        lr=setup.lr, implementation="fused" if device.type == "cuda" else "foreach"
    )
    optimizers = build_optimizers([model], optimizer_config, single)
    schedule = LRScheduler(warmup_steps=warmup_steps, decay_type="cosine", min_lr_factor=0.1)
    lr_schedulers = build_lr_schedulers(optimizers, schedule, steps)

    model.train()
    losses = []
    start_time = time.perf_counter()
    for step in range(steps):
        rows = slice(step * setup.batch, (step + 1) * setup.batch)
        batch_inputs, batch_labels = inputs[rows].to(device), labels[rows].to(device)
        with _autocast(device):
            loss = cross_entropy_loss(model(batch_inputs), batch_labels)
            loss = loss / (batch_labels != IGNORE_INDEX).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        optimizers.step()
        lr_schedulers.step()
        optimizers.zero_grad()
        losses.append(loss.item())
        if step % max(steps // 10, 1) == 0 or step == steps - 1:
            tokens_per_s = (step + 1) * batch_inputs.numel() / (time.perf_counter() - start_time)
            print(
                f"[{log_name}] step {step + 1}/{steps} loss {losses[-1]:.4f} "
                f"{tokens_per_s:,.0f} tokens/s",
                flush=True,
            )
    model.eval()
    return losses, time.perf_counter() - start_time


def train_variant(
    variant: Variant,
    setup: Setup,
    train_rows: torch.Tensor,
    val_rows: torch.Tensor,
    passkey_data: tuple[torch.Tensor, torch.Tensor],
    device: torch.device,
) -> dict[str, Any]:
    """Train ``variant`` on train_rows (setup.steps batches of setup.batch rows), measure its
    validation loss, fine-tune it on passkey_data (passkey_rows), score its passkey accuracy and
    time its decode; returns its result row."""
    args = model_args(setup, variant)
    torch.manual_seed(setup.seed)
    with torch.device(device), torch.no_grad():
        model = MLATransformer(args)
        model.init_weights()
    nparams, flops_per_token = args.get_nparams_and_flops(model, setup.seq_len)
    if setup.compile:
        # Per block, as titan_mla.parallelisms does: identical blocks share one compiled graph.
        for layer in model.layers.values():
            layer.compile()

    losses, train_s = train_steps(
        model,
        train_rows[:, :-1],
        train_rows[:, 1:],
        setup,
        setup.steps,
        setup.warmup_steps,
        device,
        variant.name,
    )
    # Before the passkey fine-tune: the loss of the pretrained model.
    val_loss = validation_loss(model, val_rows, setup.batch, device)

    passkey_losses, passkey_train_s = [], 0.0
    if setup.passkey_steps:
        passkey_losses, passkey_train_s = train_steps(
            model,
            *passkey_data,
            setup,
            setup.passkey_steps,
            max(setup.passkey_steps // 10, 1),
            device,
            f"{variant.name} passkey",
        )
    start_time = time.perf_counter()
    with _autocast(device):
        passkey = passkey_accuracy_full_forward(
            model,
            load_tokenizer(),
            setup.passkey_prompt_tokens,
            PASSKEY_DEPTHS,
            setup.passkey_samples,
            device,
            # Compiled: batches of the validation's shape reuse its graph.
            batch=setup.batch if setup.compile else None,
        )
    passkey_eval_s = time.perf_counter() - start_time

    cache_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model.to(cache_dtype)
    decode = decode_tokens_per_s(model, setup, device)
    print(
        f"[{variant.name}] val loss {val_loss:.4f}, passkey accuracy {passkey['accuracy']:.1%} "
        f"after {setup.passkey_steps} fine-tune steps, decode {decode:,.0f} tokens/s at context "
        f"{setup.decode_context} x batch {setup.decode_batch}",
        flush=True,
    )
    return {
        "variant": dataclasses.asdict(variant),
        "params": nparams,
        "flops_per_token": flops_per_token,
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss),
        "passkey_acc": passkey["accuracy"],
        "passkey_acc_by_depth": dict(
            zip(map(str, PASSKEY_DEPTHS), passkey["accuracy_by_depth"], strict=True)
        ),
        # The first prompt's completion at every depth.
        "passkey_examples": [texts[0] for texts in passkey["completions"]],
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(args, cache_dtype),
        "cache_dtype": str(cache_dtype).removeprefix("torch."),
        "decode_tokens_per_s": decode,
        "train_seconds": train_s,
        "train_losses": losses,
        "passkey_train_seconds": passkey_train_s,
        "passkey_eval_seconds": passkey_eval_s,
        "passkey_losses": passkey_losses,
    }


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's figures: the smallest rank whose validation loss is within 1% of MHA's, and its
    cache bytes over MHA's."""
    mha = next(r for r in results if r["variant"]["attention"] == "mha")
    close = sorted(
        (r for r in results if r["variant"]["attention"] == "mla"),
        key=lambda r: r["variant"]["kv_lora_rank"],
    )
    best = next((r for r in close if r["val_loss"] <= 1.01 * mha["val_loss"]), None)
    return {
        "best_latent_rank_within_1pct_of_mha": best and best["variant"]["kv_lora_rank"],
        "cache_ratio_vs_mha_at_that_rank": best
        and best["kv_cache_bytes_per_token"] / mha["kv_cache_bytes_per_token"],
        "mha_val_loss": mha["val_loss"],
    }


def result_rows(results: list[dict[str, Any]], seq_len: int) -> list[dict[str, Any]]:
    metrics = {
        "val_loss": "val loss (nats)",
        "val_ppl": "val perplexity",
        "passkey_acc": f"passkey acc @ {seq_len}",
        "kv_cache_bytes_per_token": "KV cache bytes/token",
        "decode_tokens_per_s": "decode tokens/s",
        "params": "parameters",
    }
    return [
        {
            "case": r["variant"]["name"],
            "impl": r["variant"]["attention"],
            "metric": label,
            "value": r[key],
        }
        for r in results
        for key, label in metrics.items()
    ]


def variant_table(results: list[dict[str, Any]], seq_len: int) -> str:
    """One markdown row per variant."""
    lines = [
        f"| variant | params | val loss | val ppl | passkey acc @ {seq_len} | KV bytes/token "
        "| decode tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['variant']['name']} | {r['params']:,} | {r['val_loss']:.4f} | "
            f"{r['val_ppl']:.2f} | {r['passkey_acc']:.2f} | {r['kv_cache_bytes_per_token']:,} | "
            f"{r['decode_tokens_per_s']:,.1f} |"
        )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        x, y = r["kv_cache_bytes_per_token"], r["val_loss"]
        ax.scatter(x, y, marker="o" if r["variant"]["attention"] == "mla" else "s")
        ax.annotate(r["variant"]["name"], (x, y), textcoords="offset points", xytext=(4, 4))
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"KV cache bytes per token ({results[0]['cache_dtype']}, all layers)")
    ax.set_ylabel("validation loss (nats)")
    ax.set_title("Latent ablation: quality vs KV cache")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _run_workers(
    variants: list[Variant], setup: Setup, data_path: Path, gpus: list[str], exchange: Path
) -> list[dict[str, Any]]:
    """Each variant in its own process on one GPU, as many at once as there are GPUs."""
    pending: queue.Queue[Variant] = queue.Queue()
    for variant in variants:
        pending.put(variant)
    failures: list[str] = []

    def serve(gpu: str) -> None:
        while True:
            try:
                variant = pending.get_nowait()
            except queue.Empty:
                return
            spec = exchange / f"{variant.name}.spec.json"
            spec.write_text(
                json.dumps(
                    {
                        "variant": dataclasses.asdict(variant),
                        "setup": dataclasses.asdict(setup),
                        "data": str(data_path),
                        "result": str(exchange / f"{variant.name}.result.json"),
                    }
                )
            )
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
            command = [sys.executable, "-m", "titan_mla.ablate_latent", "--worker", str(spec)]
            if subprocess.run(command, env=env).returncode:
                failures.append(f"{variant.name} (GPU {gpu})")

    threads = [threading.Thread(target=serve, args=(gpu,)) for gpu in gpus]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError(f"variants failed: {', '.join(failures)}; see their output above")
    return [json.loads((exchange / f"{v.name}.result.json").read_text()) for v in variants]


def _worker(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    data = torch.load(spec["data"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = train_variant(
        Variant(**spec["variant"]),
        Setup(**spec["setup"]),
        data["train"],
        data["val"],
        (data["passkey_inputs"], data["passkey_labels"]),
        device,
    )
    Path(spec["result"]).write_text(json.dumps(result))


def log_to_mlflow(
    results: list[dict[str, Any]], setup: Setup, files: list[Path], tracking_uri: str
) -> None:
    """One MLflow run per variant under one experiment: the model and training setup as params,
    the per-step training and passkey fine-tune losses and the final figures as metrics, the
    result files as artifacts."""
    import mlflow

    from titan_mla.tracking import start_variant_run

    for r in results:
        variant = r["variant"]
        params = {"setup": dataclasses.asdict(setup), "variant": variant}
        with start_variant_run(MLFLOW_EXPERIMENT, variant["name"], params, tracking_uri):
            for step, loss in enumerate(r["train_losses"], start=1):
                mlflow.log_metric("loss", loss, step=step)
            for step, loss in enumerate(r["passkey_losses"], start=1):
                mlflow.log_metric("passkey_loss", loss, step=step)
            for key in (
                "val_loss",
                "val_ppl",
                "passkey_acc",
                "kv_cache_bytes_per_token",
                "decode_tokens_per_s",
            ):
                mlflow.log_metric(key, r[key])
            mlflow.log_metric("params", r["params"])
            for path in files:
                mlflow.log_artifact(str(path))


def _write_result(command: str, rows: list[dict], summary: dict, out: Path) -> Path:
    # The shared result writer lives in the source checkout's benchmarks/ package.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.common import write_result

    return write_result(BENCHMARK, command, rows, summary, out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="debug")
    parser.add_argument("--ranks", default="64,128,256,512", help="MLA kv_lora_rank values")
    parser.add_argument("--gqa-kv-heads", type=int, help="default: n_heads // 4")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch", type=int, help="sequences per step")
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--val-tokens", type=int, help="held-out tokens the loss is averaged over")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--warmup-steps", type=int, help="default: steps // 10")
    parser.add_argument("--dataset", default=STDLIB_CORPUS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--decode-batch", type=int)
    parser.add_argument("--decode-context", type=int)
    parser.add_argument("--decode-iters", type=int, default=5, help="timed eager steps (CPU)")
    parser.add_argument(
        "--passkey-steps", type=int, help="passkey fine-tune steps before scoring (0: none)"
    )
    parser.add_argument("--passkey-samples", type=int, help="passkey prompts per needle depth")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--gpus", default="", help="e.g. 0,1,2,3: variants run one per GPU")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to validate a machine")
    parser.add_argument("--mlflow", action="store_true", help="log one MLflow run per variant")
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: a SQLite store under --out)"
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/latent_ablation"))
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def build_setup(opts: argparse.Namespace, on_gpu: bool) -> Setup:
    preset = SIZES[opts.size]
    smoke = dict(
        steps=3,
        batch=4,
        seq_len=128,
        val_tokens=2048,
        decode_context=512,
        passkey_steps=2,
        passkey_samples=2,
    )
    if opts.smoke:
        preset = {**preset, **smoke}

    def pick(name: str) -> Any:
        value = getattr(opts, name)
        return preset[name] if value is None else value

    steps = pick("steps")
    return Setup(
        model=preset["model"],
        steps=steps,
        batch=pick("batch"),
        seq_len=pick("seq_len"),
        val_tokens=pick("val_tokens"),
        lr=pick("lr"),
        warmup_steps=opts.warmup_steps if opts.warmup_steps is not None else max(steps // 10, 1),
        seed=opts.seed,
        compile=on_gpu if opts.compile is None else opts.compile,
        decode_batch=pick("decode_batch"),
        decode_context=pick("decode_context"),
        decode_iters=opts.decode_iters,
        # The Triton kernels on GPU; on CPU the plain ops (the same numerics, less dispatch).
        kernels="triton" if on_gpu else "torch",
        passkey_steps=pick("passkey_steps"),
        passkey_samples=pick("passkey_samples"),
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    opts = parse_args(argv)
    if opts.worker:
        _worker(opts.worker)
        return {}
    if opts.mlflow:
        from titan_mla.tracking import require_mlflow

        require_mlflow()  # fail now, with the extra to install, not after the training
    gpus = [g for g in opts.gpus.split(",") if g]
    if gpus:
        # This process only launches; its own device view (for the result's name) is one GPU,
        # as each variant ran on one.
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[0]
    on_gpu = bool(gpus) or torch.cuda.is_available()
    setup = build_setup(opts, on_gpu)
    ranks = [int(r) for r in opts.ranks.split(",") if r]
    gqa_kv_heads = opts.gqa_kv_heads or max(setup.model["n_heads"] // 4, 1)
    variants = default_variants(ranks, gqa_kv_heads)
    for variant in variants:
        model_args(setup, variant)  # a bad rank or head count fails here, before any training
    try:  # a too short training length fails here too
        NeedleGenerator("passkey", "repeat").record(setup.passkey_prompt_tokens, 0.0, 0)
    except ValueError as err:
        raise ValueError(
            f"seq_len {setup.seq_len} is too short for the passkey eval, whose prompts have "
            f"seq_len - {ANSWER_ROOM} tokens: {err}"
        ) from None

    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    train_rows = token_sequences(
        opts.dataset, "train", setup.steps * setup.batch, setup.seq_len, opts.seed
    )
    val_rows = token_sequences(
        opts.dataset, "validation", math.ceil(setup.val_tokens / setup.seq_len), setup.seq_len, None
    )
    passkey_inputs, passkey_labels = passkey_rows(setup)
    train_tokens = setup.steps * setup.batch * setup.seq_len
    print(
        f"latent ablation: {len(variants)} variants x {train_tokens:,} training tokens "
        f"({opts.dataset}), {val_rows[:, 1:].numel():,} validation tokens, then "
        f"{setup.passkey_steps} passkey fine-tune steps and "
        f"{setup.passkey_samples * len(PASSKEY_DEPTHS)} passkey prompts",
        flush=True,
    )
    if gpus:
        # The workers' inputs and results: tokens, specs, result rows (not outputs to keep).
        with tempfile.TemporaryDirectory(prefix="latent_ablation_") as exchange:
            data_path = Path(exchange) / "tokens.pt"
            data = {"train": train_rows, "val": val_rows}
            data |= {"passkey_inputs": passkey_inputs, "passkey_labels": passkey_labels}
            torch.save(data, data_path)
            results = _run_workers(variants, setup, data_path, gpus, Path(exchange))
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        passkey_data = (passkey_inputs, passkey_labels)
        results = [
            train_variant(v, setup, train_rows, val_rows, passkey_data, device) for v in variants
        ]

    summary = {
        **summarize(results),
        "train_tokens_per_variant": train_tokens,
        "val_tokens": val_rows[:, 1:].numel(),
        "decode_context": setup.decode_context,
        "decode_batch": setup.decode_batch,
        "passkey_acc_at_train_len": {r["variant"]["name"]: r["passkey_acc"] for r in results},
        "passkey_prompt_tokens": setup.passkey_prompt_tokens,
        "passkey_depths": PASSKEY_DEPTHS,
        "passkey_prompts": setup.passkey_samples * len(PASSKEY_DEPTHS),
        "passkey_finetune_steps": setup.passkey_steps,
        "passkey_finetune_rows": setup.passkey_steps * setup.batch,
        "variants_at_once": max(len(gpus), 1),
    }
    command = shlex.join(["python", "-m", "titan_mla.ablate_latent", *(argv or sys.argv[1:])])
    json_path = _write_result(command, result_rows(results, setup.seq_len), summary, out)
    result = json.loads(json_path.read_text())
    result["variants"] = results
    result["setup"] = dataclasses.asdict(setup)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    table_path = json_path.with_suffix(".md")
    table = variant_table(results, setup.seq_len)
    table_path.write_text(table_path.read_text() + "\n" + table + "\n")
    png_path = json_path.with_suffix(".png")
    plot(results, png_path)
    print(table)
    print(f"wrote {json_path}, {table_path}, {png_path}", flush=True)
    if opts.mlflow:
        from titan_mla.tracking import default_tracking_uri

        uri = opts.tracking_uri or default_tracking_uri(out)
        log_to_mlflow(results, setup, [json_path, table_path, png_path], uri)
        print(f"MLflow runs in experiment '{MLFLOW_EXPERIMENT}' at {uri}")
    return result


if __name__ == "__main__":
    main()
