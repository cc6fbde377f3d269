"""MLA inference against the training model: paged latent cache, chunked prefill, absorbed decode,
FP8 cache, checkpoints, and generation end to end (CPU; the GPU tests at the end skip without CUDA).

Without CUDA, conftest sets TRITON_INTERPRET=1: the decode kernel then runs in Triton's interpreter
on CPU tensors. The tests that need speed more than the kernel take the op's PyTorch reference
(``reference_decode``); the others check the real kernel at small shapes.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from expecttest import assert_expected_inline
from helpers import REPO, run_train

from titan_mla import generate
from titan_mla.inference import CacheFullError, MLAEngine, PagedLatentCache
from titan_mla.inference.generator import Generator, sample
from titan_mla.models import MLATransformer, mla_flavors
from titan_mla.ops import dispatch

DEBUG_CONFIG = REPO / "train_configs" / "debug_model.toml"
# Norms and rotations in PyTorch: under the interpreter the model's Triton ones take ~10x longer on
# CPU. test_triton_kernels_match_training_forward runs them.
TINY = dataclasses.replace(mla_flavors["debugmodel"], n_layers=2, kernels="torch")
# Measured: an FP8 cache (per-group or per-token scales) moves the tiny model's logits by at most
# 9.2e-4 (prefill) and 1.9e-4 (decode) of their largest magnitude, against 5e-7 for an fp32 cache.
FP8_TOLERANCE = 5e-3


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def tiny_model(kernels: str = "torch") -> MLATransformer:
    torch.manual_seed(0)
    model = MLATransformer(dataclasses.replace(TINY, kernels=kernels))
    with torch.no_grad():
        model.init_weights()
    return model.eval()


@pytest.fixture(scope="module")
def model() -> MLATransformer:
    return tiny_model()


@pytest.fixture
def reference_decode(monkeypatch):
    """The decode op's PyTorch reference instead of the interpreted kernel (same semantics)."""
    monkeypatch.setattr(dispatch, "KERNELS_INTERPRETED", False)


def make_engine(model: MLATransformer, *, chunk_size: int = 2048, **cache_kwargs) -> MLAEngine:
    cache_kwargs = {"page_size": 16, "max_seqs": 4, "dtype": torch.float32, **cache_kwargs}
    cache = PagedLatentCache.for_model(model.model_args, max_tokens=512, **cache_kwargs)
    return MLAEngine(model, cache, chunk_size=chunk_size)


