"""Text generation: a job config and a checkpoint in, completions out.

generator = Generator.from_checkpoint(config_file="train_configs/debug_model.toml",
                                      checkpoint="outputs/debug_model/checkpoint/step-30")
[completion] = generator.generate(["def main("], max_new_tokens=64, temperature=0.8, top_p=0.9)
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torchtitan.components.tokenizer import HuggingFaceTokenizer
from torchtitan.config import ConfigManager, JobConfig

from titan_mla.data.tokenizer import build_tokenizer
from titan_mla.models import MLATransformer, mla_flavors
from titan_mla.models.rope import rope_cos_sin

from .cache import PagedLatentCache
from .checkpoint import find_model_weights, load_model_weights
from .engine import MLAEngine


@dataclass
class Completion:
    prompt: str
    text: str  # the generated text only
    token_ids: list[int]  # generated ids; the end-of-sequence token that stopped it is not kept
    prompt_tokens: int
    # Throughput of the whole batch: prompt tokens over prefill time, and the tokens the decode
    # steps produced (each sequence's first token comes from prefill) over decode time.
    prefill_tokens_per_s: float
    decode_tokens_per_s: float


def sample(
    logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> Tensor:
    """Next token ids (batch,) from logits (batch, vocab): argmax when temperature is 0, else
    nucleus sampling from the smallest set of tokens whose probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Mass before each token: the most likely token always stays.
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(outside, 0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Generator:
    """Batched generation over an MLAEngine whose cache holds ``max_batch`` sequences of up to
    ``max_seq_len`` tokens each (prompt and completion)."""

    def __init__(
        self,
        model: MLATransformer,
        tokenizer: HuggingFaceTokenizer,
        *,
        max_batch: int = 8,
        max_seq_len: int | None = None,
        page_size: int = 64,
        fp8_cache: bool = False,
        chunk_size: int = 2048,
        cuda_graph: bool = True,
    ):
        args = model.model_args
        self.model, self.tokenizer = model, tokenizer
        self.device = model.output.weight.device
        self.max_seq_len = max_seq_len or args.max_seq_len
        cache = PagedLatentCache.for_model(
            args,
            max_tokens=max_batch * self.max_seq_len,
            max_tokens_per_seq=self.max_seq_len,
            page_size=page_size,
            max_seqs=max_batch,
            dtype=model.output.weight.dtype,
            fp8=fp8_cache,
            device=self.device,
        )
        self.engine = MLAEngine(model, cache, chunk_size=chunk_size)
        self.cuda_graph = cuda_graph and self.device.type == "cuda"

    @classmethod
    def from_checkpoint(
        cls,
        config_file: str | Path,
        checkpoint: str | Path,
        *,
        overrides: Sequence[str] = (),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs,
    ) -> Generator:
        """The model of a job config (a training TOML; ``overrides`` as ``--section.key=value``, as
        for training) with the weights of a DCP checkpoint (a step folder, or the checkpoint folder
        for its latest step), in ``dtype`` (default bf16 on CUDA, fp32 on CPU) on ``device``
        (default CUDA when there is one). ``kwargs`` go to the constructor."""
        job_config = parse_job_config(config_file, overrides)
        flavor = job_config.model.flavor
        if flavor not in mla_flavors:
            raise ValueError(
                f"unknown model.flavor '{flavor}'; titan_mla has {sorted(mla_flavors)}"
            )
        args = copy.deepcopy(mla_flavors[flavor])
        args.update_from_config(job_config)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)

        # Check the checkpoint before allocating, then allocate without initializing: the
        # checkpoint overwrites every weight.
        with torch.device("meta"):
            model = MLATransformer(args)
        folder, prefix = find_model_weights(checkpoint, model, flavor)
        model = model.to(dtype).to_empty(device=device).eval()
        model.rope_cache = rope_cos_sin(args, device)  # a buffer, not in the checkpoint
        load_model_weights(model, folder, prefix)
        return cls(model, build_tokenizer(job_config), **kwargs)

    def generate(
        self,
        prompts: list[str],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stream_callback: Callable[[int, str], None] | None = None,
        stop_at_eos: bool = True,
    ) -> list[Completion]:
        """Complete every prompt with up to ``max_new_tokens`` tokens (fewer when it ends with the
        end-of-sequence token and ``stop_at_eos``). ``stream_callback(i, text)`` receives each new
        piece of prompt i's completion as soon as it decodes to whole characters."""
        prompt_ids = [self.tokenizer.encode(p, add_bos=True, add_eos=False) for p in prompts]
        if len(prompts) > self.engine.cache.max_seqs:
            raise ValueError(
                f"{len(prompts)} prompts; this generator takes up to {self.engine.cache.max_seqs}"
            )
        for i, ids in enumerate(prompt_ids):
            # The last sampled token is never fed back, hence the - 1.
            if len(ids) + max_new_tokens - 1 > self.max_seq_len:
                raise ValueError(
                    f"prompt {i} ({len(ids)} tokens) plus {max_new_tokens} new tokens exceeds "
                    f"max_seq_len={self.max_seq_len}"
                )
        seqs = list(range(len(prompts)))
        rng = torch.Generator(self.device).manual_seed(seed)
        if self.cuda_graph and (len(prompts), 1) not in self.engine.graphs:
            self.engine.capture_cuda_graph(len(prompts))

        generated: list[list[int]] = [[] for _ in prompts]
        streamed = [""] * len(prompts)
        finished = [False] * len(prompts)
        try:
            start = self._now()
            next_tokens = sample(self.engine.prefill(prompt_ids, seqs), temperature, top_p, rng)
            prefill_s = self._now() - start

            start = self._now()
            for step in range(max_new_tokens):
                for i, token in enumerate(next_tokens.tolist()):
                    if finished[i]:
                        continue
                    if stop_at_eos and token == self.tokenizer.eos_id:
                        finished[i] = True
                        continue
                    generated[i].append(token)
                    if stream_callback is not None:
                        streamed[i] = self._stream(i, generated[i], streamed[i], stream_callback)
                if all(finished) or step == max_new_tokens - 1:
                    break
                logits = self.engine.decode(next_tokens[:, None], seqs)[:, -1]
                next_tokens = sample(logits, temperature, top_p, rng)
            decode_s = self._now() - start
        finally:
            for seq in seqs:
                self.engine.cache.free(seq)

        decoded_tokens = sum(max(len(ids) - 1, 0) for ids in generated)
        prefill_rate = sum(map(len, prompt_ids)) / prefill_s
        decode_rate = decoded_tokens / decode_s if decoded_tokens else 0.0
        return [
            Completion(p, self.tokenizer.decode(ids), ids, len(p_ids), prefill_rate, decode_rate)
            for p, p_ids, ids in zip(prompts, prompt_ids, generated, strict=True)
        ]

    def _stream(
        self, index: int, ids: list[int], streamed: str, callback: Callable[[int, str], None]
    ) -> str:
        """Send the text of ``ids`` past ``streamed``; returns the text sent so far. Waits while the
        text ends inside a multi-byte character (byte-level BPE splits them over tokens)."""
        text = self.tokenizer.decode(ids)
        if text.endswith("\ufffd") or len(text) <= len(streamed):
            return streamed
        callback(index, text[len(streamed) :])
        return text

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def parse_job_config(config_file: str | Path, overrides: Sequence[str] = ()) -> JobConfig:
    """A torchtitan JobConfig from a TOML file and ``--section.key=value`` overrides, parsed by
    torchtitan's ConfigManager as for training."""
    if not Path(config_file).is_file():
        raise FileNotFoundError(f"config file '{config_file}' does not exist")
    return ConfigManager().parse_args(["--job.config_file", str(config_file), *overrides])
