"""Addition written as text, a task with checkable answers, built in (as the digits are for images).

A problem is ``"487+026="``, its operands written with ``digits`` digits each (zeros in front), its answer the sum
written least significant digit first (``"315"`` for 513: a small causal model then adds digit by digit with the
carry, as on paper), then the end-of-text token. Fixed-width operands put the digits to add at the same positions in
every problem, which a small model learns in a minute on a CPU. Operands have 1 to ``digits`` digits, drawn from
``data_seed``; the test and validation problems never occur in training. Tokens are
characters (:class:`CharTokenizer`: padding, end of text, ``0-9``, ``+``, ``=``). Only the answer and its end token
are learned; ``exact_match`` marks the task for the greedy exact-match metric (``test/exact_match``).
"""

from __future__ import annotations

import random

import torch
from torch import Tensor

from kd_lightning.data.batch import IGNORE_INDEX
from kd_lightning.data.memory import InMemoryDataModule
from kd_lightning.errors import KDError, check_integer


class CharTokenizer:
    """One token per character of ``0123456789+=``, after ``<pad>`` (0) and ``<eos>`` (1)."""

    SYMBOLS = ["<pad>", "<eos>", *"0123456789+="]
    pad_token_id, eos_token_id = 0, 1

    def __len__(self) -> int:
        return len(self.SYMBOLS)

    def encode(self, text: str) -> list[int]:
        return [self.SYMBOLS.index(char) for char in text]

    def decode(self, ids: list[int] | Tensor) -> str:
        """The characters of ``ids`` up to the first end token; padding left out."""
        text = []
        for token in ids.tolist() if isinstance(ids, Tensor) else ids:
            if token == self.eos_token_id:
                break
            if token != self.pad_token_id:
                text.append(self.SYMBOLS[token])
        return "".join(text)


class ArithmeticDataModule(InMemoryDataModule):
    """``a+b=`` prompts and their sums (reversed digits), as next-token batches with only the answers labelled.

    Args:
        digits: the most digits of an operand (each operand has 1 to ``digits``, uniformly).
        train_size, val_size, test_size: problems per split (distinct; validation and test never in training).
        data_seed: seed of the problems alone, so every run sees the same test problems.
        block_size: the models' context (``data.block_size``), at least a whole problem and its answer.
        vocab_size: the tokenizer's 14 tokens (model configs read ``data.vocab_size``).
    """

    task = "tokens"
    exact_match = True  # the greedy completion of each prompt is checked against its answer

    def __init__(
        self,
        digits: int = 3,
        train_size: int = 20_000,
        val_size: int = 500,
        test_size: int = 1_000,
        data_seed: int = 0,
        block_size: int = 16,
        batch_size: int = 64,
        eval_batch_size: int | None = 256,
        vocab_size: int | None = None,
        num_classes: int | None = None,
        **kwargs,
    ) -> None:
        self.tokenizer = CharTokenizer()
        for key, value in (("data.vocab_size", vocab_size), ("data.num_classes", num_classes)):
            if value not in (None, len(self.tokenizer)):
                raise KDError(f"the arithmetic task has {len(self.tokenizer)} tokens; set {key}={len(self.tokenizer)}.")
        for key, value in (
            ("data.digits", digits),
            ("data.train_size", train_size),
            ("data.val_size", val_size),
            ("data.test_size", test_size),
        ):
            check_integer(key, value)
        distinct = (10**digits) ** 2
        if train_size + val_size + test_size > distinct // 2:
            raise KDError(
                f"{train_size + val_size + test_size} problems of at most {digits} digits are too many to keep "
                f"test problems out of training (there are {distinct}); raise data.digits or shrink the splits."
            )
        longest = 2 * digits + 2 + digits + 1 + 1  # a+b= , the sum, the end token
        if block_size < longest - 1:
            raise KDError(
                f"data.block_size={block_size} is shorter than a problem of {digits}-digit operands and its answer "
                f"({longest - 1} positions); set data.block_size={longest - 1} or more."
            )
        super().__init__(
            batch_size=batch_size, eval_batch_size=eval_batch_size, num_classes=len(self.tokenizer), **kwargs
        )
        self.digits, self.sizes, self.data_seed, self.block_size = (
            digits,
            (train_size, val_size, test_size),
            data_seed,
            block_size,
        )
        self.width = longest - 1

    def example_input(self, batch_size: int = 2) -> Tensor:
        return torch.zeros(batch_size, self.width, dtype=torch.long)

    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def problems(self) -> dict[str, list[tuple[int, int]]]:
        """Distinct ``(a, b)`` pairs per split, drawn from ``data_seed``: test first, then validation, then training."""
        draw = random.Random(self.data_seed)

        def operand() -> int:  # 1 to `digits` digits, uniformly, then any number of that many digits
            length = draw.randint(1, self.digits)
            return draw.randrange(0 if length == 1 else 10 ** (length - 1), 10**length)

        seen: set[tuple[int, int]] = set()
        splits = {}
        for split, size in zip(("test", "val", "train"), self.sizes[::-1]):
            chosen = []
            while len(chosen) < size:
                a, b = operand(), operand()
                if (a, b) not in seen:
                    seen.add((a, b))
                    chosen.append((a, b))
            splits[split] = chosen
        return splits

    def encode(self, a: int, b: int) -> tuple[list[int], list[int]]:
        """``(inputs, labels)`` of one problem, padded to the split's width: labels only on the answer and its end."""
        prompt = self.tokenizer.encode(f"{a:0{self.digits}d}+{b:0{self.digits}d}=")
        answer = self.tokenizer.encode(str(a + b)[::-1]) + [self.tokenizer.eos_token_id]
        tokens = prompt + answer + [self.tokenizer.pad_token_id] * (self.width + 1 - len(prompt) - len(answer))
        labels = (
            [IGNORE_INDEX] * (len(prompt) - 1) + answer + [IGNORE_INDEX] * (self.width + 1 - len(prompt) - len(answer))
        )
        return tokens[:-1], labels

    def load_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        splits = {}
        for split, pairs in self.problems().items():
            rows = [self.encode(a, b) for a, b in pairs]
            splits[split] = (torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows]))
        return splits
