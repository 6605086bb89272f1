"""The chunked large-vocabulary loss: the plain loss and gradients, block by block, for every objective."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from kd_lightning.loss.chunked import chunked_distillation_loss
from kd_lightning.loss.objectives import dkd_loss, jsd_loss, kd_loss, reverse_kl_loss, skew_kl_loss, tvd_loss

OBJECTIVES = {
    "kd": kd_loss,
    "reverse_kl": reverse_kl_loss,
    "jsd": partial(jsd_loss, beta=0.3),
    "dkd": partial(dkd_loss, nckd_weight=2.0),
    "skew_kl": skew_kl_loss,
    "skew_reverse_kl": partial(skew_kl_loss, reverse=True),
    "tvd": tvd_loss,
}


def models(vocab: int = 37, hidden: int = 8, teacher_hidden: int = 12, padded: int = 0):
    """Student and teacher heads; ``padded`` extra vocabulary rows with a -inf bias in both."""
    g = torch.Generator().manual_seed(0)
    student, teacher = nn.Linear(hidden, vocab + padded), nn.Linear(teacher_hidden, vocab + padded)
    for head in (student, teacher):
        nn.init.normal_(head.weight, generator=g)
        nn.init.normal_(head.bias, generator=g)
        if padded:
            with torch.no_grad():
                head.bias[vocab:] = -float("inf")
    return (
        student,
        teacher,
        torch.randn(3, 5, hidden, generator=g),
        torch.randn(3, 5, teacher_hidden, generator=g),
        torch.randint(0, vocab, (3, 5), generator=g),
    )


def plain_and_chunked(objective, temperature: float, labels: torch.Tensor, padded: int = 0, **kwargs):
    student, teacher, h_s, h_t, _ = models(padded=padded)
    results = []
    for chunked in (False, True):
        head = nn.Linear(8, student.out_features)
        head.load_state_dict(student.state_dict())
        hidden = h_s.clone().requires_grad_(True)
        loss_fn = partial(objective, labels=labels, ignore_index=-100)
        if chunked:
            loss = chunked_distillation_loss(
                hidden,
                head,
                h_t,
                teacher,
                objective=objective,
                temperature=temperature,
                labels=labels,
                chunk_rows=4,
                **kwargs,
            )
        else:
            with torch.no_grad():
                teacher_logits = teacher(h_t)
            loss = loss_fn(head(hidden), teacher_logits, temperature, **kwargs)
        loss.backward()
        results.append((loss.detach(), hidden.grad, head.weight.grad, head.bias.grad))
    return results


@pytest.mark.parametrize("name", list(OBJECTIVES))
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("masking", ["none", "ignore_index", "all_ignored", "padded_vocabulary"])
def test_chunked_equals_plain(name: str, temperature: float, masking: str) -> None:
    _, _, _, _, labels = models()
    if masking == "ignore_index":
        labels = labels.clone()
        labels[0, :3] = -100
        labels[2, 4] = -100
    elif masking == "all_ignored":
        labels = torch.full_like(labels, -100)
    (loss, *grads), (chunked_loss, *chunked_grads) = plain_and_chunked(
        OBJECTIVES[name], temperature, labels, padded=3 if masking == "padded_vocabulary" else 0
    )
    assert torch.isfinite(chunked_loss) and all(torch.isfinite(g).all() for g in chunked_grads)
    torch.testing.assert_close(chunked_loss, loss, rtol=1e-5, atol=1e-7)
    for grad, chunked_grad in zip(grads, chunked_grads):
        torch.testing.assert_close(chunked_grad, grad, rtol=0, atol=1e-6)
    if masking == "all_ignored":
        assert chunked_loss.item() == 0.0 and not chunked_grads[0].any()


def test_gradient_accumulation_with_a_global_count_equals_one_batch() -> None:
    """3 micro-batches of one sequence, each divided by the step's kept-token count = the whole batch at once."""
    student, teacher, h_s, h_t, labels = models()
    labels = labels.clone()
    labels[0, 1:] = -100  # uneven kept counts across the micro-batches
    whole_head, parts_head = nn.Linear(8, 37), nn.Linear(8, 37)
    whole_head.load_state_dict(student.state_dict())
    parts_head.load_state_dict(student.state_dict())
    whole = chunked_distillation_loss(h_s, whole_head, h_t, teacher, labels=labels, temperature=2.0)
    whole.backward()
    num_kept = (labels != -100).sum()
    parts = []
    for i in range(3):
        part = chunked_distillation_loss(
            h_s[i : i + 1],
            parts_head,
            h_t[i : i + 1],
            teacher,
            labels=labels[i : i + 1],
            temperature=2.0,
            num_kept=num_kept,
        )
        part.backward()  # gradients accumulate in parts_head, as over micro-batches
        parts.append(part.detach())
    torch.testing.assert_close(sum(parts), whole.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(parts_head.weight.grad, whole_head.weight.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(parts_head.bias.grad, whole_head.bias.grad, rtol=1e-5, atol=1e-7)


def test_teacher_logits_from_a_function_and_bfloat16_hidden_states() -> None:
    student, teacher, h_s, h_t, labels = models()
    with torch.no_grad():
        teacher_logits = teacher(h_t).reshape(15, 37)
    hidden = h_s.bfloat16().requires_grad_(True)
    head = student.bfloat16()
    loss = chunked_distillation_loss(hidden, head, teacher_logits=lambda rows: teacher_logits[rows], labels=labels)
    loss.backward()
    assert (
        loss.dtype == torch.float32 and hidden.grad.dtype == torch.bfloat16 and head.weight.grad.dtype == torch.bfloat16
    )
    reference = kd_loss(head(hidden.detach()).float(), teacher_logits.reshape(3, 5, 37), 1.0)
    torch.testing.assert_close(loss.detach(), reference, rtol=2e-2, atol=1e-3)


def test_the_full_logits_never_exist() -> None:
    """No tensor of the (tokens, V) size is ever allocated: count the elements of every tensor made in the loss."""
    vocab, tokens = 4096, 256
    head, teacher = nn.Linear(16, vocab), nn.Linear(16, vocab)
    hidden, teacher_hidden = torch.randn(tokens, 16, requires_grad=True), torch.randn(tokens, 16)
    largest = 0

    class Watch(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            nonlocal largest
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                largest = max(largest, out.numel())
            return out

    with Watch():
        chunked_distillation_loss(hidden, head, teacher_hidden, teacher, chunk_rows=32).backward()
    assert largest <= 32 * vocab


def test_float64_stays_float64_and_nothing_kept_is_zero() -> None:
    """The plain path keeps float64; so does the chunked one. A step whose count of kept tokens is 0 gives 0, not NaN."""
    student, teacher, h_s, h_t, labels = models()
    head, teacher_head = student.double(), teacher.double()
    hidden = h_s.double().requires_grad_(True)
    loss = chunked_distillation_loss(
        hidden, head, h_t.double(), teacher_head, labels=labels, temperature=2.0, chunk_rows=4
    )
    loss.backward()
    assert loss.dtype == hidden.grad.dtype == head.weight.grad.dtype == torch.float64
    with torch.no_grad():
        plain = kd_loss(head(hidden), teacher_head(h_t.double()), 2.0, labels=labels, ignore_index=-100)
    torch.testing.assert_close(loss.detach(), plain, rtol=1e-12, atol=1e-14)
    nothing = torch.full_like(labels, -100)
    assert chunked_distillation_loss(hidden, head, h_t.double(), teacher_head, labels=nothing, num_kept=0).item() == 0.0
    assert (
        kd_loss(head(hidden), teacher_head(h_t.double()), labels=nothing, ignore_index=-100, num_kept=0).item() == 0.0
    )


def test_a_temperature_bound_to_the_objective_is_used() -> None:
    """``objective=partial(kd_loss, temperature=2.0)`` (the docstring's example): that temperature, no TypeError."""
    student, teacher, h_s, h_t, labels = models()
    bound = chunked_distillation_loss(
        h_s, student, h_t, teacher, objective=partial(kd_loss, temperature=2.0), labels=labels
    )
    given = chunked_distillation_loss(h_s, student, h_t, teacher, temperature=2.0, labels=labels)
    torch.testing.assert_close(bound, given)
    assert not torch.allclose(bound, chunked_distillation_loss(h_s, student, h_t, teacher, labels=labels))  # not T=1
