"""The slippery walk: clean walks for the students, slips and the way back for the teacher, and success with slips
measured on the same draws for every model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kd_lightning import KDError
from kd_lightning.data import WalkDataModule
from kd_lightning.data.batch import IGNORE_INDEX


def walks(data: WalkDataModule, inputs: torch.Tensor, labels: torch.Tensor) -> list[tuple[int, int, list, list]]:
    """``(start, goal, cells reached, whether each was learned)`` per row."""
    found = []
    for row, learned in zip(inputs.tolist(), labels.tolist()):
        start, goal = row[0] - 1, row[1] - 1 - data.cells
        cells = [token - 1 for token in row[3:] if token != 0]
        found.append((start, goal, cells, [label != IGNORE_INDEX for label in learned[2 : 2 + len(cells)]]))
    return found


@pytest.fixture(scope="module")
def data() -> WalkDataModule:
    data = WalkDataModule(train_size=400, val_size=20, test_size=200)
    data.setup("fit")
    return data


def test_the_students_walk_right_to_the_goal_in_moves_of_one_to_three_every_cell_learned(data) -> None:
    train = data.splits["train"]
    for start, goal, cells, learned in walks(data, train.inputs, train.targets):
        steps = [b - a for a, b in zip([start, *cells], cells)]
        assert cells[-1] == goal and all(1 <= step <= 3 for step in steps) and all(learned)
    first = train.targets[0].tolist()
    assert first[:2] == [IGNORE_INDEX, IGNORE_INDEX]  # the prompt is not learned; the end token is
    assert 0 in [label for label in first if label != IGNORE_INDEX]


def test_the_teacher_also_slips_past_the_goal_and_learns_the_way_back_but_not_the_slip(data) -> None:
    students = data.splits["train"].inputs
    with data.teacher_view():
        train = data.splits["train"]
        rows = walks(data, train.inputs, train.targets)
    assert data.splits["train"].inputs is students  # the students' walks again after the block
    slips = backs = 0
    for start, goal, cells, learned in rows:
        assert cells[-1] == goal
        for here, there, learn in zip([start, *cells], cells, learned):
            if not learn:
                slips += 1
                assert 1 <= there - here <= 3 or there == data.cells - 1  # a random move right, not learned
            elif here > goal:
                backs += 1
                assert 1 <= here - there <= 3 and there >= goal  # back toward the goal, never past it
    assert slips > 0.1 * sum(len(c) for *_, c, _ in rows) and backs > 20
    clean = WalkDataModule(train_size=400, val_size=20, test_size=20, teacher_slip_chance=0.0)  # the control
    clean.setup("fit")
    with clean.teacher_view():
        train = clean.splits["train"]
        assert all(all(learned) for *_, learned in walks(clean, train.inputs, train.targets))


class Walker(nn.Module):
    """Walks one cell at a time toward the goal; with ``back=False`` it never walks left (what clean walks teach)."""

    def __init__(self, cells: int, back: bool = True) -> None:
        super().__init__()
        self.cells, self.back, self.anchor = cells, back, nn.Parameter(torch.zeros(()))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = torch.full((*tokens.shape, 2 + 2 * self.cells), -10.0)
        goal = tokens[:, 1] - 1 - self.cells
        here = torch.where(tokens[:, -1] == 2 * self.cells + 1, tokens[:, 0] - 1, tokens[:, -1] - 1)
        after = torch.where(here < goal, here + 1, here - 1 if self.back else here + 1)
        token = torch.where(here == goal, 0, 1 + after.clamp(0, self.cells - 1))
        logits[torch.arange(len(tokens)), -1, token] = 10.0
        return logits + 0 * self.anchor


def test_success_with_slips_counts_walks_that_reach_the_goal_on_the_same_draws_for_every_model(data) -> None:
    walker, forward_only = data.rollouts(Walker(data.cells)), data.rollouts(Walker(data.cells, back=False))
    assert walker["success_q0"] == walker["success_q0.2"] == walker["success"] == 1.0
    assert forward_only["success_q0"] == 1.0 and forward_only["success_q0.2"] < 0.9
    assert data.rollouts(Walker(data.cells, back=False)) == forward_only  # seeded: the same slips every time
    assert set(walker) == {
        "success",
        *(f"{kind}success_q{q}" for kind in ("", "sampled_") for q in ("0", "0.1", "0.2")),
    }


def test_bad_walk_settings_are_one_line() -> None:
    with pytest.raises(KDError, match="a walk over 24 cells has 50 tokens; set data.vocab_size=50"):
        WalkDataModule(vocab_size=64)
    for chances in ((0.0, 1.5), 0.2, ()):
        with pytest.raises(KDError, match=r"must be chances in \[0, 1\)"):
            WalkDataModule(slip_chances=chances)
    with pytest.raises(KDError, match="data.block_size=20 is shorter than the longest walk; set it to 76 or more"):
        WalkDataModule(block_size=20)


def test_the_walk_recipe_writes_each_students_and_the_teachers_success_with_slips(make_cfg, tmp_path) -> None:
    from kd_lightning.run.train import train

    cfg = make_cfg(
        "+recipe=onpolicy_walk",
        "data.train_size=256",
        "data.val_size=32",
        "data.test_size=64",
        "trainer.fast_dev_run=true",
        output_dir=tmp_path / "run",
    )
    results = train(cfg)
    for stage in ("baseline", "distilled", "off_policy", "mixed"):
        assert 0 <= results[stage]["test/success_q0.2"] <= 1 and "test/sampled_success_q0.1" in results[stage]
    assert results["teacher"]["test/success"] == results["teacher"]["test/success_q0.2"]
