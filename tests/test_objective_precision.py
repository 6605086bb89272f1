"""Every objective in float32 against float64, over the logits people meet: flat and peaked (std 1 to 100),
temperatures 0.5 to 10, gaps of hundreds of nats, ``-inf`` columns; values and gradients, plain and chunked.

The float64 value of the same objective on the same float32 logits is the reference (its own formula is
checked against an independent log-space computation below). A float32 value must be finite and within
1e-5 relative of it; its gradient within 1e-5 of the float64 gradient relative to that gradient's norm or, where
the exact gradient is below float32's resolution (saturated models: 1e-17 and less), to the scale of one
position's gradient: ``1 / (positions · T)`` (``T / positions`` for the T²-scaled objectives) times the
divergence per position where that is above 1 (a position's gradient is ``p·(log-ratio − divergence)``, a
difference of numbers of that size).
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.loss.chunked import chunked_distillation_loss
from kd_lightning.loss.objectives import (
    dkd_loss,
    jsd_loss,
    kd_loss,
    mixture_kl,
    reverse_kl_loss,
    sampled_kl_loss,
    skew_kl_loss,
    tvd_loss,
)

OBJECTIVES = {
    "kd": kd_loss,
    "reverse_kl": reverse_kl_loss,
    "jsd_0.1": partial(jsd_loss, beta=0.1),
    "jsd_0.5": partial(jsd_loss, beta=0.5),
    "jsd_0.9": partial(jsd_loss, beta=0.9),
    "jsd_continuous_0.3": partial(jsd_loss, beta=0.3, weights="continuous"),
    "skew_kl": skew_kl_loss,
    "skew_reverse_kl": partial(skew_kl_loss, reverse=True),
    "skew_kl_0.5": partial(skew_kl_loss, skew=0.5),
    "tvd": tvd_loss,
    "dkd": dkd_loss,
    "sampled_kl": sampled_kl_loss,  # the labels stand for the tokens the student drew
}
SCALES = (1.0, 10.0, 30.0, 100.0)  # the logits' standard deviation
TEMPERATURES = (0.5, 1.0, 2.0, 10.0)
VOCAB = 5003
RELATIVE = 1e-5


def logits(shape: tuple[int, ...], scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale, torch.randn(shape, generator=g) * scale


def labels_for(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, shape[-1], shape[:-1], generator=torch.Generator().manual_seed(seed))


def value_and_grads(objective, student: torch.Tensor, teacher: torch.Tensor, temperature: float, labels: torch.Tensor):
    student = student.clone().requires_grad_(True)
    value = objective(student, teacher, temperature, labels=labels)
    value.backward()
    return value.detach(), student.grad


def gradient_scale(name: str, temperature: float, positions: int, exact: torch.Tensor) -> float:
    """The size of one position's gradient: ``T / positions`` with the T² factor (kd, dkd), else ``1 / (positions·T)``,
    times the divergence per position (``exact``, without T²) where that is above 1."""
    t2 = name in ("kd", "dkd")
    divergence = exact.item() / (temperature**2 if t2 else 1.0)
    return (temperature if t2 else 1 / temperature) / positions * max(1.0, divergence)


def assert_close_to_float64(
    name: str, value: torch.Tensor, grad: torch.Tensor, exact: torch.Tensor, exact_grad: torch.Tensor, scale: float
) -> None:
    assert value.dtype == torch.float32 and value.isfinite(), (name, value)
    assert grad.isfinite().all(), name
    error = (value.double() - exact).abs() / exact.abs()
    assert error <= RELATIVE, (name, value.item(), exact.item(), error.item())
    grad_error = (grad.double() - exact_grad).norm() / max(exact_grad.norm().item(), scale)
    assert grad_error <= RELATIVE, (name, grad_error.item())


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_every_objective_is_finite_and_as_exact_as_float64(scale: float, temperature: float) -> None:
    student, teacher = logits((4, 8, VOCAB), scale, seed=int(scale * 10 + temperature * 100))
    labels = labels_for(student.shape)
    for name, objective in OBJECTIVES.items():
        value, grad = value_and_grads(objective, student, teacher, temperature, labels)
        exact, exact_grad = value_and_grads(objective, student.double(), teacher.double(), temperature, labels)
        assert_close_to_float64(
            f"{name} std={scale} T={temperature}",
            value,
            grad,
            exact,
            exact_grad,
            gradient_scale(name, temperature, labels.numel(), exact),
        )


@pytest.mark.parametrize(
    "case", ["gap_of_500_nats", "padded_vocabulary", "teacher_rules_out_classes", "student_rules_out_classes"]
)
@pytest.mark.parametrize("temperature", [0.5, 2.0, 10.0])
def test_gaps_and_minus_infinity_columns(case: str, temperature: float) -> None:
    student, teacher = logits((6, 512), 3.0, seed=7)
    labels = labels_for(student.shape)
    names = list(OBJECTIVES)
    if case == "gap_of_500_nats":  # one class far above the rest, a different one for each model
        teacher[:, 3] += 500
        student[:, 5] += 500
    elif case == "padded_vocabulary":  # padded rows of the output head: -inf in both
        teacher[:, -40:] = student[:, -40:] = -math.inf
        labels = labels.clamp(max=511 - 40)
    elif case == "teacher_rules_out_classes":
        teacher[:, 100:140] = -math.inf
        names.remove("reverse_kl")  # KL(p_s ‖ p_t) is truly infinite there
    else:
        student[:, 100:140] = -math.inf
        names.remove("kd")  # KL(p_t ‖ p_s) is truly infinite there, and so is DKD's NCKD
        names.remove("dkd")
    labels = torch.where(
        (teacher.gather(-1, labels[:, None]).isinf() | student.gather(-1, labels[:, None]).isinf())[:, 0],
        torch.zeros_like(labels),
        labels,
    )
    for name in names:
        value, grad = value_and_grads(OBJECTIVES[name], student, teacher, temperature, labels)
        exact, exact_grad = value_and_grads(OBJECTIVES[name], student.double(), teacher.double(), temperature, labels)
        assert_close_to_float64(
            f"{name} {case} T={temperature}",
            value,
            grad,
            exact,
            exact_grad,
            gradient_scale(name, temperature, labels.numel(), exact),
        )


def independent_mixture_kl(first: torch.Tensor, second: torch.Tensor, weight: float) -> torch.Tensor:
    """``KL(p ‖ weight·p + (1−weight)·q)`` in float64 log space: ``log(p/M) = −logaddexp(log w, log(1−w) + log q − log p)``."""
    log_p, log_q = F.log_softmax(first.double(), -1), F.log_softmax(second.double(), -1)
    if weight == 0:
        log_p_over_m = log_p - log_q
    else:
        log_p_over_m = -torch.logaddexp(
            torch.tensor(math.log(weight), dtype=torch.float64), math.log1p(-weight) + log_q - log_p
        )
    return torch.where(log_p > -math.inf, log_p.exp() * log_p_over_m, 0.0).sum(-1)


@pytest.mark.parametrize("weight", [0.0, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("scale", [0.1, 1.0, 30.0])
def test_the_float64_reference_is_the_textbook_divergence(weight: float, scale: float) -> None:
    first, second = logits((16, 257), scale, seed=3)
    first[:, :4] = second[:, :4] = -math.inf
    torch.testing.assert_close(
        mixture_kl(first.double(), second.double(), weight),
        independent_mixture_kl(first, second, weight),
        rtol=1e-11,
        atol=1e-13,
    )


def head_pair(scale: float, vocab: int = VOCAB, hidden: int = 16, rows: int = 48, seed: int = 0):
    """Student hidden states and head whose logits (std about ``scale``) are exact in float32 (hidden states in
    {-1, 0, 1}, weights in quarters), so float32 and float64 differ only in the objective; the teacher's logits."""
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_((torch.randn(vocab, hidden, generator=g) * 4 * scale / math.sqrt(hidden * 2 / 3)).round() / 4)
    states = torch.randint(-1, 2, (rows, hidden), generator=g).float()
    return head, states, torch.randn(rows, vocab, generator=g) * scale


