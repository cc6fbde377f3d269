"""Shared by the tests (import as ``from helpers import ...``: pytest puts tests/ on sys.path, tests
is not a package): runs of ./run_train.sh, and the pieces every custom-op test uses."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
METRIC_LINE = re.compile(r"step:\s*(\d+)\s+loss:\s*([\d.]+)")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# An op test parametrized by device: CPU (the interpreter or the reference) and, where there is
# one, the GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64."""
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def run_without_interpreter(script: str, timeout: int) -> subprocess.CompletedProcess:
    """``python -c script`` at the repository root without TRITON_INTERPRET (conftest sets it for
    the test processes), e.g. to compile kernels for a GPU this machine does not have."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_train(
    dump_folder: Path, *overrides: str, ngpu: int = 1
) -> tuple[int, dict[int, float], str]:
    """Run ./run_train.sh; returns (exit code, {step: loss} of rank 0, combined output)."""
    cmd = [
        str(REPO / "run_train.sh"),
        f"--job.dump_folder={dump_folder}",
        "--metrics.disable_color_printing",
        *overrides,
    ]
    # Training runs as a user runs it: Triton ops on GPU, their PyTorch reference on CPU (conftest's
    # TRITON_INTERPRET, meant for kernel tests, would run every training op in the interpreter).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(NGPU=str(ngpu), LOG_RANK="0")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    losses = {int(step): float(loss) for step, loss in METRIC_LINE.findall(output)}
    return proc.returncode, losses, output


def assert_compiled_matches_eager(
    fn, inputs: list, constants: tuple, grad, backend: str, dynamic: bool | None
) -> None:
    """torch.compile(fn, fullgraph=True) has no graph break, and its output and the gradients of
    ``inputs`` equal eager's; ``constants`` are further arguments that take no gradient."""
    eager_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    compiled_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=dynamic)
    compiled_out = compiled(*compiled_inputs, *constants)
    compiled_out.backward(grad)
    eager_out = fn(*eager_inputs, *constants)
    eager_out.backward(grad)

    assert not torch._dynamo.utils.counters["graph_break"]
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-5)
    for compiled_input, eager_input in zip(compiled_inputs, eager_inputs, strict=True):
        torch.testing.assert_close(compiled_input.grad, eager_input.grad, rtol=1e-5, atol=1e-5)


def exact_length_documents(n_docs: int, n_tokens: int) -> list[str]:
    """Documents that each encode (with BOS and EOS) to exactly n_tokens tokens, so every training
    window of n_tokens is one document and each rank's shard is a known set of windows."""
    from tokenizers import Tokenizer

    from titan_mla.data import builtin_documents
    from titan_mla.data.tokenizer import TOKENIZER_DIR

    tokenizer = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    words = sorted({w for doc in builtin_documents() for w in doc.split() if w.isalpha()})
    word_len = {w: len(tokenizer.encode(" " + w).ids) for w in words}
    rng = random.Random(0)
    docs = []
    for _ in range(n_docs):
        text, count = "", 2  # BOS, EOS
        while count < n_tokens:
            word = rng.choice(words)
            if count + word_len[word] <= n_tokens:
                text, count = text + " " + word, count + word_len[word]
        assert len(tokenizer.encode(text).ids) + 2 == n_tokens
        docs.append(text)
    return docs
