"""The KD loss: the reference figure, its equivalent forms, gradient, invariances, masks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.loss.objectives import jsd_loss, kd_loss, reverse_kl_loss

TEACHER = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
STUDENT = torch.tensor([[1.2, 2.1, 2.9], [3.8, 5.2, 6.1]])


def by_hand(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """``T² · Σ P (log P − log Q) / N`` written out."""
    p = torch.softmax(teacher / t, -1)
    q = torch.softmax(student / t, -1)
    return (p * (p.log() - q.log())).sum() / len(p) * t**2


def test_reference_example_is_0_008507() -> None:
    assert kd_loss(STUDENT, TEACHER, 2.0).item() == pytest.approx(0.008507, abs=1e-6)


def test_equals_hand_written_and_kl_div_forms() -> None:
    ours = kd_loss(STUDENT.double(), TEACHER.double(), 2.0)
    p = torch.softmax(TEACHER.double() / 2, -1)
    log_q = F.log_softmax(STUDENT.double() / 2, -1)
    with_kl_div = F.kl_div(log_q, p, reduction="sum") / 2 * 2.0**2
    assert torch.allclose(ours.double(), by_hand(STUDENT.double(), TEACHER.double(), 2.0), atol=1e-7)
    assert torch.allclose(ours.double(), with_kl_div, atol=1e-7)


def test_zero_for_equal_logits() -> None:
    logits = torch.randn(8, 10)
    assert kd_loss(logits, logits.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
def test_gradient_is_softmax_difference_times_t_over_n(t: float) -> None:
    torch.manual_seed(0)
    student = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(5, 7, dtype=torch.float64)
    kd_loss(student, teacher, t).backward()
    expected = (torch.softmax(student.detach() / t, -1) - torch.softmax(teacher / t, -1)) * t / len(student)
    assert torch.allclose(student.grad.double(), expected, atol=1e-6)


def test_invariant_to_a_constant_added_to_a_row() -> None:
    torch.manual_seed(1)
    student, teacher = torch.randn(4, 6), torch.randn(4, 6)
    shift = torch.randn(4, 1) * 10
    base = kd_loss(student, teacher, 3.0)
    assert torch.allclose(kd_loss(student + shift, teacher - shift, 3.0), base, atol=1e-5)


def test_confident_teacher_gives_finite_loss_and_gradient() -> None:
    teacher = torch.tensor([[1000.0, -1000.0, 0.0]])
    student = torch.zeros(1, 3, requires_grad=True)
    loss = kd_loss(student, teacher, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


def test_no_t2_scaling_on_request() -> None:
    assert torch.allclose(kd_loss(STUDENT, TEACHER, 2.0, scale_by_t2=False) * 4, kd_loss(STUDENT, TEACHER, 2.0))


def test_sequence_logits_average_over_positions() -> None:
    torch.manual_seed(2)
    student, teacher = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    flat = kd_loss(student.reshape(15, 11), teacher.reshape(15, 11), 2.0)
    assert torch.allclose(kd_loss(student, teacher, 2.0), flat, atol=1e-6)


def test_masked_positions_contribute_nothing() -> None:
    torch.manual_seed(3)
    student, teacher = torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    mask = torch.tensor([[True, True, False, False], [True, False, True, False]])
    garbage_student = student.clone()
    garbage_student[~mask] = float("nan")  # padded positions may hold anything
    expected = kd_loss(student[mask], teacher[mask], 2.0)
    assert torch.allclose(kd_loss(garbage_student, teacher, 2.0, mask=mask), expected, atol=1e-6)


def test_ignore_index_drops_positions_by_label() -> None:
    torch.manual_seed(4)
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    labels = torch.tensor([[1, -100, 2], [-100, 0, 4]])
    keep = labels != -100
    expected = kd_loss(student[keep], teacher[keep], 2.0)
    got = kd_loss(student, teacher, 2.0, labels=labels, ignore_index=-100)
    assert torch.allclose(got, expected, atol=1e-6)


def test_masked_gradient_is_zero_at_masked_positions() -> None:
    student = torch.randn(2, 3, 4, requires_grad=True)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    kd_loss(student, torch.randn(2, 3, 4), 2.0, mask=mask).backward()
    assert torch.count_nonzero(student.grad[~mask]) == 0


def test_bf16_inputs_are_computed_in_float32() -> None:
    torch.manual_seed(5)
    student, teacher = torch.randn(16, 10), torch.randn(16, 10)
    loss_bf16 = kd_loss(student.bfloat16(), teacher.bfloat16(), 4.0)
    assert loss_bf16.dtype == torch.float32
    assert torch.allclose(loss_bf16, kd_loss(student.bfloat16().float(), teacher.bfloat16().float(), 4.0))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": 0.0}, "temperature must be between 0.01 and 100"),
        ({"temperature": 2.0, "mask": torch.ones(3, dtype=torch.bool)}, "mask shape"),
        ({"temperature": 2.0, "ignore_index": -100}, "ignore_index needs labels"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        kd_loss(STUDENT, TEACHER, **kwargs)


def test_shape_mismatch_is_named() -> None:
    with pytest.raises(ValueError, match="same number of classes"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4), 2.0)


@pytest.mark.parametrize("objective", [kd_loss, reverse_kl_loss, jsd_loss])
def test_a_divergence_is_never_negative_even_at_the_largest_temperature(objective) -> None:
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(64, 100, generator=generator) * 5
    for student in (teacher.clone(), teacher + 1e-4 * torch.randn(64, 100, generator=generator)):
        per_row = [objective(student[i : i + 1], teacher[i : i + 1], 100.0).item() for i in range(64)]
        assert min(per_row) >= 0.0