def random_tokens(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def teacher_forced_logits(
    engine: MLAEngine, tokens: torch.Tensor, prompt_lens: list[int], q_lens: list[int]
) -> list[torch.Tensor]:
    """Logits of every position of each sequence b: prefill of tokens[b, :prompt_lens[b]], then
    one decode step per entry of q_lens, each feeding the next q_len tokens of tokens[b]."""
    seqs = list(range(len(prompt_lens)))
    prompts = [tokens[b, :n].tolist() for b, n in enumerate(prompt_lens)]
    prefill = engine.prefill(prompts, seqs, all_logits=True)
    logits = [[prefill[b, :n]] for b, n in enumerate(prompt_lens)]
    for q_len in q_lens:
        starts = [engine.cache.lengths[seq] for seq in seqs]
        new = torch.stack([tokens[b, start : start + q_len] for b, start in enumerate(starts)])
        step = engine.decode(new, seqs)
        for b in seqs:
            logits[b].append(step[b])
    return [torch.cat(per_seq) for per_seq in logits]


CASES = {
    # name: (prompt lengths, prefill chunk size, decode q_lens, shuffled free list)
    "one_prompt": ([21], 2048, [1, 1, 1], False),
    "chunked_prefill": ([37], 8, [1, 1], False),
    "batch_of_lengths_random_pages": ([29, 7, 18], 8, [1, 1, 1], True),
    "speculative_q_len_2_to_4": ([11, 20], 2048, [2, 3, 4], True),
}


@pytest.mark.parametrize("case", CASES)
def test_prefill_and_decode_match_training_forward(model, reference_decode, case):
    prompt_lens, chunk_size, q_lens, shuffle = CASES[case]
    engine = make_engine(model, chunk_size=chunk_size)
    if shuffle:
        random.Random(0).shuffle(engine.cache.free_pages)
    tokens = random_tokens(len(prompt_lens), max(prompt_lens) + sum(q_lens))
    with torch.no_grad():
        expected = model(tokens)
    logits = teacher_forced_logits(engine, tokens, prompt_lens, q_lens)
    for b, seq_logits in enumerate(logits):
        assert relative_error(seq_logits, expected[b, : len(seq_logits)]) < 1e-3


def test_triton_kernels_match_training_forward():
    """The decode kernel, and the model's Triton norms and rotation, interpreted on CPU: a batch of
    two lengths over several pages, q_len 1 and 3."""
    assert dispatch.KERNELS_INTERPRETED or torch.cuda.is_available()
    model = tiny_model(kernels="triton")
    engine = make_engine(model, chunk_size=16)
    random.Random(1).shuffle(engine.cache.free_pages)
    tokens = random_tokens(2, 40)
    with torch.no_grad():
        expected = model(tokens)
    for b, seq_logits in enumerate(teacher_forced_logits(engine, tokens, [33, 20], [1, 3])):
        assert relative_error(seq_logits, expected[b, : len(seq_logits)]) < 1e-3


@pytest.mark.parametrize(
    "kernel, group_size",
    [("reference", 32), ("reference", 64), ("triton", 32)],
    ids=["per_32_group", "per_token", "per_32_group_triton"],
)
def test_fp8_cache_logits_close_to_full_precision_cache(model, monkeypatch, kernel, group_size):
    if kernel == "reference":
        monkeypatch.setattr(dispatch, "KERNELS_INTERPRETED", False)
    tokens = random_tokens(2, 30)
    logits = {
        fp8: teacher_forced_logits(
            make_engine(model, chunk_size=8, fp8=fp8, fp8_group_size=group_size),
            tokens,
            [22, 15],
            [1, 2],
        )
        for fp8 in (False, True)
    }
    assert logits[True][0].shape == logits[False][0].shape
    for fp8_logits, full_logits in zip(logits[True], logits[False], strict=True):
        error = relative_error(fp8_logits, full_logits)
        assert 0 < error < FP8_TOLERANCE  # 0 would mean the latents were not quantized


def test_cache_sizes_for_a_million_tokens():
    args = mla_flavors["1B_long"]
    kwargs = dict(max_tokens=2**20, device="meta")
    bf16 = PagedLatentCache.for_model(args, **kwargs)
    fp8 = PagedLatentCache.for_model(args, fp8=True, **kwargs)
    fp8_groups = PagedLatentCache.for_model(args, fp8=True, fp8_group_size=128, **kwargs)
    assert bf16.bytes_per_token == 16 * (512 + 64) * 2
    assert fp8.bytes_per_token == 16 * (512 + 4 + 64 * 2)  # one scale per token by default
    assert fp8_groups.bytes_per_token == 16 * (512 + 4 * 4 + 64 * 2)
    assert bf16.nbytes / 2**30 == pytest.approx(18.0, rel=1e-3)  # + the null page
    assert fp8.nbytes / 2**30 == pytest.approx(10.06, rel=1e-3)
    budget = PagedLatentCache.for_model(args, memory_gib=18.0, device="meta")
    assert budget.capacity_tokens == 2**20


def test_request_that_does_not_fit_is_a_clear_error():
    cache = PagedLatentCache(2, 32, 16, num_pages=8, page_size=16, max_seqs=3, dtype=torch.float32)
    cache.extend(0, 100)  # 7 pages
    cache.extend(1, 10)  # 1 page
    with pytest.raises(CacheFullError) as request:
        cache.extend(2, 50)
    assert_expected_inline(
        str(request.value),
        """request of 50 tokens needs 4 pages of 16; 0 free (pool of 8 pages, 128 tokens)""",
    )
    with pytest.raises(CacheFullError) as extension:
        cache.extend(0, 20)
    assert_expected_inline(
        str(extension.value),
        """extending sequence 0 from 100 to 120 tokens needs 1 more page of 16; 0 free (pool of 8 pages, 128 tokens)""",
    )
    limited = PagedLatentCache(2, 32, 16, num_pages=8, page_size=16, max_pages_per_seq=2)
    with pytest.raises(CacheFullError) as too_long:
        limited.extend(0, 40)
    assert_expected_inline(
        str(too_long.value),
        """request of 40 tokens needs 3 pages of 16; a sequence holds at most 2 pages (pool of 8 pages, 128 tokens)""",
    )


def test_pages_return_to_the_pool(model, reference_decode):
    engine = make_engine(model, max_seqs=2)
    cache = engine.cache
    engine.prefill([[1] * 40, [2] * 464], [0, 1])  # 3 + 29 pages: the whole pool
    assert len(cache.free_pages) == 0
    # The batch does not fit (sequence 1 needs a 33rd page): neither sequence grows.
    with pytest.raises(CacheFullError):
        engine.decode(torch.tensor([[3], [4]]), [0, 1])
    assert cache.lengths == [40, 464] and cache.block_table[0, 2] == 3
    cache.truncate(0, 16)
    assert cache.lengths[0] == 16 and sorted(cache.free_pages) == [2, 3]
    cache.free(1)
    assert len(cache.free_pages) == 31 and cache.block_table[1].eq(0).all()


def test_compiled_decode_step_is_one_layer_graph_writing_the_cache_in_place(
    model, reference_decode
):
    """compile_decode_step builds two graphs (a decode layer that every layer reuses, the head),
    and Inductor's layer code writes the new latent into the cache pool it was given without
    allocating a copy of the pool (a functionalized write into a view of the all-layer pool copies
    the whole cache per layer and step: 1.1 s instead of 5 ms at 640 MB on CPU)."""
    from torch._inductor.utils import run_and_get_code

    from titan_mla.quantization import compile_decode_step

    engine = make_engine(model, max_seqs=1)  # 32 pages of 16 tokens (+ the null page)
    engine.prefill([random_tokens(1, 20)[0].tolist()], [0])
    pool_before = engine.cache.latent.clone()
    compile_decode_step(engine, fullgraph=True)
    torch._dynamo.utils.counters.clear()
    _, code = run_and_get_code(lambda: engine.decode(torch.tensor([[7]]), [0]))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    assert not torch._dynamo.utils.counters["recompiles"]

    lines = "\n".join(code).splitlines()
    pool_shape = str(tuple(engine.cache.latent.shape[1:]))[1:-1]
    allocations = [line for line in lines if "empty_strided" in line]
    assert not [line for line in allocations if pool_shape in line], allocations
    assert len([line for line in lines if "write_latent_cache.default(" in line]) == 1
    # Position 20 (page 1, slot 4 of the sequence's pages) changed in every layer, nothing else.
    changed = (engine.cache.latent != pool_before).any(dim=-1).nonzero().tolist()
    page = engine.cache.block_table[0, 1].item()
    assert changed == [[layer, page, 4] for layer in range(TINY.n_layers)]


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([[3.0, 2.0, 1.0, -5.0]]).log_softmax(-1).expand(2000, -1)
    rng = torch.Generator().manual_seed(0)
    drawn = sample(logits, 1.0, 0.7, rng)  # probabilities 0.66, 0.24, 0.09, 0.0: keeps two
    assert set(drawn.tolist()) == {0, 1}
    assert sample(logits[:1], 0.0, 0.7, rng).tolist() == [0]


# Checkpoints and generation.


def save_debug_checkpoint(folder: Path, prefix: str) -> None:
    """A debugmodel checkpoint written by dcp.save with the weights under ``prefix``."""
    torch.manual_seed(0)
    model = MLATransformer(mla_flavors["debugmodel"])
    dcp.save({prefix + k: v for k, v in model.state_dict().items()}, checkpoint_id=folder)


def test_missing_checkpoint_unknown_flavor_and_mismatched_flavor_are_clear_errors(tmp_path):
    def error(checkpoint: Path, *overrides: str) -> str:
        with pytest.raises((FileNotFoundError, ValueError)) as raised:
            Generator.from_checkpoint(DEBUG_CONFIG, checkpoint, overrides=overrides)
        return str(raised.value).replace(str(tmp_path), "TMP")

    assert_expected_inline(
        error(tmp_path / "missing"), """checkpoint folder 'TMP/missing' does not exist"""
    )
    assert_expected_inline(
        error(tmp_path),
        """'TMP' is not a DCP checkpoint (no .metadata) and holds no step-N checkpoints""",
    )
    save_debug_checkpoint(tmp_path / "step-3", prefix="model.")
    assert_expected_inline(
        error(tmp_path, "--model.flavor=2B"),
        """unknown model.flavor '2B'; titan_mla has ['1B', '1B_long', '1B_yarn128k', '1B_yarn32k', 'debugmodel']""",
    )
    assert_expected_inline(
        error(tmp_path, "--model.flavor=1B"),
        """checkpoint 'TMP/step-3' does not match flavor '1B': of the flavor's 163 weights, 120 are missing (e.g. layers.4.attention_norm.weight, layers.4.attention.wq.weight), 43 have another shape (checkpoint vs flavor: tok_embeddings.weight (8192, 256) vs (32768, 2048); layers.0.attention_norm.weight (256,) vs (2048,))""",
    )


def test_model_prefixed_checkpoint_loads(tmp_path):
    save_debug_checkpoint(tmp_path / "step-3", prefix="model.")
    # On the CPU in fp32 (a CUDA machine's default is bf16): the weights must load bit for bit.
    generator = Generator.from_checkpoint(DEBUG_CONFIG, tmp_path, max_batch=1, device="cpu")
    torch.manual_seed(0)
    expected = MLATransformer(mla_flavors["debugmodel"]).state_dict()
    for name, tensor in generator.model.state_dict().items():
        assert torch.equal(tensor.cpu(), expected[name]), name


TRAIN_OVERRIDES = (
    "--training.steps=2",
    "--training.local_batch_size=2",
    "--training.seq_len=64",
    "--checkpoint.enable",
    "--checkpoint.interval=1",
    "--checkpoint.last_save_model_only",
)
# PyTorch norms and rotations in the generating processes (see TINY); an override, as for training.
GENERATE_OVERRIDES = ("--model.kernels=torch",)


@pytest.fixture(scope="module", autouse=True)
def background_training(request, tmp_path_factory):
    """Training the debug model takes ~25 s, mostly process start-up: when a test of this run needs
    the checkpoints, start it before the first test and let the others run meanwhile."""
    if not any("trained_checkpoints" in item.fixturenames for item in request.session.items):
        yield None
        return
    folder = tmp_path_factory.mktemp("trained")
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield folder, pool.submit(run_train, folder, *TRAIN_OVERRIDES)


@pytest.fixture(scope="module")
def trained_checkpoints(background_training) -> Path:
    """The debug model trained 2 steps: step-1 holds the full training state, step-2 (the last,
    with last_save_model_only) the model alone."""
    folder, training = background_training
    returncode, _, output = training.result()
    assert returncode == 0, output[-3000:]
    return folder / "checkpoint"


def generate_command(checkpoint: Path, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "titan_mla.generate", "--job.config_file", str(DEBUG_CONFIG),
        *GENERATE_OVERRIDES, "--checkpoint", str(checkpoint), *args,
    ]  # fmt: skip


def test_generation_from_trained_checkpoint_api_and_cli_agree(trained_checkpoints, monkeypatch):
    # The CLI, given the checkpoint folder, takes its latest step (step-2). It runs meanwhile.
    greedy_args = ("--prompt", "The list", "--max-new-tokens", "8", "--temperature", "0")
    cli = subprocess.Popen(
        generate_command(trained_checkpoints, *greedy_args, "--ignore-eos"),
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},  # as below
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    monkeypatch.setattr(dispatch, "KERNELS_INTERPRETED", False)
    generator = Generator.from_checkpoint(
        DEBUG_CONFIG, trained_checkpoints / "step-2", overrides=GENERATE_OVERRIDES
    )
    pieces = []
    [greedy] = generator.generate(
        ["The list"],
        max_new_tokens=8,
        temperature=0.0,
        stream_callback=lambda i, text: pieces.append((i, text)),
        stop_at_eos=False,
    )
    assert len(greedy.token_ids) == 8 and greedy.decode_tokens_per_s > 0
    assert "".join(text for _, text in pieces) == greedy.text and {i for i, _ in pieces} == {0}

    # A batch, sampled: reproducible from the seed; the full-state checkpoint loads as well.
    full_state = Generator.from_checkpoint(
        DEBUG_CONFIG, trained_checkpoints / "step-1", overrides=GENERATE_OVERRIDES
    )
    prompts = ["def main(", "The list"]
    batches = [full_state.generate(prompts, 6, temperature=0.8, top_p=0.9, seed=3) for _ in "ab"]
    assert [c.token_ids for c in batches[0]] == [c.token_ids for c in batches[1]]
    assert all(0 < len(c.token_ids) <= 6 for c in batches[0])

    stdout, stderr = cli.communicate(timeout=120)
    assert cli.returncode == 0, stderr[-3000:]
    streamed, stats = stdout.rstrip("\n").rsplit("\n", 1)
    assert streamed == "The list" + greedy.text
    assert stats.startswith("prefill: 3 tokens, ") and " | decode: 8 tokens, " in stats
    assert stats.endswith(" tokens/s")


def test_cli_reports_a_missing_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        generate.main(generate_command(tmp_path / "nope", "--prompt", "x")[3:])
    assert_expected_inline(
        str(exit_.value).replace(str(tmp_path), "TMP"),
        """titan_mla.generate: error: checkpoint folder 'TMP/nope' does not exist""",
    )


# GPU only (skipped without CUDA).

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# The 1B model's attention shapes (kv_lora_rank 512, rope 64, 16 heads of 128) in 2 layers.
GPU_ARGS = dataclasses.replace(mla_flavors["1B"], n_layers=2, vocab_size=4096, max_seq_len=1024)


def gpu_model(dtype: torch.dtype) -> MLATransformer:
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = MLATransformer(GPU_ARGS)
        with torch.no_grad():
            model.init_weights()
    return model.to(dtype).eval()


@needs_cuda
@pytest.mark.gpu
def test_gpu_bf16_prefill_and_decode_match_training_forward():
    model = gpu_model(torch.bfloat16)
    cache = PagedLatentCache.for_model(GPU_ARGS, max_tokens=4096, max_seqs=3, device="cuda")
    random.Random(0).shuffle(cache.free_pages)
    engine = MLAEngine(model, cache, chunk_size=256)
    tokens = torch.randint(0, GPU_ARGS.vocab_size, (3, 700), device="cuda")
    with torch.no_grad():
        exact = copy.deepcopy(model).float()(tokens)  # the same weights, fp32 activations
        bf16_forward_error = relative_error(model(tokens).float(), exact)
    logits = teacher_forced_logits(engine, tokens, [600, 333, 77], [1, 4, 1])
    for b, seq_logits in enumerate(logits):
        # bf16 rounding in another order (absorbed decode): about the training forward's own.
        error = relative_error(seq_logits.float(), exact[b, : len(seq_logits)])
        assert error < max(3 * bf16_forward_error, 1e-2), (error, bf16_forward_error)


@needs_cuda
@pytest.mark.gpu
def test_gpu_cuda_graph_replay_equals_eager():
    model = gpu_model(torch.float32)  # fp32: equal up to fp32 rounding, if that
    cache = PagedLatentCache.for_model(
        GPU_ARGS, max_tokens=4096, max_seqs=2, max_tokens_per_seq=1024, dtype=torch.float32,
        device="cuda",
    )  # fmt: skip
    engine = MLAEngine(model, cache)
    engine.prefill([list(range(1, 300)), list(range(5, 70))], [0, 1])
    engine.capture_cuda_graph(batch=2)
    tokens = torch.tensor([[7], [9]], device="cuda")
    for _ in range(70):  # over page boundaries: new pages enter the block table
        replayed = engine.decode(tokens, [0, 1])
        # The same step eagerly, on the graph's full-width block table: rewrites the same latents.
        lengths = torch.tensor(cache.lengths[:2], dtype=torch.int32, device="cuda")
        eager = engine.decode_step(tokens, cache.block_table[:2], lengths)
        torch.testing.assert_close(replayed, eager, rtol=1e-5, atol=1e-5)
        tokens = replayed[:, -1].argmax(-1, keepdim=True)


@needs_cuda
@pytest.mark.gpu
def test_gpu_generation_with_cuda_graph_equals_eager(tmp_path):
    save_debug_checkpoint(tmp_path / "step-1", prefix="")
    completions = {}
    for cuda_graph in (False, True):
        generator = Generator.from_checkpoint(
            DEBUG_CONFIG, tmp_path, dtype=torch.float32, cuda_graph=cuda_graph
        )
        completions[cuda_graph] = generator.generate(["The list", "def f("], 16, stop_at_eos=False)
    assert [c.token_ids for c in completions[True]] == [c.token_ids for c in completions[False]]
