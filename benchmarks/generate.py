"""The built-in GPT's cached ``generate()`` against recomputing the whole prefix for every new token.

    python benchmarks/generate.py [--new-tokens 64 --prompt 32 --rows 8 --dim 128 --depth 4 --vocab 2048 --repeats 5]

Both continue the same prompts greedily with the same model (the Shakespeare teacher's shape by default) and must
give the same tokens; times are medians of ``--repeats`` alternated runs in one process. Prints generated tokens per
second of each and the ratio cached / recomputed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kd_lightning.models import GPT  # noqa: E402


def recomputed(model: GPT, prompts: torch.Tensor, new: int) -> torch.Tensor:
    sequence = prompts
    with torch.no_grad():
        for _ in range(new):
            sequence = torch.cat([sequence, model(sequence)[:, -1].argmax(-1, keepdim=True)], 1)
    return sequence


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = GPT(args.vocab, args.prompt + args.new_tokens, args.dim, args.depth, 4).eval()
    prompts = torch.randint(0, args.vocab, (args.rows, args.prompt))
    times: dict[str, list[float]] = {"cached": [], "recomputed": []}
    runs = {
        "cached": lambda: model.generate(prompts, args.new_tokens, greedy=True),
        "recomputed": lambda: recomputed(model, prompts, args.new_tokens),
    }
    made = {name: run() for name, run in runs.items()}  # warm-up, and the two must agree
    if not torch.equal(made["cached"], made["recomputed"]):
        raise SystemExit("the cached generation differs from the recomputed one")
    for repeat in range(args.repeats):
        for name in runs if repeat % 2 == 0 else list(runs)[::-1]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    tokens = args.rows * args.new_tokens
    figures = {name: tokens / statistics.median(seconds) for name, seconds in times.items()}
    result = {
        "machine": f"CPU, {torch.get_num_threads()} threads",
        "new_tokens": args.new_tokens,
        "prompt": args.prompt,
        "rows": args.rows,
        "tokens_per_s": figures,
        "ratio_cached_over_recomputed": figures["cached"] / figures["recomputed"],
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"{result['machine']}; {args.rows} prompts of {args.prompt} tokens, {args.new_tokens} new tokens each, greedy"
    )
    for name, value in figures.items():
        print(f"  {name:<11} {value:9.0f} generated tokens/s")
    print(f"ratio cached / recomputed: {result['ratio_cached_over_recomputed']:.2f}x (same tokens)")


if __name__ == "__main__":
    main()
