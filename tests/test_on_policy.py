"""On-policy distillation: prompts completed by the student (or the teacher), labelled like the data set's, the same
loss as off-policy on those sequences, the same samples for the same step, and the refusals."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from kd_lightning import DistillationModule, KDError, LossMix
from kd_lightning.data.batch import IGNORE_INDEX, as_batch
from kd_lightning.models import GPT
from kd_lightning.sequences import OnPolicy, Sequences, completed, prompts_of

VOCAB, EOS, PAD = 30, 1, 0


def chat_batch() -> dict[str, torch.Tensor]:
    """Two rows: a prompt of 3 tokens then 2 learned ones; a prompt of 5 then 1 learned; padded on the right."""
    inputs = torch.tensor([[5, 6, 7, 8, 9, 0, 0], [10, 11, 12, 13, 14, 15, 0]])
    labels = torch.full_like(inputs, IGNORE_INDEX)
    labels[0, 2:4] = torch.tensor([8, 9])
    labels[1, 4:6] = torch.tensor([15, 1])
    return {"inputs": inputs, "labels": labels}


def test_prompts_are_the_tokens_before_the_first_learned_label_aligned_on_the_right() -> None:
    prompts, mask = prompts_of(as_batch(chat_batch()), PAD)
    assert prompts.tolist() == [[0, 0, 5, 6, 7], [10, 11, 12, 13, 14]]
    assert mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]


def test_a_completion_is_learned_up_to_and_including_its_first_eos_and_nothing_else() -> None:
    prompts, mask = prompts_of(as_batch(chat_batch()), PAD)
    completions = torch.tensor([[20, EOS, 21, 22], [23, 24, 25, 26]])  # the first stops at EOS, the second runs out
    batch = completed(prompts, mask, completions, EOS, PAD)
    assert batch["inputs"].tolist() == [[5, 6, 7, 20, 0, 0, 0, 0], [10, 11, 12, 13, 14, 23, 24, 25]]
    assert batch["labels"].tolist() == [
        [-100, -100, 20, EOS, -100, -100, -100, -100],
        [-100, -100, -100, -100, 23, 24, 25, 26],
    ]
    assert batch["kept"].sum() == 6  # the step's normaliser counts the generated tokens


def modules(sequences: Sequences) -> tuple[DistillationModule, DistillationModule]:
    torch.manual_seed(0)
    student, teacher = GPT(VOCAB, 32, 16, 1, 2), GPT(VOCAB, 32, 16, 1, 2)
    mix = LossMix(temperature=1.0, alpha=0.5)
    return (
        DistillationModule(student, teacher, num_classes=VOCAB, task="tokens", loss_mix=mix, sequences=sequences),
        DistillationModule(student, teacher, num_classes=VOCAB, task="tokens", loss_mix=mix),
    )


def test_the_on_policy_loss_and_gradients_are_the_off_policy_ones_on_the_same_samples() -> None:
    sequences = Sequences(OnPolicy(fraction=1.0, max_new_tokens=6), EOS, PAD)
    on_policy, off_policy = modules(sequences)
    samples = sequences(as_batch(chat_batch()), on_policy.student, on_policy.teacher.model, step=3, micro_batch=0)
    assert samples["inputs"].shape[1] > chat_batch()["inputs"].shape[1] - 2  # prompts + sampled completions
    losses, grads = [], []
    for module, batch in ((on_policy, chat_batch()), (off_policy, samples)):
        module.zero_grad()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(type(module), "global_step", property(lambda self: 3))
            loss = module.training_step(batch, 0)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in module.student.parameters()])
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_same_step_samples_the_same_completions_and_another_step_others() -> None:
    sequences = Sequences(OnPolicy(fraction=1.0, max_new_tokens=8, temperature=1.5), EOS, PAD)
    student = GPT(VOCAB, 32, 16, 1, 2)
    batch = as_batch(chat_batch())
    first = sequences(batch, student, None, step=7, micro_batch=1)
    assert torch.equal(
        first["inputs"], sequences(batch, student, None, step=7, micro_batch=1)["inputs"]
    )  # a resumed run
    assert not torch.equal(first["inputs"], sequences(batch, student, None, step=8, micro_batch=1)["inputs"])


def test_fractions_choose_the_source_of_each_batch() -> None:
    mixed = Sequences(OnPolicy(fraction=0.5, teacher_fraction=0.25), EOS, PAD)
    drawn = [mixed.source(mixed.generator(step, 0)) for step in range(2000)]
    shares = {source: drawn.count(source) / len(drawn) for source in ("student", "teacher", "data")}
    assert shares["student"] == pytest.approx(0.5, abs=0.04) and shares["teacher"] == pytest.approx(0.25, abs=0.04)
    teacher_only = Sequences(OnPolicy(teacher_fraction=1.0, greedy=True, max_new_tokens=4), EOS, PAD)
    teacher = GPT(VOCAB, 32, 16, 1, 2)
    written = teacher_only(as_batch(chat_batch()), GPT(VOCAB, 32, 16, 1, 2), teacher, step=0)
    prompts, mask = prompts_of(as_batch(chat_batch()), PAD)
    expected = completed(
        prompts, mask, teacher.generate(prompts, 4, prompt_mask=mask, greedy=True, eos_token_id=EOS)[:, 5:], EOS, PAD
    )
    assert torch.equal(written["inputs"], expected["inputs"]) and torch.equal(written["labels"], expected["labels"])


def test_a_transformers_student_samples_with_its_own_generate() -> None:
    pytest.importorskip("transformers", reason="transformers models need the 'lm' extra")
    from kd_lightning.models.gpt import hf_causal_lm

    student = hf_causal_lm(
        "llama",
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    sequences = Sequences(OnPolicy(fraction=1.0, max_new_tokens=5, top_k=10, top_p=0.9), EOS, PAD)
    batch = sequences(as_batch(chat_batch()), student.train(), None, step=2)
    assert student.training and batch["inputs"].shape[0] == 2 and 1 <= int(batch["kept"][0].sum()) <= 5
    assert torch.equal(batch["inputs"], sequences(as_batch(chat_batch()), student, None, step=2)["inputs"])


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"fraction": 1.5}, r"distill.on_policy.fraction must be in \[0, 1\]"),
        ({"fraction": 0.7, "teacher_fraction": 0.5}, "fraction \\+ teacher_fraction must be at most 1"),
        ({"max_new_tokens": 0}, "distill.on_policy.max_new_tokens must be a positive integer, got 0"),
        (
            {"temperature": 0.0},
            "distill.on_policy.temperature must be > 0, got 0.0; for the likeliest token set "
            "distill.on_policy.greedy=true",
        ),
        ({"top_p": 0.0}, r"distill.on_policy.top_p must be in \(0, 1\]"),
        (
            {"greedy": True, "temperature": -1.0},
            r"temperature must be > 0, got -1.0; greedy=true takes the likeliest token whatever it is \(leave it at 1\)",
        ),
    ],
)
def test_bad_on_policy_settings_are_one_line(settings: dict, message: str) -> None:
    with pytest.raises(KDError, match=message):
        OnPolicy(**settings)


def test_on_policy_refusals_before_training(make_cfg) -> None:
    from conftest import settings_of

    with pytest.raises(KDError, match="samples completions that no recording holds .*use teacher.mode=live"):
        settings_of(make_cfg("teacher.mode=recorded", "distill.on_policy.fraction=1.0"))
    with pytest.raises(
        KDError, match="distill.on_policy has no setting 'lambda'; its settings are fraction, teacher_fraction"
    ):
        settings_of(make_cfg("+distill.on_policy.lambda=1.0"))
    with pytest.raises(KDError, match="cross-entropy on them would teach it to repeat itself. Set distill.alpha=1"):
        settings_of(make_cfg("distill.on_policy.fraction=0.5", "distill.alpha=0.9"))
    assert (
        settings_of(make_cfg("distill.on_policy.teacher_fraction=0.5", "distill.alpha=0.9")).on_policy.teacher_fraction
        == 0.5
    )
    with pytest.raises(KDError, match="distill.on_policy samples completions: it is for language models"):
        DistillationModule(
            torch.nn.Linear(4, 3),
            torch.nn.Linear(4, 3),
            num_classes=3,
            sequences=Sequences(OnPolicy(fraction=1.0), EOS, PAD),
        )
    with pytest.raises(
        KDError, match="Linear has no generate\\(\\); use kd_lightning.models.GPT or a transformers causal LM"
    ):
        Sequences(OnPolicy(fraction=1.0), EOS, PAD)(as_batch(chat_batch()), torch.nn.Linear(4, 3), None, step=0)
    with pytest.raises(KDError, match="a row of the batch has no learned token"):
        prompts_of(as_batch({"inputs": torch.zeros(1, 4, dtype=torch.long), "labels": torch.full((1, 4), -100)}), PAD)


@pytest.mark.parametrize(
    "overrides",
    [
        [],  # off-policy: the data set's tokens, not the student's draws
        ["distill.on_policy.fraction=1", "distill.on_policy.after_steps=10"],
        ["distill.on_policy.fraction=1", "distill.on_policy.temperature=2"],
        ["distill.on_policy.fraction=1", "distill.on_policy.top_k=5"],
    ],
)
def test_the_sampled_token_objective_needs_the_students_own_draws(make_cfg, overrides: list[str]) -> None:
    from conftest import settings_of

    with pytest.raises(KDError, match="distill/loss=sampled_kl estimates reverse KL from tokens the student drew"):
        settings_of(make_cfg("distill/loss=sampled_kl", "distill.alpha=1", "distill.temperature=1", *overrides))
    on_policy = settings_of(
        make_cfg("distill/loss=sampled_kl", "distill.alpha=1", "distill.temperature=1", "distill.on_policy.fraction=1")
    ).on_policy
    assert on_policy.fraction == 1


def test_on_policy_on_image_data_is_refused_before_the_run_starts(make_cfg, tmp_path) -> None:
    from kd_lightning.run.train import train

    cfg = make_cfg("distill.on_policy.fraction=0.5", "distill.alpha=1", output_dir=tmp_path / "run")
    with pytest.raises(
        KDError, match="samples completions from a language model, but DigitsDataModule is classification"
    ):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_a_chat_run_distils_on_the_students_own_samples_end_to_end(make_cfg, tmp_path, caplog) -> None:
    pytest.importorskip("transformers", reason="chat data needs the 'lm' extra")
    from data_factory import make_corpus
    from test_chat import TALK, TEMPLATE, write_chats
    from test_pretrained import save_llama, save_tokenizer
    from transformers import AutoTokenizer

    from kd_lightning.run.train import train

    size = save_tokenizer(make_corpus(tmp_path / "corpus"), tmp_path / "teacher")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "teacher")
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(tmp_path / "teacher")
    save_llama(tmp_path / "teacher", size, max_position_embeddings=160)
    chats = write_chats(
        tmp_path / "chats", [{"messages": TALK[1:3]}, {"prompt": "Who is it?", "completion": "Nobody."}] * 4
    )
    chat_run = [
        "teacher=hf",
        f"teacher.model.path={tmp_path / 'teacher'}",
        "data=chat",
        f"data.data_dir={chats}",
        f"data.vocab_size={size}",
        "data.max_length=96",
        "data.block_size=160",
        "student=gpt_student",
        "distill.on_policy.fraction=1.0",
        "distill.alpha=1",
    ]
    small = ["student.model.dim=16", "student.model.depth=1", "trainer.max_epochs=1", "baseline=false"]
    with caplog.at_level("INFO", logger="kd_lightning"):
        results = train(make_cfg(*chat_run, *small, "distill.on_policy.max_new_tokens=8", output_dir=tmp_path / "run"))
    assert "completions sampled: student 1, teacher 0 of the batches, up to 8 tokens, temperature 1.0" in caplog.text
    assert results["distilled"]["test/ppl"] > 1
    # the sampled-token reverse KL on the same samples: log p_s(y) - log p_t(y) at each drawn token
    sampled = train(
        make_cfg(
            *chat_run,
            *small,
            "distill.on_policy.max_new_tokens=8",
            "distill/loss=sampled_kl",
            "distill.temperature=1",
            "trainer.log_every_n_steps=1",
            output_dir=tmp_path / "sampled",
        )
    )
    assert math.isfinite(sampled["distilled"]["test/ppl"])
    assert "train/sampled_kl" in (tmp_path / "sampled" / "distilled" / "metrics.csv").read_text().splitlines()[0]
    with pytest.raises(
        KDError,
        match=r"distill.on_policy.max_new_tokens=150 after prompts of up to \d+ tokens exceeds the "
        "student's context of 160",
    ):
        train(make_cfg(*chat_run, "distill.on_policy.max_new_tokens=150", output_dir=tmp_path / "refused"))


def test_the_samples_scores_are_the_teachers_nll_and_the_reverse_kl_on_the_students_own_completions() -> None:
    from kd_lightning.sequences import SampleScores, distinct_pairs

    torch.manual_seed(0)
    student, teacher = GPT(VOCAB, 32, 16, 1, 2), GPT(VOCAB, 32, 16, 1, 2)
    settings = OnPolicy(max_new_tokens=3)
    scores = SampleScores(settings, EOS, PAD)(student, teacher, as_batch(chat_batch()), seed=7)
    prompts, mask = prompts_of(as_batch(chat_batch()), PAD)
    torch.manual_seed(7)  # generate() draws from the seed it is given, in a forked random state
    samples = completed(
        prompts, mask, student.generate(prompts, 3, prompt_mask=mask, eos_token_id=EOS)[:, prompts.shape[1] :], EOS, PAD
    )
    kept = samples["kept"]
    with torch.no_grad():
        log_s, log_t = (
            student(samples["inputs"]).log_softmax(-1)[kept],
            teacher(samples["inputs"]).log_softmax(-1)[kept],
        )
    drawn = samples["labels"][kept]
    nll, tokens = scores["sample_teacher_nll"]
    assert tokens == kept.sum() and torch.allclose(nll, -log_t.gather(-1, drawn[:, None]).mean(), atol=1e-6)
    assert torch.allclose(scores["sample_reverse_kl"][0], (log_s.exp() * (log_s - log_t)).sum(-1).mean(), atol=1e-6)
    assert scores["sample_tokens_per_s"][0] > 0
    # distinct-2: pairs of adjacent completion tokens, over the batch; a completion of one token has none
    repeated = {"labels": torch.tensor([[-100, 4, 5, 4, 5], [-100, -100, 4, 5, -100], [-100, -100, -100, 9, -100]])}
    repeated["kept"] = repeated["labels"] != -100
    share, pairs = distinct_pairs(repeated)
    assert pairs == 4 and share == 0.5  # (4,5) (5,4) (4,5) | (4,5)


def test_the_sample_scores_make_only_what_fits_in_the_students_context() -> None:
    from kd_lightning.data import ArithmeticDataModule
    from kd_lightning.sequences import SampleScores

    data = ArithmeticDataModule(train_size=64, val_size=8, test_size=8)
    data.setup()
    batch = as_batch({"inputs": data.splits["test"].inputs, "labels": data.splits["test"].targets})
    torch.manual_seed(0)
    student = GPT(14, 16, 16, 1, 2)  # prompts of 8 tokens: 8 more fit, not the default 64
    scores = SampleScores(OnPolicy(), data.tokenizer.eos_token_id, data.pad_id())(student, student, batch, seed=0)
    assert scores["sample_teacher_nll"][1] <= 8 * len(batch["inputs"])


ARITHMETIC = [
    "data=arithmetic",
    "data.train_size=256",
    "data.val_size=32",
    "data.test_size=32",
    "data.batch_size=32",
    "data.eval_batch_size=32",
    "teacher=gpt_teacher",
    "teacher.model.dim=16",
    "teacher.model.depth=1",
    "teacher.model.heads=2",
    "teacher.fit.max_epochs=1",
    "student=gpt_student",
    "student.model.dim=16",
    "student.model.depth=1",
    "distill.alpha=1",
    "distill.temperature=1",
    "distill.on_policy.max_new_tokens=5",
    "trainer.max_epochs=3",
    "trainer.limit_train_batches=4",
    "baseline=false",
]


@pytest.mark.parametrize(
    "speed, crash_step",  # in epoch 1 (4 batches an epoch)
    [([], 6), (["speed.generate_per_step=true", "trainer.accumulate_grad_batches=2"], 3)],
    ids=["per micro-batch", "per step"],
)
def test_a_killed_on_policy_run_resumed_samples_what_the_uninterrupted_one_did(
    make_cfg, tmp_path, speed, crash_step
) -> None:
    from crash_callback import Preempted
    from test_resume import student_weights

    from kd_lightning.run.train import train

    mixed = [*ARITHMETIC, "distill.on_policy.fraction=0.5", "distill.on_policy.teacher_fraction=0.25", *speed]
    uninterrupted = train(make_cfg(*mixed, output_dir=tmp_path / "a"))
    with pytest.raises(Preempted):  # after the epoch-0 checkpoint
        train(
            make_cfg(
                *mixed,
                "+callbacks.crash._target_=crash_callback.CrashAtStep",
                "+callbacks.crash.stage=distilled",
                f"+callbacks.crash.step={crash_step}",
                output_dir=tmp_path / "b",
            )
        )
    resumed = train(
        make_cfg(*mixed, "ckpt_path=last", "changed_on_resume=[callbacks.crash]", output_dir=tmp_path / "b")
    )
    a, b = student_weights(tmp_path / "a", "distilled"), student_weights(tmp_path / "b", "distilled")
    assert all(torch.equal(a[key], b[key]) for key in a)
    untimed = lambda metrics: {k: v for k, v in metrics.items() if not k.endswith("tokens_per_s")}  # noqa: E731
    assert untimed(resumed["distilled"]) == untimed(uninterrupted["distilled"])


def test_on_policy_stages_distil_the_same_student_as_runs_of_their_own(make_cfg, tmp_path, capsys) -> None:
    from test_resume import student_weights

    from kd_lightning.run.cli import format_summary
    from kd_lightning.run.train import train

    results = train(
        make_cfg(
            *ARITHMETIC,
            "distill.on_policy.fraction=1",
            "distill.on_policy.after_steps=4",
            "+distill.on_policy_stages.off_policy={fraction:0.0}",
            "+distill.on_policy_stages.mixed={fraction:0.5}",
            output_dir=tmp_path / "all",
        )
    )
    alone = train(
        make_cfg(
            *ARITHMETIC,
            "distill.on_policy.fraction=0.5",
            "distill.on_policy.after_steps=4",
            output_dir=tmp_path / "mixed",
        )
    )
    a, b = student_weights(tmp_path / "all", "mixed"), student_weights(tmp_path / "mixed", "distilled")
    assert all(torch.equal(a[key], b[key]) for key in a)
    untimed = lambda metrics: {k: v for k, v in metrics.items() if not k.endswith("tokens_per_s")}  # noqa: E731
    assert untimed(results["mixed"]) == untimed(alone["distilled"]) and results["on_policy_stages"] == [
        "off_policy",
        "mixed",
    ]
    for stage in ("distilled", "off_policy", "mixed"):
        assert 0 <= results[stage]["test/exact_match"] <= 1 and results[stage]["test/sample_teacher_nll"] > 0
        assert 0 < results[stage]["test/sample_distinct_2"] <= 1
    assert results["off_policy"] != results["distilled"]
    table = format_summary(results)
    assert "distilled: off_policy" in table and "distilled: mixed" in table and "exact %" in table
    # overwrite=true replaces every stage of the earlier run, the extra ones too
    train(make_cfg(*ARITHMETIC, "overwrite=true", "trainer.max_epochs=1", output_dir=tmp_path / "all"))
    assert not (tmp_path / "all" / "off_policy").exists() and not (tmp_path / "all" / "mixed").exists()


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ("baseline={fraction:0.0}", "distill.on_policy_stages: 'baseline' cannot name a stage"),
        ("off={lambda:0.0}", "distill.on_policy_stages.off has no setting 'lambda'"),
        ("off={fraction:2.0}", r"distill.on_policy.fraction must be in \[0, 1\]"),
        ("off=0.5", r"distill.on_policy_stages.off must be distill.on_policy settings, e.g. \{fraction: 0.0\}"),
    ],
)
def test_bad_on_policy_stages_are_one_line(make_cfg, stages: str, message: str) -> None:
    from conftest import settings_of

    with pytest.raises(KDError, match=message):
        settings_of(make_cfg(*ARITHMETIC, f"+distill.on_policy_stages.{stages}"))


def test_the_onpolicy_arithmetic_recipe_writes_each_students_exact_match(make_cfg, tmp_path) -> None:
    import json

    from kd_lightning.run.run_dir import RESULTS_FILE
    from kd_lightning.run.train import train

    smoke = [
        "data.train_size=256",
        "data.val_size=32",
        "data.test_size=32",
        "data.batch_size=32",
        "data.eval_batch_size=32",
        "teacher.fit.max_epochs=1",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
    ]
    results = train(make_cfg("+recipe=onpolicy_arithmetic", *smoke, output_dir=tmp_path / "run"))
    written = json.loads((tmp_path / "run" / RESULTS_FILE).read_text())
    assert written["on_policy_stages"] == ["off_policy", "mixed"]
    for stage in ("teacher", "baseline", "distilled", "off_policy", "mixed"):
        assert 0 <= written[stage]["test/exact_match"] <= 1, stage
    assert results["distilled"]["test/exact_match"] == written["distilled"]["test/exact_match"]


# -- speed.generate_per_step: an optimizer step's completions sampled in one call -----------------------------------


def step_batches(sizes: list[int], seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Micro-batches of ``sizes`` rows, prompts of 2 to 5 tokens then 1 to 3 learned ones, padded on the right."""
    draw = torch.Generator().manual_seed(seed)
    batches = []
    for rows in sizes:
        inputs, labels = torch.zeros(rows, 9, dtype=torch.long), torch.full((rows, 9), IGNORE_INDEX)
        for row in range(rows):
            prompt, learned = int(torch.randint(2, 6, (), generator=draw)), int(torch.randint(1, 4, (), generator=draw))
            tokens = torch.randint(2, VOCAB, (prompt + learned,), generator=draw)
            inputs[row, : prompt + learned - 1] = tokens[:-1]
            labels[row, prompt - 1 : prompt + learned - 1] = tokens[prompt:]
        batches.append(as_batch({"inputs": inputs, "labels": labels}))
    return batches


