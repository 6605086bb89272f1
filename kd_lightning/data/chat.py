"""Chat and instruction data: conversations rendered with the tokenizer's chat template, every assistant turn supervised.

``data=chat data.data_dir=DIR``: ``DIR`` holds ``train``, ``validation`` and ``test`` files (``.jsonl`` or ``.json``),
each example either ``{"messages": [{"role": ..., "content": ...}, ...]}`` or ``{"prompt": ..., "completion": ...}``.

How a conversation becomes a sequence: the chat template (the tokenizer's, or ``data.chat_template``) renders the
conversation up to each assistant turn with the generation prompt, and up to the end of that turn; the text between
is the assistant's. The pieces are tokenized one after another (never across the border of a turn), so each turn's
tokens are exactly those of its text, its end-of-turn / EOS token included, however the tokenizer's pad token is
set. The labels are the next tokens, kept (not ``-100``) only where the next token belongs to a supervised assistant
turn (``data.supervise``: ``all`` of them, or the ``last``). Sequences are padded on the right to ``data.max_length``
tokens, padding labelled ``-100``: a causal model never looks ahead, so its real tokens never see the padding.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kd_lightning.data.batch import IGNORE_INDEX
from kd_lightning.data.memory import InMemoryDataModule
from kd_lightning.errors import KDError, check_integer

log = logging.getLogger(__name__)

SPLIT_FILES = {"train": "train", "val": "validation", "test": "test"}
ROLES = ("system", "user", "assistant", "tool")


class ChatDataModule(InMemoryDataModule):
    """Conversations in, next-token batches out, with only the assistant's tokens labelled.

    Args:
        data_dir: a folder with ``train``, ``validation`` and ``test`` files (``.jsonl`` or ``.json``).
        tokenizer: a pretrained tokenizer (folder or hub id; by default a pretrained teacher's, ``teacher=hf``).
        vocab_size: the tokenizer's number of tokens (the models' output rows, ``data.num_classes``).
        max_length: tokens per sequence.
        truncation: ``refuse`` a longer conversation, or cut it on the ``right`` (a count is logged).
        supervise: ``all`` assistant turns, or only the ``last`` of each conversation.
        chat_template: a Jinja chat template for a tokenizer without one.
        block_size: the models' context, which model configs read (``${data.max_length}``); at least ``max_length``.
    """

    task = "tokens"

    def __init__(self, data_dir: str, tokenizer: str | None = None, vocab_size: int | None = None, max_length: int = 512,
                 truncation: str = "refuse", supervise: str = "all", chat_template: str | None = None,
                 block_size: int | None = None, batch_size: int = 8, eval_batch_size: int | None = None, num_classes: int | None = None, **kwargs: Any) -> None:
        if num_classes not in (None, vocab_size):
            raise KDError(f"data.num_classes ({num_classes}) must equal data.vocab_size ({vocab_size}) for chat data.")
        if not tokenizer:
            raise KDError("chat data needs a pretrained tokenizer with a chat template: set data.tokenizer=DIR_OR_HUB_ID (by "
                          "default the teacher's folder, with teacher=hf teacher.model.path=...).")
        check_integer("data.vocab_size", vocab_size)
        check_integer("data.max_length", max_length, 2)
        if truncation not in ("refuse", "right"):
            raise KDError(f"data.truncation must be refuse or right, got {truncation!r}.")
        if block_size is not None and block_size < max_length:
            raise KDError(f"data.block_size={block_size} (the models' context) is below data.max_length={max_length}.")
        if supervise not in ("all", "last"):
            raise KDError(f"data.supervise must be all or last, got {supervise!r}.")
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_classes=vocab_size, **kwargs)
        self.data_dir, self.pretrained, self.vocab_size = Path(data_dir), tokenizer, vocab_size
        self.max_length, self.truncation, self.supervise, self.chat_template = max_length, truncation, supervise, chat_template
        self.tokenizer: Any = None

    def example_input(self, batch_size: int = 2) -> Tensor:
        return torch.zeros(batch_size, self.max_length, dtype=torch.long)

    def load_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        from kd_lightning.models.pretrained import pretrained_tokenizer

        self.tokenizer = pretrained_tokenizer(self.pretrained, vocab_size=self.vocab_size)
        if self.chat_template is not None:
            self.tokenizer.chat_template = self.chat_template
        if not getattr(self.tokenizer, "chat_template", None):
            raise KDError(f"the tokenizer {self.pretrained} has no chat template; set data.chat_template to one (a Jinja "
                          "template, as in tokenizer_config.json).")
        splits = {}
        for split, stem in SPLIT_FILES.items():
            path = self.split_file(stem)
            sequences = [self.encode(conversation(example, path, i), path, i) for i, example in enumerate(read_examples(path))]
            splits[split] = self.pad(sequences, path)
        return splits

    def split_file(self, stem: str) -> Path:
        if not self.data_dir.is_dir():
            raise KDError(f"data.data_dir={self.data_dir} is not a folder; point it at a folder with train, validation and "
                          "test files (.jsonl or .json).")
        found = [self.data_dir / f"{stem}{suffix}" for suffix in (".jsonl", ".json") if (self.data_dir / f"{stem}{suffix}").is_file()]
        if not found:
            raise KDError(f"data.data_dir={self.data_dir} has no {stem}.jsonl or {stem}.json; it needs train, validation and "
                          "test files.")
        return found[0]

    def encode(self, messages: list[dict[str, str]], path: Path, index: int) -> tuple[list[int], list[bool]]:
        """``(token ids, whether each is an assistant token to supervise)`` of one conversation."""
        def render(upto: int, prompt: bool) -> str:
            return self.tokenizer.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=prompt)

        turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
        supervised = set(turns if self.supervise == "all" else turns[-1:])
        pieces: list[tuple[str, bool]] = []
        done = ""
        for turn in turns:
            start, end = render(turn, True), render(turn + 1, False)
            if not (start.startswith(done) and end.startswith(start)):
                raise KDError(f"{path}, example {index}: the chat template does not render the conversation as a sequence "
                              "of prefixes (each turn appended to the one before), so the assistant's tokens cannot be told "
                              "apart; use a template that does.")
            pieces += [(start[len(done):], False), (end[len(start):], turn in supervised)]
            done = end
        pieces.append((render(len(messages), False)[len(done):], False))
        ids: list[int] = []
        mask: list[bool] = []
        for text, assistant in pieces:
            if text:
                piece = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                ids += piece
                mask += [assistant] * len(piece)
        return ids, mask

    def pad(self, sequences: list[tuple[list[int], list[bool]]], path: Path) -> tuple[Tensor, Tensor]:
        """``(inputs, labels)`` of shape ``(N, max_length)``: the next token is the label where it is supervised."""
        length = self.max_length + 1  # inputs and labels are the sequence shifted by one
        long = [i for i, (ids, _) in enumerate(sequences) if len(ids) > length]
        if long and self.truncation == "refuse":
            longest = max(len(sequences[i][0]) for i in long)
            raise KDError(f"{path}: {len(long)} of {len(sequences)} conversations are longer than data.max_length="
                          f"{self.max_length} tokens (the longest has {longest}); raise data.max_length, or cut them with "
                          "data.truncation=right.")
        if long:
            log.info("chat data: %d of %d conversations in %s cut to data.max_length=%d tokens", len(long), len(sequences),
                     path.name, self.max_length)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id or 0
        tokens = torch.full((len(sequences), length), pad, dtype=torch.long)
        keep = torch.zeros((len(sequences), length), dtype=torch.bool)
        for row, (ids, mask) in enumerate(sequences):
            ids, mask = ids[:length], mask[:length]
            tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            keep[row, : len(mask)] = torch.tensor(mask, dtype=torch.bool)
        labels = torch.where(keep[:, 1:], tokens[:, 1:], IGNORE_INDEX)
        if not (labels != IGNORE_INDEX).any():
            raise KDError(f"{path}: no assistant token is left to learn from (after truncation to data.max_length="
                          f"{self.max_length}); check the conversations and data.max_length.")
        return tokens[:, :-1].contiguous(), labels

    def save_tokenizer(self, folder: Path) -> None:
        """The run's tokenizer (its chat template included), for ``export --format hf``."""
        from kd_lightning.models.pretrained import save_tokenizer

        save_tokenizer(self.tokenizer, folder)


