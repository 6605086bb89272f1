"""The built-in GPT's cached generate(): the tokens of recomputing every prefix, left-padded prompts as if alone,
EOS, reproducible sampling, and its refusals."""

from __future__ import annotations

import pytest
import torch

from kd_lightning import KDError
from kd_lightning.models import GPT

VOCAB = 40


def model() -> GPT:
    torch.manual_seed(0)
    return GPT(VOCAB, 48, 32, 2, 4).train()


def recomputed(gpt: GPT, prompts: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy continuation by running the whole sequence again for each new token (no cache)."""
    sequence = prompts
    with torch.no_grad():
        for _ in range(new):
            sequence = torch.cat([sequence, gpt.eval()(sequence)[:, -1].argmax(-1, keepdim=True)], 1)
    return sequence


def test_cached_greedy_generation_gives_the_tokens_of_recomputing_every_prefix() -> None:
    gpt = model()
    prompts = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))
    made = gpt.generate(prompts, 20, greedy=True)
    assert gpt.training  # its mode is restored
    assert made.shape == (3, 27) and torch.equal(made[:, :7], prompts)
    assert torch.equal(made, recomputed(gpt, prompts, 20))


def test_left_padded_prompts_continue_as_each_would_alone() -> None:
    gpt = model()
    long, short = torch.randint(0, VOCAB, (1, 9)), torch.randint(0, VOCAB, (1, 4))
    prompts = torch.cat([long, torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1)])
    mask = torch.cat([torch.ones(1, 9), torch.cat([torch.zeros(1, 5), torch.ones(1, 4)], 1)]).long()
    made = gpt.generate(prompts, 12, prompt_mask=mask, greedy=True)
    assert torch.equal(made[0], gpt.generate(long, 12, greedy=True)[0])
    assert torch.equal(made[1, 5:], gpt.generate(short, 12, greedy=True)[0])


def test_rows_that_made_eos_keep_making_it_and_generation_stops_when_all_have() -> None:
    gpt = model()
    prompts = torch.randint(0, VOCAB, (4, 5), generator=torch.Generator().manual_seed(2))
    free = gpt.generate(prompts, 30, greedy=True)
    eos = int(free[0, 5])  # the first row's first new token: it stops at once
    made = gpt.generate(prompts, 30, greedy=True, eos_token_id=eos)
    for row in range(4):
        tokens = made[row, 5:].tolist()
        first = tokens.index(eos) if eos in tokens else len(tokens)
        assert tokens[:first] == free[row, 5 : 5 + first].tolist() and set(tokens[first:]) <= {eos}
    assert made.shape == (4, 35)  # the other rows never made it
    assert gpt.generate(prompts[:1], 30, greedy=True, eos_token_id=eos).shape == (1, 6)  # all rows done: it stops


def test_sampling_is_reproducible_from_a_generator_and_top_k_1_is_greedy() -> None:
    gpt = model()
    prompts = torch.randint(0, VOCAB, (2, 6))
    first = gpt.generate(prompts, 15, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(3))
    again = gpt.generate(prompts, 15, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    assert torch.equal(
        gpt.generate(prompts, 15, top_k=1, generator=torch.Generator().manual_seed(4)),
        gpt.generate(prompts, 15, greedy=True),
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer, got 0"),
        ({"max_new_tokens": 45}, "a prompt of 6 tokens and max_new_tokens=45 exceed the model's context of 48"),
        (
            {"max_new_tokens": 5, "temperature": 0.0},
            r"the sampling temperature must be > 0, got 0.0; for the likeliest token use greedy",
        ),
    ],
)
def test_bad_generation_settings_are_one_line(settings: dict, message: str) -> None:
    with pytest.raises(KDError, match=message):
        model().generate(torch.zeros(2, 6, dtype=torch.long), **settings)
