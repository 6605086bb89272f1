"""A folder of ``.txt`` files as next-token blocks: split by file, a byte-level BPE tokenizer trained on the training files.

Each file is one *work* (a play, a book): whole works are held out for validation and test, so no
held-out text leaks into training (a split by position would share characters, phrases and
names across the split). Batches are :class:`~kd_lightning.data.batch.Batch` dicts with
``inputs`` ``(N, L)`` token ids and ``labels`` ``(N, L)``, the next token at each position
(``-100`` where a held-out split's last block is padded).
"""

from __future__ import annotations

import codecs
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from kd_lightning.data.batch import IGNORE_INDEX
from kd_lightning.data.memory import InMemoryDataModule
from kd_lightning.errors import KDError, check_integer, is_integer

log = logging.getLogger(__name__)

END_OF_TEXT = "<|endoftext|>"  # between works, and token id 0


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """A byte-level BPE tokenizer (the ``tokenizers`` package) with at most ``vocab_size`` tokens."""
    try:
        from tokenizers import ByteLevelBPETokenizer
    except ImportError:
        raise KDError("text data needs the tokenizers package: pip install 'kd_lightning[lm]'.") from None
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[END_OF_TEXT], show_progress=False
    )
    return tokenizer


def _to_blocks(ids: Tensor, block_size: int, pad_last: bool) -> tuple[Tensor, Tensor]:
    """Cut a token stream into ``(M, block_size)`` inputs and next-token labels; every token is predicted once.

    ``pad_last`` keeps the last, shorter block (inputs padded with 0, labels with ``-100``).
    """
    inputs, labels = ids[:-1], ids[1:]
    count = len(inputs) // block_size
    if pad_last and len(inputs) % block_size:
        pad = block_size - len(inputs) % block_size
        inputs = torch.cat([inputs, inputs.new_zeros(pad)])
        labels = torch.cat([labels, labels.new_full((pad,), IGNORE_INDEX)])
        count += 1
    size = count * block_size
    return inputs[:size].view(count, block_size), labels[:size].view(count, block_size)


