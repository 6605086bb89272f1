"""kd_lightning against TRL's GKDTrainer, side by side: optimizer steps of off-policy token distillation, and of
on-policy distillation (``--on-policy``, also against TRL's stable ``DistillationTrainer``).

    pip install -e ".[lm,trl]"
    python benchmarks/vs_trl.py [--shapes default,large] [--repeats 3] [--steps 6] [--json]
    python benchmarks/vs_trl.py --on-policy [--new-tokens 32] [--repeats 3] [--steps 6] [--json]

Both tools get the same transformers teacher and student (Llamas built from configs, saved to one folder and read
back with ``from_pretrained``), the same batches in the same order (``--rows`` x ``--length`` tokens: a 16-token
prompt, then a completion of varying length, then padding; only the completion is learned), AdamW at lr 1e-4 without
weight decay, schedule or gradient clipping, forward KL at T = 1 and no CE term.

How the two conventions map. TRL (``GKDTrainer`` with ``lmbda=0``: off-policy; ``beta=0``): ``generalized_jsd_loss``
is ``F.kl_div(student_log_probs, teacher_log_probs, log_target=True)``, i.e. KL(teacher ‖ student) per token, summed
over the tokens whose label is not -100 and divided by their number in the step (``num_items_in_batch``); its labels
are the input ids with the prompt and padding set to -100, shifted by one inside ``compute_loss``, and its logits at
temperature 1. kd_lightning: ``distill/loss=kd`` (the same KL per token) at ``T=1`` (so ``T² = 1``), ``alpha=1`` (the CE
term has weight 0 and is not computed), summed over the kept tokens and divided by their number in the step; the
DataModule's labels are already the next tokens, so its batch is ``inputs = ids[:, :-1]``, ``labels = TRL's
labels[:, 1:]``. The two losses are the same number; TRL's models read one position more (the last, whose logits it
drops).

Shapes: ``default`` (V = 2048, teacher 4 x 128, student 2 x 64) and ``large`` (V = 32768, teacher 2 x 256, student
2 x 128), where kd_lightning also runs with its chunked loss in blocks of 512 and of 128 rows (``speed.chunk_rows``;
a block of 128 rows holds 16 MiB of float32 logits at this vocabulary). Each run is a fresh process
(its peak resident memory is its own), the tools alternated (kd, trl, kd, trl, ...); the first step of each run is a
warm-up and not timed. Printed per tool and shape: medians of tokens per second (learned tokens per second of step
time), of the peak resident memory and of its growth during training (over the process after loading the models and
batches), the losses of every step of both tools and their largest relative difference, and the ratios kd / TRL.

``--on-policy`` (the ``default`` shape): every batch's completions are sampled from the current student for its
16-token prompts, ``--new-tokens`` of them at temperature 1 (TRL: ``lmbda=1``, ``temperature=1``, ``max_new_tokens``;
kd_lightning: ``distill.on_policy.fraction=1``, the same ``max_new_tokens``), then one forward KL step on them. The
samples differ (each tool draws its own), so the losses are not compared; printed: seconds per optimizer step,
generated tokens per second of step time, peak memory, and what each tool divides the step's loss by (TRL:
``num_items_in_batch``, counted on the data set's labels before generating; kd_lightning: the generated tokens).
TRL's ``DistillationTrainer`` (fully on-policy, ``beta=0``: forward KL, its chunked divergence over the hidden
states and heads, ``use_vllm`` off) gets the same prompts as text (a ``prompt`` column; the tokenizer as
``processing_class``), ``max_completion_length=--new-tokens`` at temperature 1; it divides by the generated tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    "default": {"vocab": 2048, "teacher": (128, 4), "student": (64, 2)},
    "large": {"vocab": 32768, "teacher": (256, 2), "student": (128, 2)},
}
CHUNKED = {"kd_chunked_512": 512, "kd_chunked_128": 128}  # kd_lightning with the chunked loss, rows per block
PROMPT = 16
LEARNING_RATE = 1e-4


def rss_kib() -> int:
    """This process's resident memory now, KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def save_models(folder: Path, shape: str) -> None:
    """A teacher and a student Llama (fresh weights, seeded) and a word-level tokenizer of ``vocab`` tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    spec = SHAPES[shape]
    for seed, role in enumerate(("teacher", "student")):
        hidden, layers = spec[role]
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=spec["vocab"],
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=512,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        LlamaForCausalLM(config).save_pretrained(folder / role)
    vocab = {f"t{i}": i for i in range(spec["vocab"])}
    words = Tokenizer(models.WordLevel(vocab, unk_token="t3"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words, pad_token="t0", bos_token="t1", eos_token="t2").save_pretrained(
        folder / "tokenizer"
    )


def batches(vocab: int, steps: int, rows: int, length: int) -> list[dict[str, torch.Tensor]]:
    """TRL's batches: ``input_ids``, ``attention_mask``, ``labels`` ``(rows, length + 1)``; prompt and padding -100."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        ids = torch.randint(3, vocab, (rows, length + 1), generator=generator)
        real = torch.randint(length // 2, length + 2, (rows,), generator=generator).clamp_max(length + 1)
        attention = (torch.arange(length + 1) < real[:, None]).long()
        ids = torch.where(attention.bool(), ids, 0)
        labels = torch.where(attention.bool(), ids, -100)
        labels[:, :PROMPT] = -100
        out.append({"input_ids": ids, "attention_mask": attention, "labels": labels})
    return out


def learned(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


class Steps:
    """Step times and losses, recorded by either tool's callback."""

    def __init__(self) -> None:
        self.started, self.seconds, self.losses, self.base_rss = 0.0, [], [], 0
        self.generated, self.divided_by = [], []  # on-policy: tokens sampled into the loss, the loss's divisor

    def begin(self) -> None:
        self.started = time.perf_counter()

    def end(self) -> None:
        self.seconds.append(time.perf_counter() - self.started)


def run_kd(
    folder: Path,
    data: list[dict[str, torch.Tensor]],
    chunk_rows: int | None,
    steps: Steps,
    new_tokens: int | None = None,
) -> None:
    import lightning as L
    from torch.utils.data import DataLoader

    from kd_lightning import DistillationModule, LossMix
    from kd_lightning.loss.objectives import kd_loss
    from kd_lightning.models.pretrained import pretrained_causal_lm

    ours = [
        {"inputs": b["input_ids"][:, :-1], "labels": b["labels"][:, 1:], "attention_mask": b["attention_mask"][:, :-1]}
        for b in data
    ]
    student, teacher = pretrained_causal_lm(str(folder / "student")), pretrained_causal_lm(str(folder / "teacher"))
    sequences = None
    if new_tokens:
        from kd_lightning.sequences import OnPolicy, Sequences

        class Counted(Sequences):
            def __call__(self, *args, **kwargs):
                batch = super().__call__(*args, **kwargs)
                steps.generated.append(int(batch["kept"].sum()))
                steps.divided_by.append(int(batch["kept"].sum()))  # one micro-batch, one process: its generated tokens
                return batch

        sequences = Counted(OnPolicy(fraction=1.0, max_new_tokens=new_tokens), eos_token_id=2, pad_token_id=0)
    module = DistillationModule(
        student,
        teacher,
        num_classes=student.config.vocab_size,
        task="tokens",
        chunk_rows=chunk_rows,
        loss_mix=LossMix(objective=kd_loss, temperature=1.0, alpha=1.0),
        optimizer=partial(torch.optim.AdamW, lr=LEARNING_RATE, weight_decay=0.0),
        sequences=sequences,
    )

    class Timer(L.Callback):
        def on_train_batch_start(self, *args) -> None:
            steps.begin()

        def on_train_batch_end(self, trainer, module, outputs, *args) -> None:
            steps.end()
            steps.losses.append(float(outputs["loss"]))

    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=len(ours),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[Timer()],
    )
    steps.base_rss = rss_kib()
    trainer.fit(module, train_dataloaders=DataLoader(ours, batch_size=None))


def trl_training(rows: int, steps: int) -> dict:
    """The training arguments both TRL trainers get: the same optimizer, steps and batch as kd_lightning's run, on the
    CPU, nothing saved or logged."""
    return {
        "use_cpu": True,
        "bf16": False,
        "report_to": [],
        "per_device_train_batch_size": rows,
        "max_steps": steps,
        "learning_rate": LEARNING_RATE,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 0.0,
        "optim": "adamw_torch",
        "save_strategy": "no",
        "logging_strategy": "no",
        "seed": 0,
        "disable_tqdm": True,
    }


def trl_timer(steps: Steps):  # noqa: ANN201
    """A transformers callback that times each optimizer step into ``steps``."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_begin(self, *args, **kwargs) -> None:
            steps.begin()

        def on_step_end(self, *args, **kwargs) -> None:
            steps.end()

    return Timer()


def run_trl(
    folder: Path, data: list[dict[str, torch.Tensor]], steps: Steps, output: Path, new_tokens: int | None = None
) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    rows = len(data[0]["input_ids"])
    examples = [{name: tensor[i].tolist() for name, tensor in batch.items()} for batch in data for i in range(rows)]

    def collate(features: list[dict]) -> dict[str, torch.Tensor]:
        batch = {name: torch.tensor([f[name] for f in features]) for name in ("input_ids", "attention_mask", "labels")}
        batch["prompts"], batch["prompt_attention_mask"] = (
            batch["input_ids"][:, :PROMPT],
            batch["attention_mask"][:, :PROMPT],
        )
        return batch

    on_policy = {"lmbda": 1.0, "max_new_tokens": new_tokens, "temperature": 1.0} if new_tokens else {"lmbda": 0.0}
    config = GKDConfig(
        output_dir=str(output),
        beta=0.0,
        seq_kd=False,
        **on_policy,
        **trl_training(rows, len(data)),
        train_sampling_strategy="sequential",
        remove_unused_columns=False,
        dataloader_drop_last=True,
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    trainer = GKDTrainer(
        model=AutoModelForCausalLM.from_pretrained(folder / "student"),
        teacher_model=AutoModelForCausalLM.from_pretrained(folder / "teacher"),
        args=config,
        train_dataset=Dataset.from_list(examples),
        data_collator=collate,
        processing_class=AutoTokenizer.from_pretrained(folder / "tokenizer"),
        callbacks=[trl_timer(steps)],
    )
    compute_loss, generate = trainer.compute_loss, trainer.generate_on_policy_outputs

    def recorded(*args, **kwargs):
        loss = compute_loss(*args, **kwargs)
        steps.losses.append(float(loss))
        if kwargs.get("num_items_in_batch") is not None:
            steps.divided_by.append(int(kwargs["num_items_in_batch"]))
        return loss

    def generated(*args, **kwargs):
        ids, mask, labels = generate(*args, **kwargs)
        steps.generated.append(int((labels[:, 1:] != -100).sum()))
        return ids, mask, labels

    trainer.compute_loss, trainer.generate_on_policy_outputs = recorded, generated
    steps.base_rss = rss_kib()
    trainer.train()


def run_trl_distillation(
    folder: Path, data: list[dict[str, torch.Tensor]], steps: Steps, output: Path, new_tokens: int
) -> None:
    """TRL's stable ``DistillationTrainer`` (fully on-policy; its chunked divergence over hidden states and heads):
    the same prompts as text, the tokenizer as ``processing_class``."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DistillationConfig, DistillationTrainer

    rows = len(data[0]["input_ids"])
    prompts = [" ".join(f"t{i}" for i in b["input_ids"][row, :PROMPT].tolist()) for b in data for row in range(rows)]

    config = DistillationConfig(
        output_dir=str(output),
        gradient_checkpointing=False,
        beta=0.0,
        temperature=1.0,
        max_completion_length=new_tokens,
        **trl_training(rows, len(data)),
        shuffle_dataset=False,
    )
    trainer = DistillationTrainer(
        model=AutoModelForCausalLM.from_pretrained(folder / "student"),
        teacher_model=AutoModelForCausalLM.from_pretrained(folder / "teacher"),
        args=config,
        train_dataset=Dataset.from_list([{"prompt": prompt} for prompt in prompts]),
        processing_class=AutoTokenizer.from_pretrained(folder / "tokenizer"),
        callbacks=[trl_timer(steps)],
    )
    compute_loss, generate = trainer.compute_loss, trainer._generate_and_score_completions

    def recorded(*args, **kwargs):
        loss = compute_loss(*args, **kwargs)
        steps.losses.append(float(loss))
        return loss

    def generated(*args, **kwargs):
        made = generate(*args, **kwargs)
        steps.generated.append(int(made["completion_mask"].sum()))
        steps.divided_by.append(int(made["num_items_in_batch"]))
        return made

    trainer.compute_loss, trainer._generate_and_score_completions = recorded, generated
    steps.base_rss = rss_kib()
    trainer.train()


def worker(args: argparse.Namespace) -> None:
    """One run of one tool; prints its figures as JSON."""
    torch.set_num_threads(args.threads)
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning", "transformers", "trl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    folder = Path(args.folder)
    data = batches(SHAPES[args.shape]["vocab"], args.steps, args.rows, args.length)
    steps = Steps()
    if args.worker == "trl":
        with tempfile.TemporaryDirectory() as output:
            run_trl(folder, data, steps, Path(output), args.new_tokens)
    elif args.worker == "trl_distillation":
        with tempfile.TemporaryDirectory() as output:
            run_trl_distillation(folder, data, steps, Path(output), args.new_tokens)
    else:
        run_kd(folder, data, CHUNKED.get(args.worker), steps, args.new_tokens)
    timed = steps.seconds[1:]
    tokens = steps.generated[1:] if args.new_tokens else [learned(batch) for batch in data[1:]]
    print(
        json.dumps(
            {
                "tokens_per_s": sum(tokens) / sum(timed),
                "step_s": statistics.median(timed),
                "peak_rss_mib": peak_rss_kib() / 1024,
                "growth_mib": (peak_rss_kib() - steps.base_rss) / 1024,
                "losses": steps.losses,
                "generated": steps.generated,
                "divided_by": steps.divided_by,
            }
        )
    )


def one_run(tool: str, shape: str, folder: Path, args: argparse.Namespace) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        tool,
        "--shape",
        shape,
        "--folder",
        str(folder),
        "--steps",
        str(args.steps),
        "--rows",
        str(args.rows),
        "--length",
        str(args.length),
        "--threads",
        str(args.threads),
    ] + (["--new-tokens", str(args.new_tokens)] if args.new_tokens else [])
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{tool} ({shape}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(args: argparse.Namespace) -> dict:
    results: dict = {
        "machine": f"CPU, {args.threads} threads",
        "torch": torch.__version__,
        "rows": args.rows,
        "length": args.length,
        "steps": args.steps,
        "repeats": args.repeats,
        "shapes": {},
        "on_policy_new_tokens": args.new_tokens,
    }
    try:
        import transformers
        import trl

        results["transformers"], results["trl"] = transformers.__version__, trl.__version__
    except ImportError:
        raise SystemExit("benchmarks/vs_trl.py needs TRL: pip install -e '.[lm,trl]'") from None
    for shape in args.shapes.split(","):
        tools = ["kd", "trl"] + (["trl_distillation"] if args.new_tokens else list(CHUNKED) if shape == "large" else [])
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            save_models(folder, shape)
            runs: dict[str, list[dict]] = {tool: [] for tool in tools}
            for repeat in range(args.repeats):
                for tool in tools if repeat % 2 == 0 else tools[::-1]:
                    runs[tool].append(one_run(tool, shape, folder, args))
        figures = {
            tool: {
                key: statistics.median(run[key] for run in done)
                for key in ("tokens_per_s", "step_s", "peak_rss_mib", "growth_mib")
            }
            for tool, done in runs.items()
        }
        trl_losses = runs["trl"][0]["losses"]
        for tool in tools:
            figures[tool]["losses"] = runs[tool][0]["losses"]
            figures[tool]["generated"], figures[tool]["divided_by"] = (
                runs[tool][0]["generated"],
                runs[tool][0]["divided_by"],
            )
            if tool == "kd" and args.new_tokens:  # each tool's own samples: no loss to compare
                for theirs, suffix in (("trl", "vs_trl"), ("trl_distillation", "vs_trl_distillation")):
                    figures[tool][f"step_s_ratio_{suffix}"] = figures[tool]["step_s"] / figures[theirs]["step_s"]
                    figures[tool][f"tokens_per_s_ratio_{suffix}"] = (
                        figures[tool]["tokens_per_s"] / figures[theirs]["tokens_per_s"]
                    )
                    figures[tool][f"peak_rss_ratio_{suffix}"] = (
                        figures[tool]["peak_rss_mib"] / figures[theirs]["peak_rss_mib"]
                    )
            elif not tool.startswith("trl") and not args.new_tokens:
                theirs = trl_losses
                figures[tool]["max_rel_loss_diff_vs_trl"] = max(
                    abs(a - b) / abs(b) for a, b in zip(runs[tool][0]["losses"], theirs)
                )
                figures[tool]["tokens_per_s_ratio_vs_trl"] = (
                    figures[tool]["tokens_per_s"] / figures["trl"]["tokens_per_s"]
                )
                figures[tool]["peak_rss_ratio_vs_trl"] = figures[tool]["peak_rss_mib"] / figures["trl"]["peak_rss_mib"]
                figures[tool]["growth_ratio_vs_trl"] = figures[tool]["growth_mib"] / figures["trl"]["growth_mib"]
        results["shapes"][shape] = {
            "vocab": SHAPES[shape]["vocab"],
            "teacher": SHAPES[shape]["teacher"],
            "student": SHAPES[shape]["student"],
            **figures,
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="default,large", help="comma-separated: default, large")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each tool per shape, alternated")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is not timed)")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument(
        "--on-policy", action="store_true", help="on-policy steps: completions sampled from the student"
    )
    parser.add_argument("--new-tokens", type=int, default=None, help="with --on-policy: tokens sampled per prompt (32)")
    parser.add_argument("--worker", choices=["kd", "trl", "trl_distillation", *CHUNKED], help=argparse.SUPPRESS)
    parser.add_argument("--shape", choices=sorted(SHAPES), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.on_policy and not args.new_tokens:
        args.new_tokens = 32
    if args.on_policy and args.shapes == parser.get_default("shapes"):
        args.shapes = "default"
    if args.worker:
        worker(args)
        return
    results = compare(args)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(
        f"{results['machine']}, torch {results['torch']}, transformers {results['transformers']}, trl {results['trl']}; "
        f"{args.rows} x {args.length} tokens, {args.steps} steps, medians of {args.repeats} runs"
    )
    if args.new_tokens:
        print(
            f"on-policy: {args.rows} prompts of {PROMPT} tokens, {args.new_tokens} tokens sampled from the student each step"
        )
        for tool in ("kd", "trl", "trl_distillation"):
            f = results["shapes"]["default"][tool]
            print(
                f"  {tool:<16} {f['step_s']:6.3f} s/step  {f['tokens_per_s']:7.0f} generated tokens/s  peak "
                f"{f['peak_rss_mib']:6.0f} MiB  loss divided by {f['divided_by'][:4]} for generated {f['generated'][:4]}"
            )
        f = results["shapes"]["default"]["kd"]
        for theirs, suffix in (("GKDTrainer", "vs_trl"), ("DistillationTrainer", "vs_trl_distillation")):
            print(
                f"  kd vs TRL's {theirs}: {f[f'step_s_ratio_{suffix}']:.2f}x step time, "
                f"{f[f'tokens_per_s_ratio_{suffix}']:.2f}x generated tokens/s, {f[f'peak_rss_ratio_{suffix}']:.2f}x peak"
            )
        return
    for shape, figures in results["shapes"].items():
        print(f"\n{shape}: V={figures['vocab']}, teacher {figures['teacher']}, student {figures['student']}")
        for tool in ("kd", *CHUNKED, "trl"):
            if tool in figures:
                f = figures[tool]
                extra = (
                    f"  ratio vs TRL: {f['tokens_per_s_ratio_vs_trl']:.2f}x tokens/s, {f['peak_rss_ratio_vs_trl']:.2f}x peak, "
                    f"{f['growth_ratio_vs_trl']:.2f}x growth; losses agree to {f['max_rel_loss_diff_vs_trl']:.1e}"
                    if tool != "trl"
                    else ""
                )
                print(
                    f"  {tool:<14} {f['tokens_per_s']:9.0f} tokens/s  {f['step_s'] * 1000:7.1f} ms/step  "
                    f"peak {f['peak_rss_mib']:7.0f} MiB  growth {f['growth_mib']:6.0f} MiB{extra}"
                )


if __name__ == "__main__":
    main()