def served(batches: list[dict], position: int) -> dict:
    return {**batches[position], "step_batches": batches, "step_position": position}


def counted_generate(model: GPT) -> list[int]:
    """Count ``model.generate`` calls (their rows), calling through."""
    calls: list[int] = []
    generate = model.generate

    def counting(prompts, *args, **kwargs):  # noqa: ANN001, ANN202
        calls.append(len(prompts))
        return generate(prompts, *args, **kwargs)

    model.generate = counting  # type: ignore[method-assign]
    return calls


def test_a_step_sampled_together_is_its_micro_batches_sampled_one_by_one_greedy() -> None:
    torch.manual_seed(0)
    student, teacher = GPT(VOCAB, 32, 16, 1, 2), GPT(VOCAB, 32, 16, 1, 2)
    settings = OnPolicy(fraction=0.4, teacher_fraction=0.3, greedy=True, max_new_tokens=5)
    batches = step_batches([3, 2, 4, 3, 1])
    alone = [
        Sequences(settings, EOS, PAD)(dict(batch), student, teacher, step=7, micro_batch=10 + i)
        for i, batch in enumerate(batches)
    ]
    student_calls, teacher_calls = counted_generate(student), counted_generate(teacher)
    together = Sequences(settings, EOS, PAD)
    made = [together(served(batches, i), student, teacher, step=7, micro_batch=10 + i) for i in range(len(batches))]
    for one, both in zip(alone, made):
        assert set(one) == set(both) and all(torch.equal(one[key], both[key]) for key in one)
    # step 7's draws: student, student, student, data, teacher; one call of each model
    assert made[3]["inputs"] is batches[3]["inputs"]
    assert student_calls == [3 + 2 + 4] and teacher_calls == [1]