class TextDataModule(InMemoryDataModule):
    """Next-token prediction over the ``.txt`` files of ``data_dir``.

    Args:
        data_dir: a folder of ``.txt`` files, one work each.
        val_works, test_works: file names (without ``.txt``) held out whole for validation and test.
        vocab_size: the tokenizer's size at most, and the models' output rows (``data.num_classes``).
        block_size: tokens per training sequence (at most the models' context).
        train_tokens: use only the first this many training tokens (``null``: all), to fit a budget.
        batch_size, eval_batch_size: sequences per batch.
        num_classes: must equal ``vocab_size`` when given (the config passes both).
        encoding: the files' text encoding (``data.encoding``), decoded strictly: a file that is not text in it
            (binary data, another encoding) is refused by name.
        tokenizer: a pretrained tokenizer (a folder written by ``save_pretrained``, or a hub id; ``data.tokenizer``,
            by default a pretrained teacher's folder) instead of one trained here; ``vocab_size`` must then be its
            number of tokens, and its EOS token separates the works.
    """

    task = "tokens"

    def __init__(
        self,
        data_dir: str,
        val_works: Sequence[str],
        test_works: Sequence[str],
        vocab_size: int = 2048,
        block_size: int = 128,
        train_tokens: int | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_classes: int | None = None,
        encoding: str = "utf-8",
        tokenizer: str | None = None,
        **kwargs,
    ) -> None:
        if num_classes not in (None, vocab_size):
            raise KDError(
                f"data.num_classes ({num_classes}) must equal data.vocab_size ({vocab_size}) for text: the "
                "models predict one class per token; set data.num_classes=${{data.vocab_size}}."
            )
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_classes=vocab_size, **kwargs)
        if tokenizer is None:
            check_integer(
                "data.vocab_size", vocab_size, 257, " (a byte-level tokenizer has 256 byte tokens + <|endoftext|>)"
            )
        self.pretrained = tokenizer
        check_integer("data.block_size", block_size)
        if train_tokens is not None and (not is_integer(train_tokens) or train_tokens <= block_size):
            raise KDError(
                f"data.train_tokens must be null or an integer above data.block_size ({block_size}), got {train_tokens!r}."
            )
        try:
            codecs.lookup(encoding)
        except (LookupError, TypeError):
            raise KDError(
                f"data.encoding={encoding!r} is not a text encoding Python knows; set e.g. data.encoding=utf-8 "
                "(or utf-16, latin-1)."
            ) from None
        self.encoding = encoding
        self.data_dir = Path(data_dir)
        self.val_works, self.test_works = list(val_works), list(test_works)
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.train_tokens = train_tokens
        self.tokenizer = None

    def works(self) -> dict[str, list[Path]]:
        """``{"train" | "val" | "test": [files]}``; refuses a missing folder, no text, an unknown held-out work."""
        if not self.data_dir.is_dir():
            raise KDError(
                f"data.data_dir={self.data_dir} is not a folder; point it at a folder of .txt files "
                "(README: 'Distil a language model' says how to get the Shakespeare corpus)."
            )
        files = {path.stem: path for path in sorted(self.data_dir.glob("*.txt"))}
        if not files:
            raise KDError(
                f"data.data_dir={self.data_dir} holds no .txt files; point it at a folder of .txt files, one work each."
            )
        held_out = {"val": self.val_works, "test": self.test_works}
        for split, names in held_out.items():
            unknown = [name for name in names if name not in files]
            if unknown or not names:
                raise KDError(
                    f"data.{split}_works names {unknown or 'no work'}; choose among the files of {self.data_dir}: "
                    f"{', '.join(list(files)[:8])}{', ...' if len(files) > 8 else ''}."
                )
        if set(self.val_works) & set(self.test_works):
            raise KDError(
                f"{sorted(set(self.val_works) & set(self.test_works))} is both a validation and a test work; hold each out once."
            )
        train = [path for name, path in files.items() if name not in {*self.val_works, *self.test_works}]
        if not train:
            raise KDError(f"every file of {self.data_dir} is held out; leave some works for training.")
        return {"train": train, "val": [files[n] for n in self.val_works], "test": [files[n] for n in self.test_works]}

    def example_input(self, batch_size: int = 2) -> Tensor:
        return torch.zeros(batch_size, self.block_size, dtype=torch.long)

    def read(self, path: Path) -> str:
        """The text of one work, decoded strictly; binary data or another encoding refused with the file's name."""
        try:
            text = path.read_bytes().decode(self.encoding)
        except UnicodeDecodeError as error:
            raise KDError(
                f"{path} is not {self.encoding} text ({error.reason} at byte {error.start}); set data.encoding "
                "to its encoding (e.g. utf-16, latin-1), or take the file out of data.data_dir."
            ) from None
        if "\x00" in text:
            raise KDError(
                f"{path} holds NUL characters: it is binary data, or text in another encoding than "
                f"data.encoding={self.encoding}; take it out of data.data_dir, or set data.encoding."
            )
        return text

    def load_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        works = self.works()
        texts = {split: [self.read(path) for path in paths] for split, paths in works.items()}
        encode, end = self.tokenize(texts["train"])
        splits = {}
        for split, documents in texts.items():
            ids: list[int] = []
            for document in encode(documents):
                ids += [end, *document]
            stream = torch.tensor(ids + [end], dtype=torch.long)
            if split == "train" and self.train_tokens is not None:
                stream = stream[: self.train_tokens + 1]
            splits[split] = _to_blocks(stream, self.block_size, pad_last=split != "train")
            if not len(splits[split][0]):
                raise KDError(
                    f"the {split} works ({', '.join(path.stem for path in works[split])}) give no block of "
                    f"data.block_size={self.block_size} tokens ({len(stream) - 1} tokens); lower data.block_size, "
                    "raise data.train_tokens, or give that split more text."
                )
        log.info(
            "text: %s tokens (train/val/test), tokenizer of %d tokens",
            "/".join(str(int((y != IGNORE_INDEX).sum())) for _, y in splits.values()),
            self.vocab_size,
        )
        return splits

    def save_tokenizer(self, folder: Path) -> None:
        """Write the run's tokenizer as a ``transformers`` tokenizer (``AutoTokenizer.from_pretrained(folder)``); without
        the transformers package, the ``tokenizers`` file alone (``tokenizer.json``)."""
        from kd_lightning.files import atomic_directory
        from kd_lightning.models.pretrained import save_tokenizer

        tokenizer = self.tokenizer
        if self.pretrained is None:
            try:
                from transformers import PreTrainedTokenizerFast
            except ImportError:
                with atomic_directory(folder) as tmp:
                    tokenizer.save(str(tmp / "tokenizer.json"))
                return
            tokenizer = PreTrainedTokenizerFast(
                tokenizer_object=tokenizer._tokenizer,
                eos_token=END_OF_TEXT,
                bos_token=END_OF_TEXT,
                model_max_length=self.block_size,
            )
        save_tokenizer(tokenizer, folder)

    def tokenize(self, train_texts: list[str]) -> tuple[Any, int]:
        """``(encode(documents) -> token ids per document, the id that separates documents)``: the pretrained tokenizer
        (``data.tokenizer``) or a byte-level BPE tokenizer trained on ``train_texts``."""
        if self.pretrained is None:
            self.tokenizer = train_tokenizer(train_texts, self.vocab_size)
            return (
                lambda documents: [e.ids for e in self.tokenizer.encode_batch(documents)]
            ), self.tokenizer.token_to_id(END_OF_TEXT)
        from kd_lightning.models.pretrained import pretrained_tokenizer

        self.tokenizer = pretrained_tokenizer(self.pretrained, vocab_size=self.vocab_size)
        if self.tokenizer.eos_token_id is None:
            raise KDError(
                f"the tokenizer {self.pretrained} has no EOS token to separate the works; use a tokenizer with one."
            )
        return (
            lambda documents: self.tokenizer(documents, add_special_tokens=False, verbose=False)["input_ids"]
        ), self.tokenizer.eos_token_id
