"""On-policy sampling per micro-batch against one call per optimizer step (``speed.generate_per_step``).

    python benchmarks/generation_buffer.py [--micro-batches 2 4 8 --batch 16 --new-tokens 24 --dim 16 --depth 1
                                            --steps 6 --repeats 3 --json]

On the slippery walk (``data=walk``) with the students of ``+recipe=onpolicy_walk`` (GPT, width ``--dim``, ``--depth``
blocks; the teacher 64 x 2), an optimizer step of ``k`` micro-batches of ``--batch`` prompts each:

- generation: the step's completions sampled (temperature 2, as the recipe) by ``k`` calls of ``--batch`` rows, or
  by one call of ``k x --batch`` rows; generated tokens per second (the completions' tokens up to their end);
- training: ``--steps`` optimizer steps of on-policy distillation (``fraction=1``, forward KL) through a Lightning
  ``Trainer`` with ``accumulate_grad_batches=k``, the data served per micro-batch or with the whole step; seconds per
  optimizer step.

The students are untrained, so most completions run to ``--new-tokens``. Times are medians of ``--repeats``
alternated rounds in one process.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kd_lightning import DistillationModule, LossMix  # noqa: E402
from kd_lightning.data.batch import as_batch  # noqa: E402
from kd_lightning.data.walk import WalkDataModule  # noqa: E402
from kd_lightning.models import GPT  # noqa: E402
from kd_lightning.progress import lightning_hushed  # noqa: E402
from kd_lightning.sequences import OnPolicy, Sequences, token_ids  # noqa: E402

CONTEXT = 76  # the models' context in conf/data/walk.yaml (block_size)


def generation_time(sequences: Sequences, student: GPT, batches: list, together: bool) -> tuple[float, int]:
    """Seconds to complete one optimizer step's ``batches``, and the completion tokens made."""
    start = time.perf_counter()
    if together:
        made = [
            sequences({**batch, "step_batches": batches, "step_position": i}, student, None, 0, i)
            for i, batch in enumerate(batches)
        ]
    else:
        made = [sequences(dict(batch), student, None, 0, i) for i, batch in enumerate(batches)]
    seconds = time.perf_counter() - start
    sequences.buffered_key = None  # the next round samples afresh
    return seconds, sum(int(batch["kept"].sum()) for batch in made)


def training_time(data: WalkDataModule, args: argparse.Namespace, micro_batches: int, together: bool) -> float:
    """Seconds per optimizer step of on-policy distillation, the data served per micro-batch or per step."""
    import lightning as L

    L.seed_everything(0, verbose=False)
    teacher = GPT(data.num_classes, CONTEXT, 64, 2, 4)
    student = GPT(data.num_classes, CONTEXT, args.dim, args.depth, max(1, args.dim // 8))
    on_policy = OnPolicy(fraction=1.0, max_new_tokens=args.new_tokens, temperature=2.0)
    module = DistillationModule(
        student,
        teacher,
        num_classes=data.num_classes,
        loss_mix=LossMix(alpha=1.0, temperature=1.0),
        task="tokens",
        sequences=Sequences(on_policy, *token_ids(data)),
    )
    data.serve_steps = together
    with lightning_hushed():
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=args.steps + 1,
            accumulate_grad_batches=micro_batches,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
        )
    times: list[float] = []

    class StepClock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            if batch_idx % micro_batches == 0:
                times.append(time.perf_counter())

    trainer.callbacks.append(StepClock())
    with lightning_hushed():
        trainer.fit(module, datamodule=data)
    return statistics.median(later - earlier for earlier, later in zip(times[1:], times[2:]))  # the first warms up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    data = WalkDataModule(train_size=2048, val_size=64, test_size=64, batch_size=args.batch)
    data.setup()
    torch.manual_seed(0)
    student = GPT(data.num_classes, CONTEXT, args.dim, args.depth, max(1, args.dim // 8))
    sequences = Sequences(OnPolicy(fraction=1.0, max_new_tokens=args.new_tokens, temperature=2.0), *token_ids(data))
    train = data.splits["train"]
    rows: list[dict] = []
    for k in args.micro_batches:
        batches = [as_batch(train.__getitems__(range(i * args.batch, (i + 1) * args.batch))) for i in range(k)]
        generation: dict[str, list[tuple[float, int]]] = {"per micro-batch": [], "per step": []}
        training: dict[str, list[float]] = {"per micro-batch": [], "per step": []}
        for repeat in range(args.repeats):
            for name in generation if repeat % 2 == 0 else list(generation)[::-1]:
                generation[name].append(generation_time(sequences, student, batches, name == "per step"))
                training[name].append(training_time(data, args, k, name == "per step"))
        row = {"micro_batches": k, "rows_per_step": k * args.batch}
        for name in generation:
            row[f"tokens_per_s {name}"] = statistics.median(tokens / seconds for seconds, tokens in generation[name])
            row[f"s_per_step {name}"] = statistics.median(training[name])
        row["generation_ratio"] = row["tokens_per_s per step"] / row["tokens_per_s per micro-batch"]
        row["step_time_ratio"] = row["s_per_step per step"] / row["s_per_step per micro-batch"]
        rows.append(row)
    result = {
        "machine": f"CPU, {torch.get_num_threads()} threads",
        "student": f"GPT width {args.dim}, {args.depth} block(s)",
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "rows": rows,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"{result['machine']}; {result['student']}; micro-batches of {args.batch} walks, up to {args.new_tokens} new "
        f"tokens at temperature 2; medians of {args.repeats} alternated rounds"
    )
    print(
        f"{'k':>3} {'tokens/s per micro-batch':>25} {'per step':>9} {'ratio':>6}   {'s/step per micro-batch':>23} "
        f"{'per step':>9} {'ratio':>6}"
    )
    for row in rows:
        print(
            f"{row['micro_batches']:>3} {row['tokens_per_s per micro-batch']:>25.0f} {row['tokens_per_s per step']:>9.0f} "
            f"{row['generation_ratio']:>5.2f}x   {row['s_per_step per micro-batch']:>23.3f} "
            f"{row['s_per_step per step']:>9.3f} {row['step_time_ratio']:>5.2f}x"
        )


if __name__ == "__main__":
    main()
