"""Teacher and student over one vocabulary: checked once, aligned where they differ only by padding.

Token-level distillation compares the two models' probabilities of the *same token ids*, so both
must use one tokenizer. Models often carry extra output rows beyond the tokenizer's tokens
(vocabularies padded to a multiple of 64 or 128 for speed); those rows are not tokens. A teacher
and a student whose widths differ are compared on their common first rows, after checking that
the teacher puts (almost) no probability on the rows that are dropped: if it does, those rows
are real tokens to it, and the two models do not share a tokenizer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kd_lightning.errors import KDError

# Probability the teacher may put on the output rows dropped by alignment (per token, at T = 1).
MAX_DROPPED_MASS = 1e-6


def check_vocabularies(
    student_logits: Tensor, teacher_logits: Tensor, vocab_size: int, max_dropped_mass: float = MAX_DROPPED_MASS
) -> int:
    """The width both models are compared on, ``min(V_s, V_t)``; refuses what alignment cannot fix.

    Args:
        student_logits, teacher_logits: ``(..., V_s)`` and ``(..., V_t)`` logits of one batch.
        vocab_size: the tokenizer's number of tokens; rows from here on are padding.
        max_dropped_mass: the most probability the teacher may put on the rows it loses.

    Raises:
        KDError: a model has fewer rows than the tokenizer has tokens, or the teacher puts more than
            ``max_dropped_mass`` on rows the student lacks.
    """
    width = check_widths(student_logits.shape[-1], teacher_logits.shape[-1], vocab_size)
    if teacher_logits.shape[-1] > width:
        check_padding_unused(
            teacher_logits, width, vocab_size, max_dropped_mass, f"which the student ({width} rows) lacks"
        )
    return width


def check_widths(student_width: int, teacher_width: int, vocab_size: int) -> int:
    """The width both models are compared on, ``min(V_s, V_t)``; refuses a model with fewer rows than the tokenizer has
    tokens. (Whether the teacher's extra rows are unused is a question for the trained teacher: :func:`check_vocabularies`.)"""
    for name, width in (("student", student_width), ("teacher", teacher_width)):
        if width < vocab_size:
            raise KDError(
                f"the {name} predicts {width} tokens but the tokenizer has {vocab_size}: it was built for another "
                f"tokenizer. Token-level KD compares both models' probabilities of the same token ids, so build "
                f"both for this tokenizer ({name}.model.vocab_size={vocab_size} or more)."
            )
    return min(student_width, teacher_width)


def check_padding_unused(
    teacher_logits: Tensor,
    width: int,
    vocab_size: int | None,
    max_dropped_mass: float = MAX_DROPPED_MASS,
    why: str = "which are dropped",
) -> None:
    """Refuse a teacher that puts more than ``max_dropped_mass`` (any token, T=1) on its rows from ``width`` on."""
    dropped = teacher_logits.detach().float().softmax(-1)[..., width:].sum(-1).max().item()
    if dropped > max_dropped_mass:
        raise KDError(
            f"the teacher puts probability {dropped:.2g} on its output rows {width}-{teacher_logits.shape[-1] - 1}, "
            f"{why}; rows beyond the tokenizer's {vocab_size} tokens must be unused padding (at most "
            f"{max_dropped_mass:g}). Teacher and student were likely built for different tokenizers; use one "
            "tokenizer for both (or retrain the teacher)."
        )


def check_same_tokenizer(teacher_tokenizer: Any, student_tokenizer: Any) -> None:
    """Refuse two tokenizers that give some token id different text (``tokenizers`` or ``transformers`` objects).

    Token-level KD matches distributions id by id: if id 17 is ``"the"`` to the teacher and
    ``"ing"`` to the student, the student learns nonsense. Sequence-level KD (train the student
    on the teacher's generated text) is the method for models with different tokenizers.
    """
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if teacher_vocab == student_vocab:
        return
    by_id_teacher = {i: token for token, i in teacher_vocab.items()}
    differing = [
        (i, by_id_teacher.get(i), token)
        for token, i in sorted(student_vocab.items(), key=lambda item: item[1])
        if by_id_teacher.get(i) != token
    ]
    i, theirs, ours = differing[0] if differing else (None, None, None)
    detail = (
        f"token id {i} is {theirs!r} to the teacher and {ours!r} to the student"
        if differing
        else f"the teacher has {len(teacher_vocab) - len(student_vocab)} more tokens"
    )
    raise KDError(
        f"teacher and student use different tokenizers ({detail}, {len(differing)} ids differ); token-level "
        "KD compares their probabilities id by id, so both must use one tokenizer (or distil on the teacher's "
        "generated text instead)."
    )


def check_same_classes(student_logits: Tensor, teacher_logits: Tensor) -> None:
    """Raise :class:`KDError` if teacher and student predict different numbers of classes."""
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise KDError(
            f"teacher and student predict different numbers of classes: teacher {teacher_logits.shape[-1]}, "
            f"student {student_logits.shape[-1]}. Build both for the data's classes "
            "(e.g. teacher.model.num_classes=${data.num_classes})."
        )


def declared_classes(num_classes: int | None, student: Any, teacher: Any) -> int:
    """``num_classes``, or the student's ``num_classes`` attribute; refused where a model declares another count."""
    num_classes = num_classes if num_classes is not None else getattr(student, "num_classes", None)
    if num_classes is None:
        raise KDError("pass num_classes=C: the student has no num_classes attribute to read it from.")
    for name, model in (("teacher", teacher), ("student", student)):
        declared = getattr(model, "num_classes", None)
        if declared is not None and declared != num_classes:
            raise KDError(
                f"the {name} is built for {declared} classes but the data has {num_classes}; "
                f"set {name}.model.num_classes={num_classes}."
            )
    return num_classes


def check_outputs(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    kept: Tensor | None,
    num_classes: int,
    task: str,
    padding_known: bool = False,
) -> None:
    """On a module's first batch: class counts (vocabularies) agree, the teacher's logits are sound, token logits and
    labels have the shapes ``(N, L, V)`` and ``(N, L)``, and the ``kept`` token labels are in the vocabulary.
    ``padding_known``: the teacher was trained here, on this tokenizer, so its rows beyond it are padding unchecked."""
    if teacher_logits is not None:
        if task == "tokens" and padding_known:
            check_widths(student_logits.shape[-1], teacher_logits.shape[-1], num_classes)
        elif task == "tokens":
            check_vocabularies(student_logits, teacher_logits, num_classes)
        else:
            check_same_classes(student_logits, teacher_logits)
        if torch.isnan(teacher_logits).any() or torch.isposinf(teacher_logits).any():  # -inf: a masked class, allowed
            raise KDError(
                "the teacher's logits contain NaN or Inf; the teacher checkpoint is broken or diverged. "
                "Retrain it or pass a different teacher.checkpoint."
            )
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise KDError(
            f"labels must be class indices (an integer tensor), got {labels.dtype}; -100 marks a position that "
            "does not count."
        )
    if task != "tokens":
        if labels.shape != student_logits.shape[:-1]:
            raise KDError(
                f"the batch has labels of shape {tuple(labels.shape)} for logits {tuple(student_logits.shape)}; "
                "give one class index per sample (N,)."
            )
        if student_logits.shape[-1] != num_classes:
            raise KDError(
                f"the student predicts {student_logits.shape[-1]} classes but num_classes={num_classes}; "
                "build it for the data's classes."
            )
        return
    if student_logits.ndim != 3 or labels.shape != student_logits.shape[:-1]:
        raise KDError(
            f"task=tokens needs (N, L, V) logits and (N, L) labels; got logits {tuple(student_logits.shape)} "
            f"and labels {tuple(labels.shape)}."
        )
    labels_in_range(labels, kept, num_classes)
    if student_logits.shape[-1] < num_classes:
        raise KDError(
            f"the student predicts {student_logits.shape[-1]} tokens but the vocabulary has {num_classes}; "
            "build it for the data's tokenizer."
        )


def common_rows(logits: Tensor, width: int) -> Tensor:
    """``logits[..., :width]`` (a view): the rows both models share."""
    return logits if logits.shape[-1] == width else logits[..., :width]


def labels_in_range(labels: Tensor, keep: Tensor, vocab_size: int) -> None:
    """Refuse token labels outside ``[0, vocab_size)`` among the kept positions (one host read)."""
    kept = labels[keep]
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= vocab_size):
        bad = int(kept.max()) if int(kept.max()) >= vocab_size else int(kept.min())
        raise KDError(
            f"a token label is {bad}, outside the vocabulary [0, {vocab_size}): the data was tokenized with "
            "another tokenizer, or padding is not marked -100. Tokenize with the models' tokenizer and label "
            "ignored positions -100."
        )


__all__ = [
    "MAX_DROPPED_MASS",
    "check_outputs",
    "check_padding_unused",
    "check_same_classes",
    "check_same_tokenizer",
    "check_vocabularies",
    "check_widths",
    "common_rows",
    "labels_in_range",
]
