"""One normaliser per optimizer step: the same examples give the same loss, logged loss and weights whether they arrive
as one batch or as micro-batches of gradient accumulation, for padded sequences of different lengths, every objective
and the CE term, the plain and the chunked loss. (Two processes: tests/test_distributed.py.)"""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from kd_lightning import DistillationModule, LossMix
from kd_lightning.data.batch import IGNORE_INDEX
from kd_lightning.loss.objectives import jsd_loss, kd_loss, reverse_kl_loss, skew_kl_loss, tvd_loss
from kd_lightning.models import GPT

VOCAB, LENGTH, ROWS = 50, 12, 8


def padded_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """``ROWS`` sequences of 3 to 12 tokens, right-padded; a 'prompt' of 2 tokens and the padding labelled -100, so
    the rows keep between 1 and 10 tokens (short rows first: micro-batches of two rows differ a lot)."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, VOCAB, (ROWS, LENGTH), generator=generator)
    lengths = torch.tensor([3, 4, 5, 7, 8, 10, 11, 12])
    attention = (torch.arange(LENGTH) < lengths[:, None]).long()
    labels = torch.cat([inputs[:, 1:], torch.zeros(ROWS, 1, dtype=torch.long)], 1)
    labels[:, :2] = IGNORE_INDEX
    labels[(torch.arange(LENGTH) >= lengths[:, None] - 1)] = IGNORE_INDEX
    return {"inputs": inputs, "labels": labels, "attention_mask": attention}


class RankParts(L.LightningDataModule):
    """Each process's share of the batch, cut into micro-batches: rows ``rank::processes``, in order (no sampler)."""

    def __init__(self, processes: int, micro_batches: int) -> None:
        super().__init__()
        self.processes, self.micro_batches = processes, micro_batches

    def train_dataloader(self) -> DataLoader:
        batch = padded_batch()
        mine = {name: value[self.trainer.global_rank :: self.processes] for name, value in batch.items()}
        size = len(mine["inputs"]) // self.micro_batches
        return DataLoader(
            [{name: value[i : i + size] for name, value in mine.items()} for i in range(0, len(mine["inputs"]), size)],
            batch_size=None,
        )


def trained(
    micro_batches: int, objective, chunk_rows: int | None, processes: int = 1
) -> tuple[dict[str, torch.Tensor], float]:
    """The student's weights after one SGD step over the batch cut into ``micro_batches`` on each of ``processes``,
    and the logged loss."""
    torch.manual_seed(0)
    student, teacher = GPT(VOCAB, LENGTH, 16, 1, 2), GPT(VOCAB, LENGTH, 16, 1, 2)
    module = DistillationModule(
        student,
        teacher,
        num_classes=VOCAB,
        task="tokens",
        chunk_rows=chunk_rows,
        loss_mix=LossMix(temperature=2.0, alpha=0.5, objective=objective),
        optimizer=partial(torch.optim.SGD, lr=1.0),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=processes,
        strategy="ddp_spawn" if processes > 1 else "auto",
        max_steps=1,
        accumulate_grad_batches=micro_batches,
        logger=False,
        use_distributed_sampler=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=RankParts(processes, micro_batches))
    return {k: v.clone() for k, v in module.student.state_dict().items()}, float(trainer.callback_metrics["train/loss"])


@pytest.mark.parametrize(
    "objective",
    [kd_loss, reverse_kl_loss, partial(jsd_loss, beta=0.3), skew_kl_loss, tvd_loss],
    ids=["kd", "reverse_kl", "jsd", "skew_kl", "tvd"],
)
@pytest.mark.parametrize("chunk_rows", [None, 5], ids=["plain", "chunked"])
def test_accumulated_micro_batches_give_the_one_batch_step(objective, chunk_rows: int | None) -> None:
    whole, whole_loss = trained(1, objective, chunk_rows)
    for micro_batches in (2, 4):
        split, split_loss = trained(micro_batches, objective, chunk_rows)
        assert split_loss == pytest.approx(whole_loss, rel=1e-6)
        for name in whole:
            torch.testing.assert_close(
                split[name], whole[name], atol=1e-6, rtol=1e-6, msg=f"{micro_batches} micro-batches: {name}"
            )


@pytest.mark.slow  # two processes
@pytest.mark.parametrize("chunk_rows", [None, 5], ids=["plain", "chunked"])
def test_two_processes_give_the_one_process_step(chunk_rows: int | None) -> None:
    """Rows 0, 2, 4, 6 on one process and 1, 3, 5, 7 on the other (gloo), alone and with 2 micro-batches each."""
    whole, whole_loss = trained(1, kd_loss, chunk_rows)
    for micro_batches in (1, 2):
        split, split_loss = trained(micro_batches, kd_loss, chunk_rows, processes=2)
        assert split_loss == pytest.approx(whole_loss, rel=1e-6)
        for name in whole:
            torch.testing.assert_close(
                split[name], whole[name], atol=1e-6, rtol=1e-6, msg=f"2 processes x {micro_batches}: {name}"
            )


def test_the_mean_of_micro_batch_means_would_not_be_the_step() -> None:
    """What the test above guards against: the rows keep 1 to 10 tokens, so a mean over the two-row micro-batches'
    means is not the batch's mean (and so its gradient is not the batch's either)."""
    batch = padded_batch()
    kept = (batch["labels"] != IGNORE_INDEX).sum(1).float()
    per_row = torch.rand(ROWS, generator=torch.Generator().manual_seed(1))
    token_mean = (per_row * kept).sum() / kept.sum()
    mean_of_means = torch.stack(
        [(per_row[i : i + 2] * kept[i : i + 2]).sum() / kept[i : i + 2].sum() for i in range(0, ROWS, 2)]
    ).mean()
    assert abs(float(mean_of_means - token_mean)) > 1e-3
