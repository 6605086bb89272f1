"""The logit objectives: each against a direct transcription of its formula (float64), its
special cases, gradcheck, and masked positions contributing exactly nothing."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.loss.objectives import (
    dkd_loss,
    jsd_loss,
    kd_loss,
    objective_name,
    reverse_kl_loss,
    sampled_kl_loss,
    skew_kl_loss,
    standardize_logits,
    tvd_loss,
)

SHAPES = [(5, 7), (3, 4, 6)]


def logits_pair(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * 2, torch.randn(
        *shape, generator=g, dtype=torch.float64
    ) * 2


def labels_for(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, shape[-1], shape[:-1], generator=torch.Generator().manual_seed(seed + 1))


# -- the formulas, transcribed --------------------------------------------------------------------


def forward_kl_formula(s, t, T):
    p, q = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
    return (p * (p.log() - q.log())).sum(-1).mean() * T**2


def reverse_kl_formula(s, t, T):
    p, q = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
    return (q * (q.log() - p.log())).sum(-1).mean()


def jsd_formula(s, t, T, beta, weights="gkd"):
    """GKD's generalised JSD (TRL: beta=0 forward KL, beta=1 reverse KL), or the continuous weighting."""
    p, q = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
    if weights == "gkd" and beta in (0, 1):
        first, second = (p, q) if beta == 0 else (q, p)
        return (first * (first / second).log()).sum(-1).mean()
    m = beta * p + (1 - beta) * q
    on_teacher = beta if weights == "gkd" else 1 - beta
    return (on_teacher * (p * (p / m).log()).sum(-1) + (1 - on_teacher) * (q * (q / m).log()).sum(-1)).mean()


def skew_kl_formula(s, t, T, skew, reverse):
    p, q = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
    first, second = (q, p) if reverse else (p, q)
    return (first * (first / (skew * first + (1 - skew) * second)).log()).sum(-1).mean()


def tvd_formula(s, t, T):
    return 0.5 * (torch.softmax(t / T, -1) - torch.softmax(s / T, -1)).abs().sum(-1).mean()


def dkd_formula(s, t, target, alpha, beta, T):
    """The reference implementation of Zhao et al. (mdistiller), (N, C) only."""
    gt = torch.zeros_like(s, dtype=torch.bool).scatter_(1, target[:, None], True)
    p_s, p_t = torch.softmax(s / T, 1), torch.softmax(t / T, 1)

    def cat_mask(p):
        return torch.stack([(p * gt).sum(1), (p * ~gt).sum(1)], 1)

    b_s, b_t = cat_mask(p_s), cat_mask(p_t)
    tckd = (b_t * (b_t.log() - b_s.log())).sum() * T**2 / len(s)
    p_t2 = torch.softmax(t / T - 1000.0 * gt, 1)
    log_p_s2 = F.log_softmax(s / T - 1000.0 * gt, 1)
    nckd = F.kl_div(log_p_s2, p_t2, reduction="sum") * T**2 / len(s)
    return alpha * tckd + beta * nckd