def read_examples(path: Path) -> list[Any]:
    """The examples of a ``.jsonl`` (one JSON object a line) or ``.json`` (a list of objects) file."""
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        examples = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise KDError(f"{path} is not valid {path.suffix[1:]} ({error}); fix or replace the file.") from None
    if not isinstance(examples, list):
        raise KDError(f"{path} must hold a list of examples, got {type(examples).__name__}.")
    return examples


def conversation(example: Any, path: Path, index: int) -> list[dict[str, str]]:
    """An example as chat messages: its ``messages``, or a user ``prompt`` and an assistant ``completion``."""
    where = f"{path}, example {index}"
    if isinstance(example, dict) and "messages" in example:
        messages = example["messages"]
    elif isinstance(example, dict) and {"prompt", "completion"} <= set(example):
        messages = [{"role": "user", "content": example["prompt"]}, {"role": "assistant", "content": example["completion"]}]
    else:
        raise KDError(f"{where} has neither messages nor prompt and completion; give each example one of them.")
    if not isinstance(messages, list) or not messages:
        raise KDError(f"{where} is an empty conversation; every example needs at least one assistant turn.")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise KDError(f"{where}: each message needs a role and a text content, got {message!r}.")
        if message.get("role") not in ROLES:
            raise KDError(f"{where} has a message of role {message.get('role')!r}; the roles are {', '.join(ROLES)}.")
    if not any(message["role"] == "assistant" for message in messages):
        raise KDError(f"{where} has no assistant turn: nothing to learn from; every example needs at least one.")
    return messages
