"""Chunked vs naive large-vocabulary KD loss: peak memory, time and exactness, forward + backward.

    python benchmarks/lm_loss.py [--vocab 32768 --tokens 2048 --hidden 512 --repeats 3 --json]
    python benchmarks/lm_loss.py --device cuda --dtype bf16 --vocab 128256 --tokens 8192 --hidden 4096

naive: full student and teacher logits ``(tokens, V)``, then the objective, then backward.
chunked: :func:`kd_lightning.loss.chunked.chunked_distillation_loss` on the hidden states and heads.
Both compute the same loss (``--objective`` at ``--temperature``) and gradients for the student's
hidden states and head. Peak memory is the increase over the inputs during one forward + backward,
each variant in a fresh process (CPU: peak resident set size; CUDA: the allocator's peak); times
are medians of ``--repeats`` alternated runs in one process. ``--json`` prints ``peak_mem_ratio``
(chunked / naive), ``time_ratio`` (chunked / naive), ``max_rel_loss_diff`` and ``max_abs_grad_diff``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from synthetic import machine, synchronize  # noqa: E402

from kd_lightning.loss.chunked import chunked_distillation_loss  # noqa: E402
from kd_lightning.loss.objectives import jsd_loss, kd_loss, reverse_kl_loss  # noqa: E402

OBJECTIVES = {"kd": kd_loss, "reverse_kl": reverse_kl_loss, "jsd": partial(jsd_loss, beta=0.5)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def inputs(args: argparse.Namespace) -> dict:
    """Student and teacher hidden states and heads, labels with 10% ignored tokens."""
    g = torch.Generator().manual_seed(0)
    dtype, device = DTYPES[args.dtype], args.device

    def make(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    labels = torch.randint(0, args.vocab, (args.tokens,), generator=g)
    labels[torch.rand(args.tokens, generator=g) < 0.1] = -100
    return {
        "hidden": make(args.tokens, args.hidden),
        "weight": make(args.vocab, args.hidden, scale=args.hidden**-0.5),
        "teacher_hidden": make(args.tokens, args.hidden),
        "teacher_weight": make(args.vocab, args.hidden, scale=args.hidden**-0.5),
        "labels": labels.to(device),
    }


def run(variant: str, data: dict, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward + backward; returns the loss and the gradients of the hidden states and the head."""
    hidden = data["hidden"].detach().requires_grad_(True)
    weight = data["weight"].detach().requires_grad_(True)
    objective = OBJECTIVES[args.objective]
    if variant == "naive":
        with torch.no_grad():
            teacher_logits = nn.functional.linear(data["teacher_hidden"], data["teacher_weight"])
        loss = objective(
            nn.functional.linear(hidden, weight),
            teacher_logits,
            args.temperature,
            labels=data["labels"],
            ignore_index=-100,
        )
    else:
        loss = chunked_distillation_loss(
            hidden,
            weight,
            data["teacher_hidden"],
            data["teacher_weight"],
            objective=objective,
            temperature=args.temperature,
            labels=data["labels"],
            chunk_rows=args.chunk_rows,
        )
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def peak_memory_increase(variant: str, args: argparse.Namespace) -> int:
    """Bytes by which one forward + backward of ``variant`` raises the peak over the inputs (this process)."""
    data = inputs(args)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run(variant, data, args)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run(variant, data, args)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024  # ru_maxrss is in KiB on Linux


def measured_in_a_fresh_process(variant: str, argv: list[str]) -> int:
    out = subprocess.run(
        [sys.executable, __file__, *argv, "--memory-of", variant], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--tokens", type=int, default=2048, help="N·L, the flattened batch")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--objective", choices=sorted(OBJECTIVES), default="kd")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--chunk-rows", type=int, default=None, help="tokens per block (default: the library's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--memory-of", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.memory_of:
        print(peak_memory_increase(args.memory_of, args))
        return {}
    shared = [a for a in argv if a != "--json"]
    memory = {variant: measured_in_a_fresh_process(variant, shared) for variant in ("naive", "chunked")}

    data = inputs(args)
    results = {variant: run(variant, data, args) for variant in ("naive", "chunked")}  # also a warm-up
    times: dict[str, list[float]] = {"naive": [], "chunked": []}
    for repeat in range(args.repeats):
        for variant in ("naive", "chunked") if repeat % 2 == 0 else ("chunked", "naive"):
            synchronize(args.device)
            start = time.perf_counter()
            run(variant, data, args)
            synchronize(args.device)
            times[variant].append(time.perf_counter() - start)
    (loss, *grads), (chunked_loss, *chunked_grads) = results["naive"], results["chunked"]
    medians = {v: statistics.median(t) for v, t in times.items()}
    figures = {
        "machine": machine(args.device),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "objective": args.objective,
        "vocab": args.vocab,
        "tokens": args.tokens,
        "hidden": args.hidden,
        "repeats": args.repeats,
        "peak_mem_bytes": memory,
        "peak_mem_ratio": round(memory["chunked"] / memory["naive"], 4),
        "time_s": {v: round(t, 4) for v, t in medians.items()},
        "time_ratio": round(medians["chunked"] / medians["naive"], 4),
        "max_rel_loss_diff": float((chunked_loss - loss).abs().div(loss.abs().clamp_min(1e-12)).item()),
        "max_abs_grad_diff": max(float((c.float() - g.float()).abs().max()) for c, g in zip(chunked_grads, grads)),
    }
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(
            f"{figures['machine']}, {args.dtype}, {args.objective}: V={args.vocab} tokens={args.tokens} H={args.hidden}"
        )
        for v in ("naive", "chunked"):
            print(f"  {v:8s} peak +{memory[v] / 2**20:8.1f} MiB   {medians[v]:.3f} s (median of {args.repeats})")
        print(
            f"  peak memory chunked / naive {figures['peak_mem_ratio']:.3f}, time {figures['time_ratio']:.3f}; "
            f"loss rel diff {figures['max_rel_loss_diff']:.2e}, grad abs diff {figures['max_abs_grad_diff']:.2e}"
        )
    return figures


if __name__ == "__main__":
    main()