def standardize_formula(z):  # Sun et al. 2024, their `normalize`
    return (z - z.mean(-1, keepdim=True)) / (1e-7 + z.std(-1, keepdim=True))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_forward_and_reverse_kl_match_their_formulas(shape, T) -> None:
    s, t = logits_pair(shape)
    torch.testing.assert_close(kd_loss(s, t, T), forward_kl_formula(s, t, T), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(reverse_kl_loss(s, t, T), reverse_kl_formula(s, t, T), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(reverse_kl_loss(s, t, T, scale_by_t2=True), reverse_kl_formula(s, t, T) * T**2)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("weights", ["gkd", "continuous"])
def test_jsd_matches_its_formula(shape, beta, weights) -> None:
    s, t = logits_pair(shape, seed=2)
    torch.testing.assert_close(
        jsd_loss(s, t, 2.0, beta, weights=weights), jsd_formula(s, t, 2.0, beta, weights), rtol=1e-10, atol=1e-12
    )


def test_jsd_beta_means_what_it_means_in_trl() -> None:
    trl = pytest.importorskip("trl.experimental.gkd", reason="compared with TRL's GKDTrainer when trl is installed")
    s, t = logits_pair((6, 11), seed=4)
    for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
        labels = torch.zeros(1, 6, dtype=torch.long)  # every token counts: the mean over them
        theirs = trl.GKDTrainer.generalized_jsd_loss(s[None], t[None], labels=labels, beta=beta)  # T=1
        torch.testing.assert_close(jsd_loss(s, t, 1.0, beta), theirs, rtol=1e-9, atol=1e-12)


def test_jsd_special_cases() -> None:
    s, t = logits_pair((6, 5), seed=3)
    torch.testing.assert_close(jsd_loss(s, t, 2.0, 0.0, scale_by_t2=True), kd_loss(s, t, 2.0))  # beta=0: forward KL
    torch.testing.assert_close(jsd_loss(s, t, 2.0, 1.0), reverse_kl_loss(s, t, 2.0))  # beta=1: reverse KL
    # beta=0.5: the symmetric JSD, the same with the roles swapped, and at most log 2
    torch.testing.assert_close(jsd_loss(s, t, 2.0, 0.5), jsd_loss(t, s, 2.0, 0.5))
    assert 0 < jsd_loss(s * 50, t * 50, 1.0, 0.5) <= torch.log(torch.tensor(2.0, dtype=torch.float64))
    # the continuous weighting tends to forward KL as beta goes to 0; GKD's to 0 (hence TRL's special case at 0)
    torch.testing.assert_close(
        jsd_loss(s, t, 2.0, 1e-6, weights="continuous", scale_by_t2=True), kd_loss(s, t, 2.0), rtol=1e-4, atol=1e-6
    )
    assert jsd_loss(s, t, 2.0, 1e-6) < 1e-4 * kd_loss(s, t, 2.0)
    torch.testing.assert_close(
        jsd_loss(s, t, 2.0, 0.5, weights="continuous"), jsd_loss(s, t, 2.0, 0.5)
    )  # the same at 0.5
    with pytest.raises(ValueError, match="beta must be in"):
        jsd_loss(s, t, 2.0, 1.5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("skew", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("reverse", [False, True])
def test_skew_kl_matches_its_formula(shape, skew, reverse) -> None:
    s, t = logits_pair(shape, seed=13)
    torch.testing.assert_close(
        skew_kl_loss(s, t, 2.0, skew, reverse), skew_kl_formula(s, t, 2.0, skew, reverse), rtol=1e-10, atol=1e-12
    )


def test_skew_kl_special_cases() -> None:
    s, t = logits_pair((6, 5), seed=14)
    torch.testing.assert_close(skew_kl_loss(s, t, 2.0, 0.0, scale_by_t2=True), kd_loss(s, t, 2.0))  # skew 0: forward KL
    torch.testing.assert_close(skew_kl_loss(s, t, 2.0, 0.0, reverse=True), reverse_kl_loss(s, t, 2.0))
    # the mixture bounds the log-ratio: at most -log(skew), however far apart the two are
    assert 0 < skew_kl_loss(s * 100, t * 100, 1.0, 0.1) <= -torch.log(torch.tensor(0.1, dtype=torch.float64))
    with pytest.raises(ValueError, match="skew must be in"):
        skew_kl_loss(s, t, 2.0, 1.0)


@pytest.mark.parametrize("shape", SHAPES)
def test_tvd_matches_its_formula_and_is_bounded(shape) -> None:
    s, t = logits_pair(shape, seed=15)
    torch.testing.assert_close(tvd_loss(s, t, 2.0), tvd_formula(s, t, 2.0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tvd_loss(s, t, 2.0), tvd_loss(t, s, 2.0))  # symmetric
    assert tvd_loss(t, t, 2.0) == 0 and tvd_loss(s * 100, t * 100, 1.0) <= 1


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dkd_matches_the_reference_implementation(T) -> None:
    s, t = logits_pair((8, 10), seed=4)
    y = labels_for((8, 10))
    ours = dkd_loss(s, t, T, labels=y, tckd_weight=1.0, nckd_weight=8.0)
    torch.testing.assert_close(ours, dkd_formula(s, t, y, 1.0, 8.0, T), rtol=1e-8, atol=1e-10)


def test_dkd_decomposes_kd() -> None:
    """Zhao et al.'s identity: KD = TCKD + (1 − p_t[target])·NCKD, per sample."""
    s, t = logits_pair((1, 9), seed=5)
    y = labels_for((1, 9))
    p_target = torch.softmax(t / 3.0, -1)[0, y[0]]
    torch.testing.assert_close(
        dkd_loss(s, t, 3.0, labels=y, tckd_weight=1.0, nckd_weight=float(1 - p_target)), kd_loss(s, t, 3.0)
    )
    assert dkd_loss(t, t, 3.0, labels=y).item() == pytest.approx(0.0, abs=1e-12)


def test_dkd_on_sequences_equals_flattened_rows() -> None:
    s, t = logits_pair((3, 4, 6), seed=6)
    y = labels_for((3, 4, 6))
    torch.testing.assert_close(
        dkd_loss(s, t, 2.0, labels=y), dkd_loss(s.reshape(12, 6), t.reshape(12, 6), 2.0, labels=y.reshape(12))
    )
    with pytest.raises(ValueError, match="needs labels"):
        dkd_loss(s, t, 2.0, labels=None)


@pytest.mark.parametrize("objective", [kd_loss, reverse_kl_loss, jsd_loss])
def test_standardisation_is_the_objective_on_z_scored_logits(objective) -> None:
    s, t = logits_pair((6, 8), seed=7)
    s, t = s * 3 + 1, t * 0.5 - 2  # different scales and offsets: standardisation removes both
    expected = objective(standardize_formula(s), standardize_formula(t), 2.0)
    torch.testing.assert_close(objective(s, t, 2.0, standardize=True), expected)
    torch.testing.assert_close(objective(s * 10 + 3, t, 2.0, standardize=True), expected, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(standardize_logits(s), standardize_formula(s))


def test_dkd_standardisation() -> None:
    s, t = logits_pair((6, 8), seed=8)
    y = labels_for((6, 8))
    torch.testing.assert_close(
        dkd_loss(s, t, 2.0, labels=y, standardize=True),
        dkd_formula(standardize_formula(s), standardize_formula(t), y, 1.0, 8.0, 2.0),
        rtol=1e-8,
        atol=1e-10,
    )


OBJECTIVES = {
    "kd": lambda s, t, **kw: kd_loss(s, t, 2.0, **kw),
    "reverse_kl": lambda s, t, **kw: reverse_kl_loss(s, t, 2.0, **kw),
    "jsd": lambda s, t, **kw: jsd_loss(s, t, 2.0, 0.3, **kw),
    "dkd": lambda s, t, labels=None, **kw: dkd_loss(s, t, 2.0, labels=labels, **kw),
    "skew_kl": lambda s, t, **kw: skew_kl_loss(s, t, 2.0, 0.1, **kw),
    "skew_reverse_kl": lambda s, t, **kw: skew_kl_loss(s, t, 2.0, 0.1, reverse=True, **kw),
    "tvd": lambda s, t, **kw: tvd_loss(s, t, 2.0, **kw),
}


@pytest.mark.parametrize("name", OBJECTIVES)
@pytest.mark.parametrize("standardize", [False, True])
def test_gradcheck(name, standardize) -> None:
    s, t = logits_pair((3, 5), seed=9)
    y = labels_for((3, 5))
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: OBJECTIVES[name](x, t, labels=y, standardize=standardize), (s,))


@pytest.mark.parametrize("name", OBJECTIVES)
@pytest.mark.parametrize("shape", SHAPES)
def test_masked_positions_contribute_exactly_nothing(name, shape) -> None:
    s, t = logits_pair(shape, seed=10)
    y = labels_for(shape)
    g = torch.Generator().manual_seed(11)
    mask = torch.rand(shape[:-1], generator=g) > 0.4
    mask.view(-1)[0] = True
    other = s.clone()
    other[~mask] = torch.randn(int((~mask).sum()), shape[-1], generator=g, dtype=torch.float64) * 100  # anything at all
    loss = OBJECTIVES[name](s, t, labels=y, mask=mask)
    assert OBJECTIVES[name](other, t, labels=y, mask=mask) == loss  # bit for bit
    kept = OBJECTIVES[name](s[mask], t[mask], labels=y[mask])  # = the loss over the kept positions alone
    torch.testing.assert_close(loss, kept)
    s.requires_grad_(True)
    OBJECTIVES[name](s, t, labels=y, mask=mask).backward()
    assert torch.all(s.grad[~mask] == 0)
    # ignore_index drops positions the same way
    ignored = torch.where(mask, y, torch.full_like(y, -100))
    torch.testing.assert_close(OBJECTIVES[name](s.detach(), t, labels=ignored, ignore_index=-100), loss)


def test_half_precision_inputs_are_computed_in_float32() -> None:
    s, t = logits_pair((4, 6), seed=12)
    for objective in (kd_loss, reverse_kl_loss, jsd_loss):
        assert objective(s.half(), t.half(), 2.0).dtype == torch.float32
    assert dkd_loss(s.bfloat16(), t.bfloat16(), 2.0, labels=labels_for((4, 6))).dtype == torch.float32


def test_term_names() -> None:
    assert [objective_name(f) for f in (kd_loss, partial(jsd_loss, beta=0.1), dkd_loss)] == ["kd", "jsd", "dkd"]


# -- masked vocabulary entries: -inf logits ------------------------------------------------------

INF = float("inf")


def test_the_issue_example_is_finite_and_exact() -> None:
    value = kd_loss(torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[2.0, 1.0, -INF]]), 1.0)
    p_t = torch.tensor([2.0, 1.0]).softmax(-1)
    log_p_s = torch.tensor([1.0, 2.0, 0.5]).log_softmax(-1)[:2]
    assert value.item() == pytest.approx((p_t * (p_t.log() - log_p_s)).sum().item(), rel=1e-6)
    assert value.item() == pytest.approx(0.6132, abs=1e-4)


@pytest.mark.parametrize(
    "objective",
    [
        kd_loss,
        reverse_kl_loss,
        partial(jsd_loss, beta=0.3),
        partial(dkd_loss, nckd_weight=2.0),
        skew_kl_loss,
        partial(skew_kl_loss, reverse=True),
        tvd_loss,
    ],
)
@pytest.mark.parametrize("standardize", [False, True])
def test_padded_vocabulary_rows_change_nothing(objective, standardize: bool) -> None:
    """-inf in both models' padding rows: the value and gradient of the unpadded vocabulary, no NaN."""
    g = torch.Generator().manual_seed(3)
    s, t = (
        torch.randn(2, 5, 7, generator=g, dtype=torch.float64),
        torch.randn(2, 5, 7, generator=g, dtype=torch.float64),
    )
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[0, 1] = -100
    padding = torch.full((2, 5, 3), -INF, dtype=torch.float64)
    s_small = s.clone().requires_grad_(True)
    s_padded = torch.cat([s, padding], -1).requires_grad_(True)
    kwargs = {"labels": labels, "ignore_index": -100, "standardize": standardize}
    small = objective(s_small, t, 2.0, **kwargs)
    padded = objective(s_padded, torch.cat([t, padding], -1), 2.0, **kwargs)
    small.backward()
    padded.backward()
    torch.testing.assert_close(padded, small)
    torch.testing.assert_close(s_padded.grad[..., :7], s_small.grad)
    assert torch.equal(s_padded.grad[..., 7:], torch.zeros(2, 5, 3, dtype=torch.float64))


def test_a_class_only_one_side_rules_out() -> None:
    s = torch.tensor([[0.5, 1.0, -INF]], requires_grad=True)
    t = torch.tensor([[1.0, 0.0, 2.0]])
    assert reverse_kl_loss(s, t, 1.0).isfinite()  # the student puts no mass there: it contributes nothing
    assert kd_loss(s, t, 1.0).item() == INF  # the teacher does: KL(p_t ‖ p_s) is truly infinite, not NaN
    jsd = jsd_loss(s, t, 1.0, 0.5)
    jsd.backward()
    assert jsd.isfinite() and s.grad.isfinite().all()


@pytest.mark.parametrize("objective", [kd_loss, reverse_kl_loss, jsd_loss, skew_kl_loss, tvd_loss])
def test_a_fully_masked_batch_is_zero_with_zero_gradients(objective) -> None:
    s = torch.randn(2, 3, 5, requires_grad=True)
    value = objective(s, torch.randn(2, 3, 5), 2.0, labels=torch.full((2, 3), -100), ignore_index=-100)
    value.backward()
    assert value.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))


def test_dkd_leaves_unlabelled_samples_out() -> None:
    """A transfer set's unlabelled samples (-100) have no class to decouple around: DKD is over the labelled ones."""
    s, t = logits_pair((6, 5), seed=16)
    y = labels_for((6, 5))
    partly = y.clone()
    partly[[1, 4]] = -100
    kept = partly != -100
    torch.testing.assert_close(dkd_loss(s, t, 2.0, labels=partly), dkd_loss(s[kept], t[kept], 2.0, labels=y[kept]))
    assert dkd_loss(s, t, 2.0, labels=torch.full_like(y, -100)).item() == 0.0


def naive_mixture_kl(p: torch.Tensor, q: torch.Tensor, weight: float) -> torch.Tensor:
    """``KL(p ‖ weight·p + (1−weight)·q)`` per row, the textbook way: probabilities, then logs."""
    return (p * (p.log() - (weight * p + (1 - weight) * q).log())).sum(-1)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_mixtures_at_a_high_temperature_are_as_accurate_as_the_textbook_float32_formula(beta: float) -> None:
    """At T=10 the log-probabilities sit near -log V, where float32 rounds to ~1e-6: JSD's and skew KL's mixtures
    built from them were up to 100x further from the float64 value than the textbook formula in float32."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 16, 5003, generator=g), torch.randn(4, 16, 5003, generator=g)
    p_s, p_t = (s / 10).softmax(-1), (t / 10).softmax(-1)
    naive = {
        "jsd": ((1 - beta) * naive_mixture_kl(p_t, p_s, beta) + beta * naive_mixture_kl(p_s, p_t, 1 - beta)).mean(),
        "skew_kl": naive_mixture_kl(p_t, p_s, beta).mean(),
    }
    ours = {"jsd": lambda x, y: jsd_loss(x, y, 10.0, beta), "skew_kl": lambda x, y: skew_kl_loss(x, y, 10.0, beta)}
    for name, loss in ours.items():
        exact = loss(s.double(), t.double())
        ours_error, naive_error = abs(loss(s, t) - exact) / exact, abs(naive[name] - exact) / exact
        assert ours_error <= 1.5 * naive_error + 1e-7, (name, ours_error.item(), naive_error.item())


def test_logits_that_are_not_logits_of_one_batch_are_named_as_such() -> None:
    s, t = logits_pair((4, 6), seed=17)
    with pytest.raises(ValueError, match="must be floating point, got torch.int64"):
        kd_loss(s.long(), t)
    with pytest.raises(ValueError, match=r"are for different positions \(batch or sequence shapes differ\)"):
        kd_loss(s, t[:3])
    with pytest.raises(ValueError, match="differ in classes"):
        kd_loss(s, t[:, :5])


@pytest.mark.parametrize(
    "weights", [{"nckd_weight": -8.0}, {"tckd_weight": float("nan")}, {"nckd_weight": float("inf")}]
)
def test_dkd_weights_must_be_finite_and_not_negative(weights) -> None:
    s, t = logits_pair((4, 6), seed=18)
    with pytest.raises(ValueError, match="must be a finite number >= 0"):
        dkd_loss(s, t, 2.0, labels=labels_for((4, 6)), **weights)


def test_the_sampled_token_objective_is_the_log_ratio_of_the_drawn_tokens_by_hand() -> None:
    """Value: the mean over kept positions of log p_s(y) - log p_t(y); gradient: the mean of that ratio times the
    gradient of log p_s(y), both written out here from the softmax."""
    torch.manual_seed(0)
    student = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 3, 5, dtype=torch.float64)
    labels = torch.tensor([[4, 0, -100], [2, 2, 1]])
    loss = sampled_kl_loss(student, teacher, 1.0, labels=labels)
    loss.backward()
    kept = [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    value, grad = 0.0, torch.zeros_like(student)
    for n, position in kept:
        y = int(labels[n, position])
        p_s = student.detach()[n, position].softmax(-1)
        ratio = float(p_s[y].log() - teacher[n, position].softmax(-1)[y].log())
        value += ratio / len(kept)
        grad[n, position] = (
            ratio * (F.one_hot(torch.tensor(y), 5).double() - p_s) / len(kept)
        )  # d log p_s(y) / d logits
    assert loss.item() == pytest.approx(value, rel=1e-12)
    assert torch.allclose(student.grad, grad, atol=1e-14)


def test_the_sampled_token_gradient_is_reverse_kl_s_in_expectation_over_the_students_draws() -> None:
    """Summed over every token y with weight p_s(y), the gradient of the one-sample estimate is exactly the gradient
    of KL(p_s || p_t) (the score-function identity), and its value the KL itself."""
    torch.manual_seed(1)
    student, teacher = torch.randn(1, 7, dtype=torch.float64), torch.randn(1, 7, dtype=torch.float64)
    p_s = student.softmax(-1)[0]
    expected_value, expected_grad = 0.0, torch.zeros_like(student)
    for y in range(7):
        logits = student.clone().requires_grad_(True)
        loss = sampled_kl_loss(logits, teacher, 1.0, labels=torch.tensor([y]))
        loss.backward()
        expected_value += float(p_s[y]) * loss.item()
        expected_grad += p_s[y] * logits.grad
    exact = student.clone().requires_grad_(True)
    kl = reverse_kl_loss(exact, teacher, 1.0)
    kl.backward()
    assert expected_value == pytest.approx(kl.item(), rel=1e-10)
    assert torch.allclose(expected_grad, exact.grad, atol=1e-12)


def test_the_sampled_token_objective_needs_labels() -> None:
    with pytest.raises(ValueError, match=r"sampled_kl_loss needs labels of shape \(2,\): the tokens the student drew"):
        sampled_kl_loss(torch.zeros(2, 3), torch.zeros(2, 3))
