"""A worker for tests/test_sharding.py: 3 SGD-with-momentum steps of a DistillationModule on the padded batch of
tests/test_token_accounting.py (or, ``chat``, 8 chat-template conversations of ``./chats`` padded to their longest),
in one process or sharded over two (``trainer=fsdp``'s strategy, gloo), each process taking rows
``rank::processes`` in order; writes the whole student and teacher weights, the last step's whole gradients, the
loss and the bytes the first process holds to OUT.

    python tests/sharded_step.py PROCESSES CHUNK_ROWS|none SHARD_TEACHER(0|1) OUT [SHARD_DTYPE|none [gpt|llama|chat]]
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_token_accounting import LENGTH, VOCAB, RankParts  # noqa: E402

from kd_lightning import DistillationModule, LossMix  # noqa: E402
from kd_lightning.loss.objectives import kd_loss  # noqa: E402
from kd_lightning.models import GPT  # noqa: E402
from kd_lightning.sharding import ShardedStrategy, full_state_dict  # noqa: E402

STEPS = 3
CHAT_LENGTH, CHATS = 128, 8  # tokens per conversation at most; conversations in the batch


class ThreeSteps(RankParts):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(list(super().train_dataloader()) * STEPS, batch_size=None)


class ChatShares(L.LightningDataModule):
    """Each process's rows ``rank::processes`` of the first ``CHATS`` conversations of ``./chats`` (tokenizer
    ``./tok``), cut to its own longest row as ``data=chat`` cuts a batch, three times."""

    def train_dataloader(self) -> DataLoader:
        data = chat_data()
        rows = range(self.trainer.global_rank, CHATS, self.trainer.world_size)
        return DataLoader([data.collate(data.splits["train"].__getitems__(rows))] * STEPS, batch_size=None)


def chat_data() -> "ChatDataModule":  # noqa: F821
    from test_chat import TEMPLATE

    from kd_lightning.data import ChatDataModule

    data = ChatDataModule(
        "chats",
        tokenizer="tok",
        vocab_size=chat_vocabulary(),
        chat_template=TEMPLATE,
        max_length=CHAT_LENGTH,
        group_by_length=False,
    )
    data.setup("fit")
    return data


def chat_vocabulary() -> int:
    from kd_lightning.models.pretrained import pretrained_tokenizer

    return len(pretrained_tokenizer("tok"))


def models(kind: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Student and teacher: the built-in GPT, or tiny transformers Llama models built from a config (``chat``: for
    the tokenizer of ``./tok``)."""
    if kind == "gpt":
        return GPT(VOCAB, LENGTH, 16, 2, 2), GPT(VOCAB, LENGTH, 16, 2, 2)
    from kd_lightning.models import hf_causal_lm

    vocab, length = (chat_vocabulary(), CHAT_LENGTH) if kind == "chat" else (VOCAB, LENGTH)

    def llama() -> torch.nn.Module:
        return hf_causal_lm(
            "llama",
            vocab_size=vocab,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=length,
        )

    return llama(), llama()


def main(
    processes: int,
    chunk_rows: int | None,
    shard_teacher: bool,
    out: Path,
    shard_dtype: str | None = None,
    kind: str = "gpt",
) -> None:
    torch.manual_seed(0)
    student, teacher = models(kind)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    module = DistillationModule(
        student,
        teacher,
        num_classes=student.config.vocab_size if kind == "chat" else VOCAB,
        task="tokens",
        chunk_rows=chunk_rows,
        loss_mix=LossMix(temperature=2.0, alpha=0.5, objective=kd_loss),
        optimizer=partial(torch.optim.SGD, lr=0.5, momentum=0.9),
        shard_teacher=shard_teacher,
        shard_dtype=shard_dtype,
    )
    strategy = ShardedStrategy(data_parallel_size=processes, tensor_parallel_size=1) if processes > 1 else "auto"
    trainer = L.Trainer(
        accelerator="cpu",
        devices=processes,
        strategy=strategy,
        max_steps=STEPS,
        logger=False,
        use_distributed_sampler=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=ChatShares() if kind == "chat" else ThreeSteps(processes, 1))
    weights = {"student": full_state_dict(module.student), "teacher": full_state_dict(module.teacher.model)}
    gradients = {name: whole(p.grad) for name, p in module.student.named_parameters()}  # the last step's, as stepped
    sharded = {
        role: any(type(p).__name__ == "DTensor" for p in model.parameters())
        for role, model in (("student", module.student), ("teacher", module.teacher.model))
    }
    held = {
        "teacher_parameters": local_bytes(module.teacher.model.parameters()),
        "student_parameters": local_bytes(module.student.parameters()),
        "student_gradients": local_bytes(p.grad for p in module.student.parameters() if p.grad is not None),
        "optimizer_state": local_bytes(
            v for state in trainer.optimizers[0].state.values() for v in state.values() if isinstance(v, torch.Tensor)
        ),
    }
    if trainer.global_rank == 0:
        torch.save(
            {
                **{role: {k: v.detach().cpu().clone() for k, v in w.items()} for role, w in weights.items()},
                "gradients": gradients,
                "teacher_before": before,
                "loss": float(trainer.callback_metrics["train/loss"]),
                "sharded": sharded,
                "held": held,
                "dtypes": {p.dtype for p in module.student.parameters()},
            },
            out,
        )


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) gradient gathered whole (every process must call), or the tensor itself."""
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().cpu().clone()


def local_bytes(tensors) -> int:
    """The bytes of this process's part of ``tensors`` (a DTensor's local shard)."""
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in tensors)


if __name__ == "__main__":
    main(
        int(sys.argv[1]),
        None if sys.argv[2] == "none" else int(sys.argv[2]),
        sys.argv[3] == "1",
        Path(sys.argv[4]),
        None if sys.argv[5:6] in ([], ["none"]) else sys.argv[5],
        *sys.argv[6:7],
    )