CHUNKED = {
    name: OBJECTIVES[name]
    for name in (
        "kd",
        "reverse_kl",
        "jsd_0.1",
        "jsd_0.5",
        "jsd_0.9",
        "skew_kl",
        "skew_reverse_kl",
        "tvd",
        "dkd",
        "sampled_kl",
    )
}


@pytest.mark.parametrize("scale", [1.0, 30.0, 100.0])
@pytest.mark.parametrize("temperature", [0.5, 2.0, 10.0])
def test_the_chunked_loss_is_as_exact_as_float64(scale: float, temperature: float) -> None:
    head, hidden, teacher = head_pair(scale)
    labels = labels_for(teacher.shape)
    for name, objective in CHUNKED.items():
        results = []
        for dtype in (torch.float32, torch.float64):
            chunk_head = nn.Linear(16, VOCAB, bias=False).to(dtype)
            chunk_head.weight.data.copy_(head.weight)
            h = hidden.to(dtype).clone().requires_grad_(True)
            loss = chunked_distillation_loss(
                h,
                chunk_head,
                objective=objective,
                temperature=temperature,
                labels=labels,
                teacher_logits=lambda rows, t=teacher.to(dtype): t[rows],
                chunk_rows=16,
            )
            loss.backward()
            results.append((loss.detach(), torch.cat([h.grad.flatten(), chunk_head.weight.grad.flatten()])))
        (value, grad), (exact, exact_grad) = results
        # a logit gradient of size ``gradient_scale`` reaches the hidden states through the head and the head through
        # the hidden states: at most the spectral norms of both times as large
        through = torch.linalg.matrix_norm(head.weight.detach(), 2) + torch.linalg.matrix_norm(hidden, 2)
        assert_close_to_float64(
            f"chunked {name} std={scale} T={temperature}",
            value,
            grad,
            exact,
            exact_grad,
            gradient_scale(name, temperature, labels.numel(), exact) * through.item(),
        )


@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_bfloat16_logits_are_computed_as_exactly_as_float32_ones(scale: float) -> None:
    student, teacher = (x.bfloat16() for x in logits((4, 1024), scale, seed=11))
    labels = labels_for(student.shape)
    for name, objective in OBJECTIVES.items():
        value, grad = value_and_grads(objective, student, teacher, 2.0, labels)
        exact, exact_grad = value_and_grads(objective, student.double(), teacher.double(), 2.0, labels)
        assert value.dtype == torch.float32 and value.isfinite(), name
        assert (value.double() - exact).abs() <= RELATIVE * exact.abs(), (name, value.item(), exact.item())
        assert grad.float().isfinite().all(), name
