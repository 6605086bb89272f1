"""Chunked vs naive large-vocabulary KD loss: peak memory, time and exactness, forward + backward.

    python benchmarks/lm_loss.py [--vocab 32768 --tokens 2048 --hidden 512 --repeats 3 --json]
    python benchmarks/lm_loss.py --device cuda --dtype bf16 --vocab 128256 --tokens 8192 --hidden 4096

naive: full student and teacher logits ``(tokens, V)``, then the objective, then backward.
chunked: :func:`kd_lightning.loss.chunked.chunked_distillation_loss` on the hidden states and heads.
trl (when TRL is installed): TRL's ``ChunkedDivergenceFunction`` (``trl/kernels/chunked_divergence.py``: tiles of
4096 tokens x 32768 vocabulary entries, online log-sum-exp, the logits recomputed in its backward; on CPU its torch
tiles), per-token divergences (``beta`` 0: forward KL, 1: reverse KL, 0.5: JSD) averaged over the kept tokens and
scaled by ``T²`` where the ``kd_lightning`` objective is (``kd``).
All compute the same loss (``--objective`` at ``--temperature``) and gradients for the student's
hidden states and head. Peak memory is the increase over the inputs during one forward + backward,
each variant in a fresh process (CPU: peak resident set size; CUDA: the allocator's peak); times
are medians of ``--repeats`` alternated runs in one process. ``--json`` prints ``peak_mem_ratio``
(chunked / naive), ``time_ratio`` (chunked / naive), ``max_rel_loss_diff`` and ``max_abs_grad_diff`` (chunked
against naive), and with TRL ``vs_trl``: the same four figures of chunked against TRL's function.
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
TRL_BETA = {"kd": 0.0, "reverse_kl": 1.0, "jsd": 0.5}  # TRL's beta for the same divergence (kd alone is T²-scaled)


def has_trl() -> bool:
    try:
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction  # noqa: F401
    except ImportError:
        return False
    return True


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
    elif variant == "trl":
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        per_token, _ = ChunkedDivergenceFunction.apply(
            hidden,
            weight,
            None,
            data["teacher_hidden"],
            data["teacher_weight"],
            None,
            TRL_BETA[args.objective],
            args.temperature,
        )
        kept = data["labels"] != -100
        loss = per_token[kept].sum() / kept.sum() * (args.temperature**2 if args.objective == "kd" else 1.0)
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
    parser.add_argument("--no-trl", action="store_true", help="leave TRL's function out even when it is installed")
    parser.add_argument("--memory-of", choices=["naive", "chunked", "trl"], help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.memory_of:
        print(peak_memory_increase(args.memory_of, args))
        return {}
    shared = [a for a in argv if a != "--json"]
    variants = ("naive", "chunked", "trl") if has_trl() and not args.no_trl else ("naive", "chunked")
    memory = {variant: measured_in_a_fresh_process(variant, shared) for variant in variants}

    data = inputs(args)
    results = {variant: run(variant, data, args) for variant in variants}  # also a warm-up
    times: dict[str, list[float]] = {variant: [] for variant in variants}
    for repeat in range(args.repeats):
        for variant in variants if repeat % 2 == 0 else variants[::-1]:
            synchronize(args.device)
            start = time.perf_counter()
            run(variant, data, args)
            synchronize(args.device)
            times[variant].append(time.perf_counter() - start)
    medians = {v: statistics.median(t) for v, t in times.items()}

    def against(reference: str) -> dict:
        """The chunked loss against ``reference``: memory and time ratios, loss and gradient differences."""
        (loss, *grads), (chunked_loss, *chunked_grads) = results[reference], results["chunked"]
        return {
            "peak_mem_ratio": round(memory["chunked"] / memory[reference], 4) if memory[reference] else None,
            "time_ratio": round(medians["chunked"] / medians[reference], 4),
            "max_rel_loss_diff": float((chunked_loss - loss).abs().div(loss.abs().clamp_min(1e-12)).item()),
            "max_abs_grad_diff": max(float((c.float() - g.float()).abs().max()) for c, g in zip(chunked_grads, grads)),
        }

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
        "time_s": {v: round(t, 4) for v, t in medians.items()},
        **against("naive"),
    }
    if "trl" in variants:
        import trl

        figures["trl"] = trl.__version__
        figures["vs_trl"] = against("trl")
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(
            f"{figures['machine']}, {args.dtype}, {args.objective}: V={args.vocab} tokens={args.tokens} H={args.hidden}"
        )
        for v in variants:
            print(f"  {v:8s} peak +{memory[v] / 2**20:8.1f} MiB   {medians[v]:.3f} s (median of {args.repeats})")
        for reference, f in (("naive", figures), ("TRL", figures.get("vs_trl"))):
            if f is not None:
                print(
                    f"  chunked / {reference}: peak memory {f['peak_mem_ratio'] or float('nan'):.3f}, time {f['time_ratio']:.3f}; "
                    f"loss rel diff {f['max_rel_loss_diff']:.2e}, grad abs diff {f['max_abs_grad_diff']:.2e}"
                )
    return figures


if __name__ == "__main__":
    main()
