"""Chat and instruction data: conversations rendered with the tokenizer's chat template, every assistant turn supervised.

``data=chat data.data_dir=DIR``: ``DIR`` holds ``train``, ``validation`` and ``test`` files (``.jsonl``, ``.json`` or
``.parquet``), or is a ``datasets`` ``DatasetDict`` written by ``save_to_disk``; each example either
``{"messages": [{"role": ..., "content": ...}, ...]}`` or ``{"prompt": ..., "completion": ...}``.

How a conversation becomes a sequence: the chat template (the tokenizer's, or ``data.chat_template``) renders the
conversation up to each assistant turn with the generation prompt, and up to the end of that turn; the text between
is the assistant's. The pieces are tokenized one after another (never across the border of a turn), so each turn's
tokens are exactly those of its text, its end-of-turn / EOS token included, however the tokenizer's pad token is
set. The labels are the next tokens, kept (not ``-100``) only where the next token belongs to a supervised assistant
turn (``data.supervise``: ``all`` of them, or the ``last``).

How sequences become batches: each batch is padded on the right to its longest sequence (padding labelled ``-100``: a
causal model never looks ahead, so its real tokens never see it), and training batches are grouped by length
(:class:`~kd_lightning.data.memory.LengthGroupedShuffle`); the share of padding is logged. With ``data.packing=true``
the sequences are packed one after another into rows of ``data.max_length`` tokens, each with its own position ids
(``position_ids`` restart at 0): a model that keeps attention inside each example by them (transformers' decoders,
:class:`~kd_lightning.models.GPT`; checked before training) computes exactly the logits of the unpacked sequences.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Sampler

from kd_lightning.data.batch import IGNORE_INDEX, Batch
from kd_lightning.data.memory import EpochShuffle, InMemoryDataModule, LengthGroupedShuffle, TensorSplit
from kd_lightning.errors import KDError, check_integer

log = logging.getLogger(__name__)

SPLIT_FILES = {"train": "train", "val": "validation", "test": "test"}
FILE_TYPES = (".jsonl", ".json", ".parquet")
ROLES = ("system", "user", "assistant", "tool")
Example = tuple[list[int], list[int]]  # one sequence's input ids and labels (-100: not learned), of one length


class ChatDataModule(InMemoryDataModule):
    """Conversations in, next-token batches out, with only the assistant's tokens labelled.

    Args:
        data_dir: a folder with ``train``, ``validation`` and ``test`` files (``.jsonl``, ``.json`` or ``.parquet``), or
            a ``datasets.DatasetDict`` saved with ``save_to_disk`` (splits ``train``, ``validation``, ``test``).
        tokenizer: a pretrained tokenizer (folder or hub id; by default a pretrained teacher's, ``teacher=hf``).
        vocab_size: the tokenizer's number of tokens (the models' output rows, ``data.num_classes``).
        max_length: tokens per sequence.
        truncation: ``refuse`` a longer conversation, or cut it on the ``right`` (a count is logged).
        supervise: ``all`` assistant turns, or only the ``last`` of each conversation.
        chat_template: a Jinja chat template for a tokenizer without one.
        packing: pack the sequences into rows of ``max_length`` tokens with per-example ``position_ids``.
        group_by_length: training batches of similar lengths (less padding); else a plain shuffle.
        block_size: the models' context, which model configs read (``${data.max_length}``); at least ``max_length``.
    """

    task = "tokens"

    def __init__(
        self,
        data_dir: str,
        tokenizer: str | None = None,
        vocab_size: int | None = None,
        max_length: int = 512,
        truncation: str = "refuse",
        supervise: str = "all",
        chat_template: str | None = None,
        packing: bool = False,
        group_by_length: bool = True,
        block_size: int | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_classes: int | None = None,
        **kwargs: Any,
    ) -> None:
        if num_classes not in (None, vocab_size):
            raise KDError(f"data.num_classes ({num_classes}) must equal data.vocab_size ({vocab_size}) for chat data.")
        if not tokenizer:
            raise KDError(
                "chat data needs a pretrained tokenizer with a chat template: set data.tokenizer=DIR_OR_HUB_ID (by "
                "default the teacher's folder, with teacher=hf teacher.model.path=...)."
            )
        check_integer("data.vocab_size", vocab_size)
        check_integer("data.max_length", max_length, 2)
        if truncation not in ("refuse", "right"):
            raise KDError(f"data.truncation must be refuse or right, got {truncation!r}.")
        if block_size is not None and block_size < max_length:
            raise KDError(f"data.block_size={block_size} (the models' context) is below data.max_length={max_length}.")
        if supervise not in ("all", "last"):
            raise KDError(f"data.supervise must be all or last, got {supervise!r}.")
        for key, flag in (("data.packing", packing), ("data.group_by_length", group_by_length)):
            if not isinstance(flag, bool):
                raise KDError(f"{key} must be true or false, got {flag!r}.")
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_classes=vocab_size, **kwargs)
        self.data_dir, self.pretrained, self.vocab_size = Path(data_dir), tokenizer, vocab_size
        self.max_length, self.truncation, self.supervise, self.chat_template = (
            max_length,
            truncation,
            supervise,
            chat_template,
        )
        self.packing, self.group_by_length = packing, group_by_length
        self.tokenizer: Any = None

    def example_input(self, batch_size: int = 2) -> Tensor:
        return torch.zeros(batch_size, self.max_length, dtype=torch.long)

    def load_splits(self) -> dict[str, TensorSplit]:
        from kd_lightning.models.pretrained import pretrained_tokenizer

        self.tokenizer = pretrained_tokenizer(self.pretrained, vocab_size=self.vocab_size)
        if self.chat_template is not None:
            self.tokenizer.chat_template = self.chat_template
        if not getattr(self.tokenizer, "chat_template", None):
            raise KDError(
                f"the tokenizer {self.pretrained} has no chat template; set data.chat_template to one (a Jinja "
                "template, as in tokenizer_config.json)."
            )
        splits = {}
        for split, (where, examples) in read_splits(self.data_dir).items():
            conversations = [conversation(example, where, i) for i, example in enumerate(examples)]
            if all(m["content"] == "" for messages in conversations for m in messages if m["role"] == "assistant"):
                raise KDError(
                    f"{where}: every assistant reply is empty, so the student would learn nothing but where a turn "
                    "ends; check how the file was written."
                )
            sequences = self.cut([self.encode(messages, where, i) for i, messages in enumerate(conversations)], where)
            splits[split] = (packed if self.packing else padded)(sequences, self.max_length, self.pad_id())
        self.log_padding(splits["train"])
        return splits

    def encode(self, messages: list[dict[str, str]], where: str, index: int) -> tuple[list[int], list[bool]]:
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
                raise KDError(
                    f"{where}, example {index}: the chat template does not render the conversation as a sequence "
                    "of prefixes (each turn appended to the one before), so the assistant's tokens cannot be told "
                    "apart; use a template that does."
                )
            pieces += [(start[len(done) :], False), (end[len(start) :], turn in supervised)]
            done = end
        pieces.append((render(len(messages), False)[len(done) :], False))
        ids: list[int] = []
        mask: list[bool] = []
        for text, assistant in pieces:
            if text:
                piece = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                ids += piece
                mask += [assistant] * len(piece)
        return ids, mask

    def cut(self, sequences: list[tuple[list[int], list[bool]]], where: str) -> list[Example]:
        """Each conversation as ``(inputs, labels)`` of at most ``max_length`` tokens: the labels are the next tokens where
        they are supervised, else ``-100``."""
        length = self.max_length + 1  # inputs and labels are the sequence shifted by one
        long = [i for i, (ids, _) in enumerate(sequences) if len(ids) > length]
        if long and self.truncation == "refuse":
            longest = max(len(sequences[i][0]) for i in long)
            raise KDError(
                f"{where}: {len(long)} of {len(sequences)} conversations are longer than data.max_length="
                f"{self.max_length} tokens (the longest has {longest}); raise data.max_length, or cut them with "
                "data.truncation=right."
            )
        if long:
            log.info(
                "chat data: %d of %d conversations in %s cut to data.max_length=%d tokens",
                len(long),
                len(sequences),
                Path(where).name,
                self.max_length,
            )
        examples = []
        for ids, mask in sequences:
            ids, mask = ids[:length], mask[:length]
            examples.append((ids[:-1], [token if keep else IGNORE_INDEX for token, keep in zip(ids[1:], mask[1:])]))
        if not any(label != IGNORE_INDEX for _, labels in examples for label in labels):
            raise KDError(
                f"{where}: no assistant token is left to learn from (after truncation to data.max_length="
                f"{self.max_length}); check the conversations and data.max_length."
            )
        return examples

    def pad_id(self) -> int:
        """The id padding is filled with (never learned: its labels are ``-100``): the pad token, else EOS, else 0."""
        return (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id or 0
        )

    def train_order(self, data: TensorSplit) -> Sampler[int]:
        """Grouped by length (``data.group_by_length``, unpacked rows; in runs of 50 global batches), else :class:`EpochShuffle`."""
        if self.group_by_length and not self.packing:
            return LengthGroupedShuffle(
                data.fields["length"], self.batch_size * self.processes()[1], self.current_epoch
            )
        return EpochShuffle(len(data), self.current_epoch)

    def collate(self, batch: Batch) -> Batch:
        """The batch cut to its longest row (the rows are padded on the right; ``length`` counts each one's tokens)."""
        fields = dict(batch)
        longest = int(fields.pop("length").max())
        return Batch(**{name: value[:, :longest] if value.ndim == 2 else value for name, value in fields.items()})

    def log_padding(self, train: TensorSplit) -> None:
        """Log the share of padding in an epoch's training batches, and what it would be padded to ``max_length``."""
        lengths = train.fields["length"]
        order = torch.tensor(list(self.train_order(train)), dtype=torch.long)
        batches = lengths[order].split(self.batch_size)
        served = sum(len(batch) * int(batch.max()) for batch in batches)
        share = 1 - int(lengths.sum()) / served
        log.info(
            "chat data: %d training %s, padding %.1f%% of the tokens of their batches (%.1f%% if padded to "
            "data.max_length=%d)",
            len(lengths),
            "rows of packed conversations" if self.packing else "conversations",
            100 * share,
            100 * (1 - int(lengths.sum()) / (len(lengths) * self.max_length)),
            self.max_length,
        )

    def save_tokenizer(self, folder: Path) -> None:
        """The run's tokenizer (its chat template included), for ``export --format hf``."""
        from kd_lightning.models.pretrained import save_tokenizer

        save_tokenizer(self.tokenizer, folder)


def read_splits(data_dir: Path) -> dict[str, tuple[str, list[Any]]]:
    """``{split: (where it was read, its examples)}`` of a folder of split files or a saved ``datasets.DatasetDict``."""
    if not data_dir.is_dir():
        raise KDError(
            f"data.data_dir={data_dir} is not a folder; point it at a folder with train, validation and test "
            "files (.jsonl, .json or .parquet), or a DatasetDict saved with save_to_disk."
        )
    if (data_dir / "dataset_dict.json").is_file():
        return _read_saved_dataset(data_dir)
    splits = {}
    for split, stem in SPLIT_FILES.items():
        found = [data_dir / f"{stem}{suffix}" for suffix in FILE_TYPES if (data_dir / f"{stem}{suffix}").is_file()]
        if not found:
            raise KDError(
                f"data.data_dir={data_dir} has no {stem}.jsonl, {stem}.json or {stem}.parquet; it needs train, "
                "validation and test files."
            )
        if len(found) > 1:
            raise KDError(
                f"data.data_dir={data_dir} has {' and '.join(path.name for path in found)} for one split; keep one of "
                "them (the others would be passed over)."
            )
        examples = _read_examples(found[0])
        if not examples:
            raise KDError(f"{found[0]} holds no examples; every split needs at least one conversation.")
        splits[split] = (str(found[0]), examples)
    return splits


def _read_saved_dataset(data_dir: Path) -> dict[str, tuple[str, list[Any]]]:
    """The splits of a ``DatasetDict`` written by ``save_to_disk`` (read with ``datasets.load_from_disk``)."""
    try:
        import datasets
    except ImportError:
        raise KDError(
            f"{data_dir} is a saved datasets.DatasetDict, which needs the datasets package: pip install "
            "'kd_lightning[lm]'."
        ) from None
    try:
        saved = datasets.load_from_disk(str(data_dir))
    except (OSError, ValueError) as error:
        raise KDError(
            f"cannot read the saved data set {data_dir} ({str(error).splitlines()[0]}); write it again with "
            "DatasetDict.save_to_disk."
        ) from None
    if not isinstance(saved, datasets.DatasetDict) or not set(SPLIT_FILES.values()) <= set(saved):
        have = sorted(saved) if isinstance(saved, datasets.DatasetDict) else "one Dataset"
        raise KDError(f"{data_dir} must be a DatasetDict with splits train, validation and test, got {have}.")
    return {split: (f"{data_dir} ({stem})", saved[stem].to_list()) for split, stem in SPLIT_FILES.items()}


def _read_examples(path: Path) -> list[Any]:
    """The examples of a ``.jsonl`` (one JSON object a line), ``.json`` (a list of objects) or ``.parquet`` file."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet
        except ImportError:
            raise KDError(
                f"{path} needs the pyarrow package (with datasets): pip install 'kd_lightning[lm]'."
            ) from None
        try:
            return pyarrow.parquet.read_table(path).to_pylist()
        except (OSError, ValueError) as error:
            raise KDError(
                f"{path} is not a valid parquet file ({str(error).splitlines()[0]}); fix or replace the file."
            ) from None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise KDError(f"{path} is not UTF-8 text ({error}); fix or replace the file.") from None
    if path.suffix == ".jsonl":
        examples = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    examples.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise KDError(
                        f"{path}, line {number} is not valid JSON ({error}); fix or remove that line."
                    ) from None
        return examples
    try:
        examples = json.loads(text)
    except json.JSONDecodeError as error:
        raise KDError(f"{path} is not valid json ({error}); fix or replace the file.") from None
    if not isinstance(examples, list):
        raise KDError(f"{path} must hold a list of examples, got {type(examples).__name__}.")
    return examples


def padded(examples: list[Example], width: int, pad: int) -> TensorSplit:
    """One row per example, padded on the right to ``width`` (each batch is cut to its longest row later)."""
    inputs = torch.full((len(examples), width), pad, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, targets) in enumerate(examples):
        inputs[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[row, : len(targets)] = torch.tensor(targets, dtype=torch.long)
    return TensorSplit(inputs, labels, {"length": torch.tensor([len(ids) for ids, _ in examples], dtype=torch.long)})


def packed(examples: list[Example], width: int, pad: int) -> TensorSplit:
    """The examples in order, one after another in rows of ``width`` tokens (a new row when the next does not fit), each
    with its own ``position_ids`` from 0 (the padding at a row's end too: a segment of its own, never learned)."""
    rows: list[list[Example]] = [[]]
    for example in examples:
        if sum(len(ids) for ids, _ in rows[-1]) + len(example[0]) > width:
            rows.append([])
        rows[-1].append(example)
    inputs = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    lengths = torch.zeros(len(rows), dtype=torch.long)
    for row, members in enumerate(rows):
        start = 0
        for ids, targets in members:
            inputs[row, start : start + len(ids)] = torch.tensor(ids, dtype=torch.long)
            labels[row, start : start + len(ids)] = torch.tensor(targets, dtype=torch.long)
            positions[row, start : start + len(ids)] = torch.arange(len(ids))
            start += len(ids)
        positions[row, start:] = torch.arange(width - start)
        lengths[row] = start
    return TensorSplit(inputs, labels, {"position_ids": positions, "length": lengths})


def conversation(example: Any, path: str, index: int) -> list[dict[str, str]]:
    """An example as chat messages: its ``messages``, or a user ``prompt`` and an assistant ``completion``."""
    where = f"{path}, example {index}"
    if isinstance(example, dict) and "messages" in example:
        messages = example["messages"]
    elif isinstance(example, dict) and {"prompt", "completion"} <= set(example):
        messages = [
            {"role": "user", "content": example["prompt"]},
            {"role": "assistant", "content": example["completion"]},
        ]
    else:
        raise KDError(f"{where} has neither messages nor prompt and completion; give each example one of them.")
    if not isinstance(messages, list):
        raise KDError(
            f"{where}: messages must be a list of {{role, content}} messages, got {type(messages).__name__}; e.g. "
            '[{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}].'
        )
    if not messages:
        raise KDError(f"{where} is an empty conversation; every example needs at least one assistant turn.")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise KDError(f"{where}: each message needs a role and a text content, got {message!r}.")
        if message.get("role") not in ROLES:
            raise KDError(f"{where} has a message of role {message.get('role')!r}; the roles are {', '.join(ROLES)}.")
    if not any(message["role"] == "assistant" for message in messages):
        raise KDError(f"{where} has no assistant turn: nothing to learn from; every example needs at least one.")
    if messages[0]["role"] == "assistant":
        raise KDError(
            f"{where} starts with an assistant turn, which answers nothing (a chat template renders no prompt before "
            "it; a message with two role keys keeps the last); begin each conversation with a user or system message."
        )
    return messages
