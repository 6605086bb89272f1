"""A slippery walk, built in: a task where what the teacher knows off the data's path can be rewarded.

A walk goes right along a line of ``cells`` cells, from a start cell to a goal cell, in moves of 1 to 3 cells of
random size (so at each cell several next cells are right and the teacher's distribution is not one-hot). A sequence
is the start, the goal, a separator, then each cell the walk reaches, up to the goal, then the end token; the cells
are learned, the prompt is not.

The students' data holds only clean walks, which never pass the goal. The teacher's (:meth:`teacher_view`, its
stage's training split) also holds slips: with chance ``teacher_slip_chance`` a move is replaced by a random one
(1 to 3 cells right, perhaps past the goal), not learned, followed by the learned moves that come back (left, 1 to 3
cells, never past the goal). At evaluation (:meth:`rollouts`) the environment slips the same way: each move the
model chooses is replaced with chance ``q`` by a random one, from draws seeded by ``data_seed`` and the same for every
model, and a walk succeeds when it reaches the goal within its step budget (a move to a cell that is not 1 to 3 cells
away, or an end token before the goal, fails it). At ``q=0`` a student that walks as the data does always succeeds;
with slips it must come back from where the data never goes, which the teacher knows and teacher forcing never
shows, while the student's own samples (``distill.on_policy``) can lead it there.

Tokens: ``0`` padding and end, ``1 + c`` the cell ``c``, ``1 + cells + g`` the goal ``g``, then the separator.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from kd_lightning.data.batch import IGNORE_INDEX
from kd_lightning.data.memory import InMemoryDataModule
from kd_lightning.errors import KDError, check_integer, is_number

EOS = 0
MOVES = (1, 2, 3)


class WalkDataModule(InMemoryDataModule):
    """Start, goal, separator, the cells reached, end: next-token batches with the walk's cells labelled.

    Args:
        cells: the line's length (at least 12).
        teacher_slip_chance: the chance that a move of the teacher's demonstrations is a slip (0: the teacher sees
            clean walks only, the control).
        slip_chances: the chances ``q`` of a slip at evaluation; ``{split}/success_q{q}`` each, ``{split}/success``
            at the last.
        train_size, val_size, test_size: walks per split (start and goal drawn from ``data_seed``).
        data_seed: seed of the walks and of the evaluation's slips, the same for every run.
        block_size: the models' context, at least a prompt and the longest walk (``4 + 3·cells``).
        vocab_size: ``2 + 2·cells`` tokens (model configs read ``data.vocab_size``).
    """

    task = "tokens"

    def __init__(
        self,
        cells: int = 24,
        teacher_slip_chance: float = 0.2,
        slip_chances: tuple[float, ...] = (0.0, 0.1, 0.2),
        train_size: int = 8000,
        val_size: int = 500,
        test_size: int = 1000,
        data_seed: int = 0,
        block_size: int | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = 256,
        vocab_size: int | None = None,
        num_classes: int | None = None,
        **kwargs,
    ) -> None:
        check_integer("data.cells", cells, 12)
        tokens = 2 + 2 * cells
        for key, value in (("data.vocab_size", vocab_size), ("data.num_classes", num_classes)):
            if value not in (None, tokens):
                raise KDError(f"a walk over {cells} cells has {tokens} tokens; set {key}={tokens}.")
        for key, value in (("data.train_size", train_size), ("data.val_size", val_size), ("data.test_size", test_size)):
            check_integer(key, value)
        listed = isinstance(slip_chances, (list, tuple)) and len(slip_chances) > 0
        chances = [teacher_slip_chance, *(slip_chances if listed else [])]
        if not listed or not all(is_number(q) and 0 <= q < 1 for q in chances):
            raise KDError(
                f"data.teacher_slip_chance and data.slip_chances must be chances in [0, 1), got "
                f"{teacher_slip_chance!r} and {slip_chances!r}; e.g. data.slip_chances=[0,0.1,0.2]."
            )
        width = 4 + 3 * cells
        if block_size is not None and block_size < width:
            raise KDError(f"data.block_size={block_size} is shorter than the longest walk; set it to {width} or more.")
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_classes=tokens, **kwargs)
        self.cells, self.teacher_slip_chance, self.slip_chances = cells, float(teacher_slip_chance), tuple(slip_chances)
        self.sizes, self.data_seed, self.width = (train_size, val_size, test_size), data_seed, width
        self.separator = tokens - 1

    # -- the walks ---------------------------------------------------------------------------------------------

    def ends(self, draw: random.Random) -> tuple[int, int]:
        """A start and a goal, the goal at least 4 cells right of the start and 3 cells short of the line's end (a
        slip may pass it)."""
        start = draw.randrange(0, self.cells - 7)
        return start, draw.randrange(start + 4, self.cells - 3)

    def walk(self, start: int, goal: int, draw: random.Random, slip_chance: float) -> tuple[list[int], list[bool]]:
        """``(the cells reached after the start, whether each was learned)``: moves of 1-3 toward the goal; a slip
        (chance ``slip_chance``) a random move right, not learned. A walk that has not arrived within ``3·cells``
        moves is drawn again (it would not fit the models' context)."""
        cells, learned, here = [], [], start
        while here != goal:
            if len(cells) == 3 * self.cells:
                cells, learned, here = [], [], start
            if draw.random() < slip_chance:
                here, learn = min(here + draw.choice(MOVES), self.cells - 1), False
            elif here < goal:
                here, learn = here + draw.randint(1, min(3, goal - here)), True
            else:  # past the goal: back toward it
                here, learn = here - draw.randint(1, min(3, here - goal)), True
            cells.append(here)
            learned.append(learn)
        return cells, learned

    def encode(self, start: int, goal: int, cells: list[int], learned: list[bool]) -> tuple[list[int], list[int]]:
        """``(inputs, labels)`` of one walk, padded to the split's width."""
        tokens = [1 + start, 1 + self.cells + goal, self.separator, *(1 + c for c in cells), EOS]
        labels = [IGNORE_INDEX] * 2 + [t if keep else IGNORE_INDEX for t, keep in zip(tokens[3:], [*learned, True])]
        pad = self.width + 1 - len(tokens)
        return (tokens + [EOS] * pad)[:-1], (labels + [IGNORE_INDEX] * pad)[: self.width]

    def split_walks(self) -> dict[str, list[tuple[int, int]]]:
        draw = random.Random(self.data_seed)
        return {
            split: [self.ends(draw) for _ in range(size)] for split, size in zip(("train", "val", "test"), self.sizes)
        }

    def load_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        draw = random.Random(self.data_seed + 1)
        splits = {}
        for split, ends in self.split_walks().items():
            rows = [self.encode(s, g, *self.walk(s, g, draw, 0.0)) for s, g in ends]
            splits[split] = (torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows]))
        teacher_draw = random.Random(self.data_seed + 2)
        rows = [
            self.encode(s, g, *self.walk(s, g, teacher_draw, self.teacher_slip_chance))
            for s, g in self.split_walks()["train"]
        ]
        self.teacher_rows = (torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows]))
        # rows as wide as the longest walk of any split (a batch of short walks is not padded to the line's worst case)
        longest = max(
            int((labels != IGNORE_INDEX).nonzero()[:, 1].max()) + 1
            for _, labels in [*splits.values(), self.teacher_rows]
        )
        inputs, labels = self.teacher_rows
        self.teacher_rows = inputs[:, :longest], labels[:, :longest]
        return {split: (inputs[:, :longest], labels[:, :longest]) for split, (inputs, labels) in splits.items()}

    @contextlib.contextmanager
    def teacher_view(self) -> Iterator[None]:
        """Within the block the training split is the teacher's demonstrations: the same walks, with slips."""
        self.setup()
        train = self.splits["train"]
        students = train.inputs, train.targets
        train.inputs, train.targets = self.teacher_rows
        try:
            yield
        finally:
            train.inputs, train.targets = students

    def example_input(self, batch_size: int = 2) -> Tensor:
        return torch.zeros(batch_size, self.width, dtype=torch.long)

    def pad_id(self) -> int:
        return EOS

    # -- evaluation: walks with slips ------------------------------------------------------------------------

    @torch.no_grad()
    def rollouts(self, model: nn.Module, split: str = "test") -> dict[str, float]:
        """``{success_q{q}: the share of the split's walks ``model`` finishes}`` for each ``q`` of ``slip_chances``,
        greedily and sampling at temperature 1 (``sampled_success_q{q}``), and ``success``: greedy at the last ``q``."""
        from kd_lightning.models.outputs import model_logits

        ends = torch.tensor(self.split_walks()[split])
        device = next(model.parameters()).device
        training = model.training
        model.eval()
        results = {}
        try:
            for index, q in enumerate(self.slip_chances):
                for greedy in (True, False):
                    draws = torch.Generator().manual_seed(self.data_seed * 1000 + index)
                    success = self._walk_with_slips(model, model_logits, ends, q, greedy, draws, device)
                    results[f"{'' if greedy else 'sampled_'}success_q{q:g}"] = success
        finally:
            model.train(training)
        results["success"] = results[f"success_q{self.slip_chances[-1]:g}"]
        return results

    def _walk_with_slips(self, model, model_logits, ends: Tensor, q: float, greedy: bool, draws, device) -> float:
        """The share of walks from ``ends`` that reach their goal, each chosen move replaced with chance ``q``."""
        walks, steps = len(ends), 3 * self.cells
        slips = torch.rand(walks, steps, generator=draws) < q
        sizes = torch.randint(1, 4, (walks, steps), generator=draws)
        picks = torch.rand(walks, steps, generator=draws)  # the sampled token's draw (inverse CDF), when sampling
        start, goal = ends[:, 0], ends[:, 1]
        context = torch.stack([1 + start, 1 + self.cells + goal, torch.full_like(start, self.separator)], 1)
        here, done, reached = start.clone(), torch.zeros(walks, dtype=torch.bool), torch.zeros(walks, dtype=torch.bool)
        for step in range(steps):
            logits = model_logits(model, {"inputs": context.to(device)})[:, -1].float().cpu()
            if greedy:
                token = logits.argmax(-1)
            else:
                cumulative = logits.softmax(-1).cumsum(-1)
                token = (cumulative < picks[:, step : step + 1]).sum(-1).clamp(max=logits.shape[-1] - 1)
            chosen = token - 1
            legal = (token >= 1) & (token <= self.cells) & ((chosen - here).abs() >= 1) & ((chosen - here).abs() <= 3)
            slipped = (here + sizes[:, step]).clamp(max=self.cells - 1)
            moved = torch.where(slips[:, step], slipped, chosen)
            failed = ~done & ~legal & ~slips[:, step]
            done |= failed
            here = torch.where(done, here, moved)
            reached |= ~done & (here == goal)
            done |= reached
            context = torch.cat([context, torch.where(done & ~reached, EOS, 1 + here)[:, None]], 1)
            if bool(done.all()) or context.shape[1] >= self.width:
                break
        return float(reached.float().mean())
