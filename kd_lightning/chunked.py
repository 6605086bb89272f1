"""Distillation over a large vocabulary without the full ``(N·L, V)`` logits: a chunked loss.

A language model's output head turns ``(N·L, H)`` hidden states into ``(N·L, V)`` logits; with
``V`` = 32k-256k the float32 logits of two models, their softmaxes and their gradients dominate
peak memory. :func:`chunked_distillation_loss` takes the student's hidden states and output head
(and the teacher's, or any function that gives the teacher's logits for a block of rows) and
computes logits, loss and gradients one block of rows at a time, inside one
``torch.autograd.Function``: at no point does more than one block of logits exist. The loss and
the gradients are those of the plain computation (any objective of :mod:`kd_lightning.losses`
applied to the full logits), up to floating-point summation order.

Normalisation is by ``num_kept``, the count of kept tokens of the whole optimizer step (all
micro-batches of a gradient accumulation, all ranks) when given: the loss and gradients are then
the same with 1 x B or 4 x B/4 accumulation. Plain PyTorch: it runs on CPU and GPU alike.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor, nn

from kd_lightning.losses import kd_loss

TeacherLogits = Callable[[slice], Tensor]  # rows -> (rows, V) teacher logits


def head_weights(head: nn.Linear | Tensor) -> tuple[Tensor, Tensor | None]:
    """``(weight (V, H), bias (V,) or None)`` of an output head given as ``nn.Linear`` or a weight."""
    if isinstance(head, nn.Linear):
        return head.weight, head.bias
    return head, None


def default_chunk_rows(num_rows: int, vocab_size: int) -> int:
    """Rows per block: about 1/8 of the rows, and a block of logits of at most 2**22 entries (16 MiB in float32)."""
    return max(1, min(math.ceil(num_rows / 8), max(1, 2**22 // vocab_size)))


BlockLoss = Callable[[slice, Tensor], Tensor]  # (rows, their student logits (rows, V)) -> the loss share of those rows


class _ChunkedLoss(torch.autograd.Function):
    """Forward computes the loss and, block by block, its gradients; backward scales them."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, block_loss: BlockLoss, chunk_rows: int) -> Tensor:
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        grad_bias = None if bias is None else torch.zeros_like(bias, dtype=torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            block = hidden[rows]
            with torch.enable_grad():
                logits = nn.functional.linear(block, weight, bias).detach().float().requires_grad_(True)
                loss = block_loss(rows, logits)
                (grad_logits,) = torch.autograd.grad(loss, logits)
            grad_hidden[rows] = (grad_logits @ weight.float()).to(hidden.dtype)
            grad_weight += grad_logits.T @ block.float()
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
            total += loss.detach()
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype),
                              None if grad_bias is None else grad_bias.to(bias.dtype))
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_output.to(grad_hidden.dtype)
        return (grad_hidden * scale, grad_weight * scale.to(grad_weight.dtype),
                None if grad_bias is None else grad_bias * scale.to(grad_bias.dtype), None, None)


def chunked_loss(hidden: Tensor, head: nn.Linear | Tensor, block_loss: BlockLoss, chunk_rows: int | None = None) -> Tensor:
    """``Σ_blocks block_loss(rows, head(hidden[rows]))`` over the flattened tokens, one block of logits at a time.

    Args:
        hidden: ``(N, L, H)`` or ``(M, H)`` final hidden states.
        head: the output head, ``nn.Linear(H, V)`` or a ``(V, H)`` weight.
        block_loss: ``(rows, logits (rows, V)) -> scalar``, the share of the loss of those rows
            (normalised by the whole batch's count, so that the shares add up to the loss).
        chunk_rows: tokens per block; default :func:`default_chunk_rows`.

    Returns:
        The scalar loss; gradients flow to ``hidden`` and the head only.
    """
    weight, bias = head_weights(head)
    flat = hidden.reshape(-1, hidden.shape[-1])
    return _ChunkedLoss.apply(flat, weight, bias, block_loss, chunk_rows or default_chunk_rows(flat.shape[0], weight.shape[0]))


def chunked_distillation_loss(
    student_hidden: Tensor,
    student_head: nn.Linear | Tensor,
    teacher_hidden: Tensor | None = None,
    teacher_head: nn.Linear | Tensor | None = None,
    *,
    teacher_logits: TeacherLogits | None = None,
    objective: Callable[..., Tensor] = kd_loss,
    temperature: float = 1.0,
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
        objective: any objective of :mod:`kd_lightning.losses` (a ``functools.partial`` of one with
            its settings bound, ``temperature`` included, e.g. ``partial(jsd_loss, beta=0.5)``).
        temperature: passed to ``objective``.
        labels, ignore_index, mask: tokens whose label is ``ignore_index`` or whose mask is False
            do not count (``labels`` are also what DKD needs).
        num_kept: the divisor; default the number of kept tokens here.
        chunk_rows: tokens per block; default :func:`default_chunk_rows`.

    Returns:
        The scalar loss; gradients flow to ``student_hidden`` and the student head only.
    """
    weight, bias = head_weights(student_head)
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    num_rows, vocab_size = hidden.shape[0], weight.shape[0]
    flat_labels = None if labels is None else labels.reshape(-1)
    flat_mask = None if mask is None else mask.reshape(-1)
    keep = torch.ones(num_rows, dtype=torch.bool, device=hidden.device)
    if flat_mask is not None:
        keep = keep & flat_mask.to(torch.bool)
    if flat_labels is not None and ignore_index is not None:
        keep = keep & (flat_labels != ignore_index)
    if num_kept is None:
        num_kept = keep.sum().clamp_min(1)
    if teacher_logits is None:
        if teacher_hidden is None or teacher_head is None:
            raise ValueError("pass teacher_hidden and teacher_head, or teacher_logits=rows -> (rows, V) logits.")
        teacher_weight, teacher_bias = head_weights(teacher_head)
        flat_teacher = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
        if flat_teacher.shape[0] != num_rows:
            raise ValueError(f"teacher hidden states have {flat_teacher.shape[0]} tokens, the student's {num_rows}.")

        def teacher_logits(rows: slice) -> Tensor:
            return nn.functional.linear(flat_teacher[rows], teacher_weight, teacher_bias)

    divisor = torch.as_tensor(num_kept, dtype=torch.float32, device=hidden.device)

    def block_loss(rows: slice, logits: Tensor) -> Tensor:
        with torch.no_grad():
            teacher = teacher_logits(rows)
        return objective(logits, teacher, temperature, mask=keep[rows], labels=None if flat_labels is None else flat_labels[rows],
                         num_kept=divisor)

    return chunked_loss(hidden, student_head, block_loss, chunk_rows or default_chunk_rows(num_rows, vocab_size))
