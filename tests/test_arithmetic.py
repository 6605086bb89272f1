"""The arithmetic task: distinct problems per split (no test problem in training), only the answer learned, and the
greedy exact-match metric."""

from __future__ import annotations

import pytest
import torch

from kd_lightning import KDError
from kd_lightning.data import ArithmeticDataModule
from kd_lightning.data.batch import IGNORE_INDEX, as_batch
from kd_lightning.sequences import Answers


def data(**settings) -> ArithmeticDataModule:
    module = ArithmeticDataModule(**{"train_size": 300, "val_size": 50, "test_size": 50} | settings)
    module.setup()
    return module


def test_problems_are_distinct_and_no_test_problem_is_trained_on() -> None:
    module = data()
    text = {
        split: [module.tokenizer.decode(row).split("=")[0] for row in module.splits[split].inputs]
        for split in ("train", "val", "test")
    }
    assert (
        len(set(text["train"])) == 300
        and not set(text["test"]) & set(text["train"])
        and not set(text["val"]) & set(text["train"])
    )
    assert text == {
        split: [module.tokenizer.decode(row).split("=")[0] for row in data().splits[split].inputs] for split in text
    }


def test_only_the_reversed_sum_and_its_end_token_are_learned() -> None:
    module = data()
    for row in range(20):
        inputs, labels = module.splits["train"].inputs[row], module.splits["train"].targets[row]
        problem = module.tokenizer.decode(inputs).split("=")[0]
        a, b = map(int, problem.split("+"))
        learned = labels[labels != IGNORE_INDEX].tolist()
        assert module.tokenizer.decode(learned) == str(a + b)[::-1] and learned[-1] == module.tokenizer.eos_token_id
        first = int((labels != IGNORE_INDEX).long().argmax())
        assert module.tokenizer.decode(inputs[: first + 1]) == f"{problem}="  # the prompt ends where the answer starts


def test_exact_match_is_the_whole_greedy_completion_up_to_its_end(monkeypatch) -> None:
    module = data()
    batch = as_batch({"inputs": module.splits["test"].inputs[:3], "labels": module.splits["test"].targets[:3]})
    answers = [batch["labels"][row][batch["labels"][row] != IGNORE_INDEX] for row in range(3)]
    eos = module.tokenizer.eos_token_id
    wrong = answers[1].clone()
    wrong[0] = 2 if int(wrong[0]) != 2 else 3
    completions = [
        torch.cat([answers[0], torch.tensor([7, 7])]),  # right, then anything after its end: right
        wrong,
        answers[2][:-1],
    ]  # a wrong digit; right digits without the end token: wrong

    def generate(model, prompts, mask, settings, eos_token_id, pad_token_id, seed):
        width = settings.max_new_tokens
        made = torch.full((len(prompts), width), 5)
        for row, completion in enumerate(completions):
            made[row, : min(width, len(completion))] = completion[:width]
        return torch.cat([prompts, made], 1)

    monkeypatch.setattr("kd_lightning.sequences.generate", generate)
    checker = Answers.of(module)
    assert checker == Answers(eos, 0)
    assert checker.matches(torch.nn.Identity(), batch).tolist() == [1.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"train_size": 6000, "digits": 2}, "too many to keep test problems out of training"),
        ({"block_size": 8}, "data.block_size=8 is shorter than a problem of 3-digit operands and its answer"),
        ({"vocab_size": 20}, "the arithmetic task has 14 tokens; set data.vocab_size=14"),
    ],
)
def test_bad_arithmetic_settings_are_one_line(settings: dict, message: str) -> None:
    with pytest.raises(KDError, match=message):
        ArithmeticDataModule(**settings)