def test_a_step_sampled_together_draws_again_the_same_after_a_restart_mid_step() -> None:
    torch.manual_seed(0)
    student = GPT(VOCAB, 32, 16, 1, 2)
    settings = OnPolicy(fraction=1.0, temperature=1.5, max_new_tokens=6)
    batches = step_batches([4, 4, 4])
    running = Sequences(settings, EOS, PAD)
    made = [running(served(batches, i), student, None, step=3, micro_batch=6 + i) for i in range(3)]
    restarted = Sequences(settings, EOS, PAD)(served(batches, 2), student, None, step=3, micro_batch=8)
    assert torch.equal(restarted["inputs"], made[2]["inputs"]) and torch.equal(restarted["labels"], made[2]["labels"])
    later = running(served(batches, 0), student, None, step=4, micro_batch=9)  # the next step samples afresh
    assert not torch.equal(later["labels"], made[0]["labels"])


def test_the_loader_serves_each_batch_with_the_batches_of_its_optimizer_step() -> None:
    from types import SimpleNamespace

    from kd_lightning.data.walk import WalkDataModule

    for rank, processes in ((0, 1), (1, 2)):
        data = WalkDataModule(train_size=104, val_size=8, test_size=8, batch_size=8)
        data.trainer = SimpleNamespace(
            accumulate_grad_batches=3, global_rank=rank, world_size=processes, current_epoch=1
        )
        plain = list(data.train_dataloader())
        data.serve_steps = True
        loader = data.train_dataloader()
        ticks = list(loader)
        assert len(loader) == len(ticks) == len(plain) == -(-104 // (8 * processes))
        for i, (tick, batch) in enumerate(zip(ticks, plain)):
            first = i - i % 3
            assert tick["step_position"] == i % 3
            assert [b["index"].tolist() for b in tick["step_batches"]] == [
                b["index"].tolist() for b in plain[first : first + 3]
            ]
            assert all(torch.equal(tick[key], batch[key]) for key in batch)


def test_a_run_that_generates_each_step_at_once_trains_as_one_that_generates_per_micro_batch(
    make_cfg, tmp_path, caplog
) -> None:
    from kd_lightning.run.train import train

    run = [
        "+recipe=onpolicy_walk",
        "data.train_size=96",
        "data.val_size=16",
        "data.test_size=16",
        "data.batch_size=8",
        "teacher.fit.max_epochs=1",
        "trainer.max_epochs=1",
        "trainer.accumulate_grad_batches=3",
        "trainer.log_every_n_steps=1",
        "distill.on_policy.after_steps=0",
        "distill.on_policy.greedy=true",
        "distill.on_policy.temperature=1",
        "baseline=false",
    ]
    with caplog.at_level("INFO", logger="kd_lightning"):
        together = train(make_cfg(*run, "speed.generate_per_step=true", output_dir=tmp_path / "together"))
    assert "each optimizer step's completions in one call per model (speed.generate_per_step)" in caplog.text
    alone = train(make_cfg(*run, output_dir=tmp_path / "alone"))
    for stage in ("distilled", "mixed"):
        assert together[stage]["test/loss"] == pytest.approx(alone[stage]["test/loss"], rel=1e-6)
    losses = [
        [
            float(row["train/loss"])
            for row in csv.DictReader((tmp_path / name / "distilled" / "metrics.csv").read_text().splitlines())
            if row["train/loss"]
        ]
        for name in ("together", "alone")
    ]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], rel=1e-6)  # 12 batches, 3 a step


def test_generate_per_step_needs_sampled_completions_and_micro_batches(make_cfg) -> None:
    import lightning as L
    from conftest import settings_of

    from kd_lightning.run.preflight import check_sampling_fits

    with pytest.raises(KDError, match="speed.generate_per_step=true samples each optimizer step's completions in one"):
        settings_of(make_cfg("speed.generate_per_step=true", "trainer.accumulate_grad_batches=2"))
    with pytest.raises(KDError, match="trainer.accumulate_grad_batches=1 makes each step one batch: raise it"):
        settings_of(make_cfg("speed.generate_per_step=true", "distill.on_policy.fraction=1", "distill.alpha=1"))
    settings = settings_of(
        make_cfg(
            "speed.generate_per_step=true",
            "distill.on_policy.fraction=1",
            "distill.alpha=1",
            "trainer.accumulate_grad_batches=2",
        )
    )
    assert settings.speed.generate_per_step

    class TokenBatches(L.LightningDataModule):  # a user's data module, which serves micro-batches alone
        task = "tokens"

    with pytest.raises(KDError, match="speed.generate_per_step needs each training batch served with the batches of"):
        check_sampling_fits(settings, TokenBatches(), GPT(VOCAB, 32, 16, 1, 2))
