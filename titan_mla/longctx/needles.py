"""Passkey and RULER-style needle-in-a-haystack samples, built in tokens of our tokenizer.

A sample is a prompt of exactly ``length`` token ids: the beginning-of-sequence token, an
instruction, a haystack with the needles spliced in, and a question whose answer the model must
complete. The first needle sits at ``depth`` (0 = the start of the haystack, 1 = its end); the others
at random depths. Everything is drawn from ``random.Random(seed)``, so a seed gives the same sample.

Tasks:
- ``passkey``: one pass key in the classic wording; the answer is its value.
- ``single``: one "special magic number" for a key.
- ``multikey``: the target key's needle among ``distractors`` needles of other keys.
- ``multivalue``: ``values`` needles of the same key; the answer holds all of them.
- ``multiquery``: ``values`` needles of different keys, all asked for.

Haystacks: ``repeat`` (the classic passkey filler sentences, over and over: the only hard tokens
are the needles), ``corpus`` (the default corpus, from a random offset) and ``noise`` (uniformly
random token ids).
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field
from functools import cache
from typing import Any

from torchtitan.components.tokenizer import HuggingFaceTokenizer

from titan_mla.data import builtin_documents
from titan_mla.data.tokenizer import TOKENIZER_DIR

TASKS = ("passkey", "single", "multikey", "multivalue", "multiquery")
HAYSTACKS = ("repeat", "corpus", "noise")
REPEAT_FILLER = (
    " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)
_KEY_WORDS = [
    "amber",
    "apple",
    "bold",
    "brook",
    "calm",
    "cedar",
    "clever",
    "coral",
    "crisp",
    "delta",
    "eager",
    "ember",
    "fancy",
    "fern",
    "gentle",
    "glade",
    "happy",
    "harbor",
    "hollow",
    "ivory",
    "jolly",
    "juniper",
    "keen",
    "lagoon",
    "lively",
    "maple",
    "merry",
    "meadow",
    "noble",
    "oak",
    "olive",
    "orbit",
    "proud",
    "quartz",
    "quiet",
    "raven",
    "rapid",
    "ridge",
    "silver",
    "spruce",
    "swift",
    "tulip",
    "umber",
    "velvet",
    "willow",
    "witty",
    "zephyr",
]
_NUMBER = re.compile(r"\d+")


@dataclass
class Needle:
    key: str
    value: str
    text: str
    token_start: int = 0  # offsets into input_ids, end exclusive
    token_end: int = 0


@dataclass
class NeedleRecord:
    task: str
    haystack: str
    length: int  # prompt tokens, beginning-of-sequence token included
    depth: float
    seed: int
    prompt: str
    input_ids: list[int]
    answers: list[str]  # the values the completion must hold, in order
    answer_text: str  # the completion that states them
    rejected_text: str  # a wrong completion of the same form (DPO's rejected answer)
    needles: list[Needle] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def parse_answers(completion: str, count: int) -> list[str]:
    """The first ``count`` numbers in a completion."""
    return _NUMBER.findall(completion)[:count]


def is_correct(completion: str, answers: list[str]) -> bool:
    return parse_answers(completion, len(answers)) == answers


@cache
def load_tokenizer(path: str = str(TOKENIZER_DIR)) -> HuggingFaceTokenizer:
    return HuggingFaceTokenizer(path)


@cache
def _corpus_ids(tokenizer: HuggingFaceTokenizer) -> tuple[int, ...]:
    return tuple(_encode(tokenizer, "\n\n".join(builtin_documents("train"))))


def _encode(tokenizer: HuggingFaceTokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_bos=False, add_eos=False)


class NeedleGenerator:
    """Builds NeedleRecords of one task and haystack kind; values are ``value_digits``-digit
    numbers (no leading zero)."""

    def __init__(
        self,
        task: str = "passkey",
        haystack: str = "repeat",
        *,
        tokenizer: HuggingFaceTokenizer | None = None,
        value_digits: int = 5,
        distractors: int = 3,
        values: int = 2,
    ):
        if task not in TASKS:
            raise ValueError(f"unknown needle task '{task}'; supported: {', '.join(TASKS)}")
        if haystack not in HAYSTACKS:
            raise ValueError(f"unknown haystack '{haystack}'; supported: {', '.join(HAYSTACKS)}")
        self.task, self.haystack = task, haystack
        self.tokenizer = tokenizer or load_tokenizer()
        self.value_digits, self.distractors, self.values = value_digits, distractors, values

    def _value(self, rng: random.Random, avoid: set[str]) -> str:
        while True:
            value = str(rng.randrange(10 ** (self.value_digits - 1), 10**self.value_digits))
            if value not in avoid:
                return value

    def _draw(self, rng: random.Random) -> tuple[list[Needle], list[Needle], str, str]:
        """(target needles, distractor needles, instruction, question)."""
        used: set[str] = set()

        def value() -> str:
            used.add(v := self._value(rng, used))
            return v

        if self.task == "passkey":
            v = value()
            needle = Needle(
                "pass key", v, f"\nThe pass key is {v}. Remember it. {v} is the pass key.\n"
            )
            instruction = "There is a pass key hidden in the text below. Find and remember it.\n"
            return [needle], [], instruction, "\nWhat is the pass key? The pass key is"
        keys = rng.sample(_KEY_WORDS, 1 + max(self.distractors, self.values))

        def magic(key: str) -> Needle:
            v = value()
            return Needle(key, v, f"\nOne of the special magic numbers for {key} is: {v}.\n")

        instruction = "Special magic numbers are hidden in the text below. Remember them.\n"
        if self.task == "multiquery":
            targets = [magic(k) for k in keys[: self.values]]
            asked = ", ".join(n.key for n in targets)
            question = f"\nWhat are the special magic numbers for {asked}? They are"
            return targets, [], instruction, question
        count = self.values if self.task == "multivalue" else 1
        targets = [magic(keys[0]) for _ in range(count)]
        others = (
            [magic(k) for k in keys[1 : 1 + self.distractors]] if self.task == "multikey" else []
        )
        question = f"\nWhat are all the special magic numbers for {keys[0]}? They are"
        if count == 1:
            question = f"\nWhat is the special magic number for {keys[0]}? It is"
        return targets, others, instruction, question

    def _filler(self, rng: random.Random, count: int) -> list[int]:
        if self.haystack == "noise":
            special = {self.tokenizer.bos_id, self.tokenizer.eos_id}
            vocab = [i for i in range(self.tokenizer.get_vocab_size()) if i not in special]
            return [rng.choice(vocab) for _ in range(count)]
        source = (
            tuple(_encode(self.tokenizer, REPEAT_FILLER))
            if self.haystack == "repeat"
            else _corpus_ids(self.tokenizer)
        )
        start = rng.randrange(len(source))
        reps = (start + count) // len(source) + 1
        return list((source * reps)[start : start + count])

    def record(
        self, length: int, depth: float, seed: int, *, reserve_answer: bool = False
    ) -> NeedleRecord:
        """A sample whose prompt has ``length`` tokens, or with ``reserve_answer`` whose prompt,
        answer and end-of-sequence token together have ``length`` tokens (a training row)."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"needle depth must be in [0, 1], not {depth}")
        rng = random.Random(seed)
        targets, others, instruction, question = self._draw(rng)
        answers = [n.value for n in targets]
        answer_text = " " + ", ".join(answers) + "."
        # Rejected: a distractor's value when there is one, else a fresh value of the same form.
        used = {n.value for n in targets + others}
        wrong = [others[0].value] if others else [self._value(rng, used)]
        wrong += [self._value(rng, used | set(wrong)) for _ in answers[1:]]
        rejected_text = " " + ", ".join(wrong) + "."

        encode = lambda text: _encode(self.tokenizer, text)  # noqa: E731
        head = [self.tokenizer.bos_id, *encode(instruction)]
        tail = encode(question)
        needles = targets + others
        needle_ids = [encode(n.text) for n in needles]
        budget = length - len(head) - len(tail) - sum(map(len, needle_ids))
        if reserve_answer:
            budget -= max(len(encode(answer_text)), len(encode(rejected_text))) + 1
        if budget < 0:
            raise ValueError(
                f"length {length} is too short for a {self.task} sample: it needs at least "
                f"{length - budget} tokens"
            )
        filler = self._filler(rng, budget)
        # Insertion points in the haystack: the first needle at depth, the others anywhere.
        points = [round(depth * budget)] + [rng.randint(0, budget) for _ in needles[1:]]
        order = sorted(range(len(needles)), key=lambda i: (points[i], i))
        ids, done = list(head), 0
        for i in order:
            ids += filler[done : points[i]]
            done = points[i]
            needles[i].token_start = len(ids)
            ids += needle_ids[i]
            needles[i].token_end = len(ids)
        ids += filler[done:] + tail
        return NeedleRecord(
            task=self.task,
            haystack=self.haystack,
            length=len(ids),
            depth=depth,
            seed=seed,
            prompt=self.tokenizer.decode(ids[1:]),
            input_ids=ids,
            answers=answers,
            answer_text=answer_text,
            rejected_text=rejected_text,
            needles=needles,
        )
