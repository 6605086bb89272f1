"""Distillation over a large vocabulary without the full ``(N·L, V)`` logits: the chunked loss.

A language model's output head turns ``(N·L, H)`` hidden states into ``(N·L, V)`` logits; with
``V`` = 32k-256k the float32 logits of two models, their softmaxes and their gradients dominate
peak memory. The chunked loss evaluates the *same loss terms* as the plain step from the
student's final hidden states and output head (:class:`HeadLogits`) and the teacher's logits of
a block of rows (:class:`TeacherBlocks`), one block of rows at a time, inside one
``torch.autograd.Function``: at no point does more than one block of logits exist. The loss and
gradients are those of the plain computation, up to floating-point summation order.

:func:`blockwise_terms` is the one builder: :class:`~kd_lightning.DistillationModule` uses it with
``speed.chunk_rows`` (its hooks give each block's terms), :func:`chunked_distillation_loss` with one
objective. Each block's terms are means over its kept rows; weighted by the block's share of
the kept rows (``num_kept``: those of the whole optimizer step when given) they add up to the
plain means. Plain PyTorch: it runs on CPU and GPU alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from kd_lightning.loss.objectives import Objective, kd_loss
from kd_lightning.loss.reduction import count

TeacherRows = Callable[[slice, Tensor], Tensor]  # (rows, the student's logits there (R, V)) -> the teacher's (R, V)
BlockTerms = Callable[
    [Tensor, Tensor | None, dict[str, Tensor]], Mapping[str, Tensor]
]  # (student, teacher, block) -> terms


def _head_weights(head: nn.Linear | Tensor) -> tuple[Tensor, Tensor | None]:
    """``(weight (V, H), bias (V,) or None)`` of an output head given as ``nn.Linear`` or a weight."""
    if isinstance(head, nn.Linear):
        return head.weight, head.bias
    return head, None


def default_chunk_rows(num_rows: int, vocab_size: int) -> int:
    """Rows per block (``speed.chunk_rows=auto``): about 1/8 of the rows, and a block of logits of at most 2**22
    entries (16 MiB in float32): 512 rows at V=8192, 128 at V=32768, 32 at V=131072. The vocabulary sets what a block
    holds (its logits, their softmaxes and gradients, ``R x V`` each); the hidden size sets only the work of its two
    products, which is the same in total however the rows are cut."""
    return max(1, min(math.ceil(num_rows / 8), max(1, 2**22 // vocab_size)))


@dataclass
class HeadLogits:
    """A language model's logits, not yet made: final hidden states ``(N, L, H)`` (or ``(M, H)``) and the output head.

    What :meth:`~kd_lightning.DistillationModule.student_forward` gives in training with ``speed.chunk_rows``."""

    hidden: Tensor
    head: nn.Linear | Tensor
    chunk_rows: int | None = None

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.hidden.shape[:-1], _head_weights(self.head)[0].shape[0]))


@dataclass
class TeacherBlocks:
    """The teacher's logits of any rows of the flattened ``(N·L)`` positions, given the student's logits there
    (a top-k recording completes its tail from them; a live teacher ignores them)."""

    rows: TeacherRows

    def whole(self, student_logits: Tensor) -> Tensor:
        """All positions at once, ``(..., V)`` like ``student_logits``."""
        flat = self.rows(slice(None), student_logits.detach().reshape(-1, student_logits.shape[-1]))
        return flat.view(*student_logits.shape[:-1], flat.shape[-1])


def resolved(teacher_out: Tensor | TeacherBlocks | None, student_logits: Tensor) -> Tensor | None:
    """The teacher's logits as a tensor for all of ``student_logits``' positions."""
    return teacher_out.whole(student_logits) if isinstance(teacher_out, TeacherBlocks) else teacher_out


class _ChunkedLoss(torch.autograd.Function):
    """Forward computes the loss and, block by block, its gradients; backward scales them."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        block_loss: Callable[[slice, Tensor], Tensor],
        chunk_rows: int,
    ) -> Tensor:
        dtype = torch.promote_types(hidden.dtype, torch.float32)  # float32 at least; float64 stays float64
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=dtype)
        grad_bias = None if bias is None else torch.zeros_like(bias, dtype=dtype)
        total = torch.zeros((), dtype=dtype, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            block = hidden[rows]
            with torch.enable_grad():
                logits = nn.functional.linear(block, weight, bias).detach().to(dtype).requires_grad_(True)
                loss = block_loss(rows, logits)
                (grad_logits,) = torch.autograd.grad(loss, logits)
            grad_hidden[rows] = (grad_logits @ weight.to(dtype)).to(hidden.dtype)
            grad_weight += grad_logits.T @ block.to(dtype)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
            total += loss.detach()
        ctx.save_for_backward(
            grad_hidden, grad_weight.to(weight.dtype), None if grad_bias is None else grad_bias.to(bias.dtype)
        )
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        return (
            grad_hidden * grad_output.to(grad_hidden.dtype),
            grad_weight * grad_output.to(grad_weight.dtype),
            None if grad_bias is None else grad_bias * grad_output.to(grad_bias.dtype),
            None,
            None,
        )


def blockwise_terms(
    student: HeadLogits,
    teacher: Tensor | TeacherBlocks | None,
    fields: Mapping[str, Tensor],
    block_terms: BlockTerms,
    keep: Tensor | None,
    num_kept: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss of ``block_terms`` over all positions of ``student``, one block of rows at a time.

    Args:
        student: the student's hidden states and head.
        teacher: the teacher's logits ``(N, L, V)``, or :class:`TeacherBlocks`, or ``None``.
        fields: per-position tensors ``(N, L)`` (labels, masks) the terms read; each block gets its rows as ``(1, R)``.
        block_terms: ``(student logits (1, R, V), teacher logits (1, R, V) or None, block fields) -> {name: term}``, each
            term a mean over the block's kept rows.
        keep: ``(N, L)`` bool, the positions that count (``None``: all); a block's share is its kept rows over
            ``num_kept`` (default: the kept positions here).

    Returns:
        The loss (gradients flow to the hidden states and the head only) and its terms, detached, for the log.
    """
    weight, bias = _head_weights(student.head)
    hidden = student.hidden.reshape(-1, student.hidden.shape[-1])
    flat = {name: value.reshape(1, -1) for name, value in fields.items()}
    kept = None if keep is None else keep.reshape(-1)
    divisor = count(kept, hidden[:, 0], num_kept)
    teacher_rows = (
        teacher.rows
        if isinstance(teacher, TeacherBlocks)
        else (None if teacher is None else (lambda rows, _, whole=teacher.reshape(-1, teacher.shape[-1]): whole[rows]))
    )
    logged: dict[str, Tensor] = {}

    def block_loss(rows: slice, logits: Tensor) -> Tensor:
        with torch.no_grad():
            teacher_block = None if teacher_rows is None else teacher_rows(rows, logits.detach())[None]
        terms = block_terms(logits[None], teacher_block, {name: value[:, rows] for name, value in flat.items()})
        share = (logits.new_tensor(logits.shape[0]) if kept is None else kept[rows].sum()) / divisor
        for name, value in terms.items():
            logged[name] = logged.get(name, 0) + value.detach() * share
        return torch.stack(list(terms.values())).sum() * share

    rows = student.chunk_rows or default_chunk_rows(hidden.shape[0], weight.shape[0])
    return _ChunkedLoss.apply(hidden, weight, bias, block_loss, rows), logged


def chunked_distillation_loss(
    student_hidden: Tensor,
    student_head: nn.Linear | Tensor,
    teacher_hidden: Tensor | None = None,
    teacher_head: nn.Linear | Tensor | None = None,
    *,
    teacher_logits: Callable[[slice], Tensor] | None = None,
    objective: Callable[..., Tensor] = kd_loss,
    temperature: float | None = None,
    labels: Tensor | None = None,
    ignore_index: int | None = -100,
    mask: Tensor | None = None,
    num_kept: Tensor | float | None = None,
    chunk_rows: int | None = None,
) -> Tensor:
    """``objective(student_head(student_hidden), teacher logits)`` over kept tokens, block by block.

    Args:
        student_hidden: ``(N, L, H)`` or ``(M, H)`` final hidden states of the student.
        student_head: its output head, ``nn.Linear(H, V)`` or a ``(V, H)`` weight.
        teacher_hidden, teacher_head: the teacher's hidden states ``(…, H_t)`` and head ``(V, H_t)``;
            or ``teacher_logits``: a function ``rows -> (rows, V)`` over the flattened tokens
            (e.g. logits rebuilt from a recording).
        objective: any objective of :mod:`kd_lightning.loss.objectives`, or a ``functools.partial`` of one with its settings
            bound, e.g. ``partial(jsd_loss, beta=0.5)`` or ``partial(kd_loss, temperature=2.0)``.
        temperature: passed to ``objective``; default the one bound to it, else the objective's own default.
        labels, ignore_index, mask: tokens whose label is ``ignore_index`` or whose mask is False
            do not count (``labels`` are also what DKD needs).
        num_kept: the divisor; default the number of kept tokens here.
        chunk_rows: tokens per block; default :func:`default_chunk_rows`.

    Returns:
        The scalar loss; gradients flow to ``student_hidden`` and the student head only.
    """
    rows = student_hidden.shape[:-1]
    keep = (
        torch.ones(rows, dtype=torch.bool, device=student_hidden.device)
        if mask is None
        else mask.reshape(rows).to(torch.bool)
    )
    if labels is not None and ignore_index is not None:
        keep = keep & (labels.reshape(rows) != ignore_index)
    if teacher_logits is None:
        if teacher_hidden is None or teacher_head is None:
            raise ValueError("pass teacher_hidden and teacher_head, or teacher_logits=rows -> (rows, V) logits.")
        teacher_weight, teacher_bias = _head_weights(teacher_head)
        flat_teacher = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
        if flat_teacher.shape[0] != keep.numel():
            raise ValueError(
                f"teacher hidden states have {flat_teacher.shape[0]} tokens, the student's {keep.numel()}."
            )

        def teacher_logits(rows: slice) -> Tensor:
            return nn.functional.linear(flat_teacher[rows], teacher_weight, teacher_bias)

    built_in = Objective.of(objective)
    if built_in is None:
        raise ValueError(
            "objective must be one of kd_lightning.loss.objectives' objectives (or a functools.partial of one)."
        )
    fields = {"keep": keep} | ({} if labels is None else {"labels": labels.reshape(rows)})

    def block_terms(student: Tensor, teacher: Tensor | None, block: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"objective": built_in(student, teacher, temperature, keep=block["keep"], labels=block.get("labels"))}

    loss, _ = blockwise_terms(
        HeadLogits(student_hidden, student_head, chunk_rows),
        TeacherBlocks(lambda rows, _: teacher_logits(rows)),
        fields,
        block_terms,
        keep,
        num_kept,
    )
    return loss
