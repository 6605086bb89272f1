"""Generation by a sharded student (``trainer=fsdp``): FSDP gathering each block's parameters at every new token,
against gathering the whole student once into an unsharded copy and generating with that.

    python benchmarks/sharded_generation.py [--processes 2 --rows 8 --prompt 32 --new-tokens 64 --dim 256 --depth 4
                                             --vocab 2048 --repeats 5 --json FILE]

Each of ``--processes`` gloo processes (CPU) holds its shard of the same built-in GPT (sharded as kd_lightning
shards a student: per block and at the root) and continues its own ``--rows`` prompts greedily, both ways; the two
must give the same tokens. ``gathered`` is what on-policy sampling does (``generate()`` registered with FSDP, every
process taking every step together); ``copy`` gathers the whole weights (``full_state_dict``) into a model built
once beforehand and generates with no communication. Times are medians of ``--repeats`` alternated rounds on
process 0, the copy's gathering included. Also printed: the bytes each way holds beyond the shard, the root unit
(embeddings and head, gathered for the whole of ``generate()``) and the largest block against the whole model.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kd_lightning.models import GPT  # noqa: E402
from kd_lightning.sharding import blocks, full_state_dict, shard  # noqa: E402


def worker(rank: int, args: argparse.Namespace, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=args.processes)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.processes))
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(0)
    model = GPT(args.vocab, args.prompt + args.new_tokens, args.dim, args.depth, max(1, args.dim // 64))
    whole = copy.deepcopy(model)  # built once: the copy variant refills it with the gathered weights each time
    block_bytes = [sum(p.numel() * p.element_size() for p in unit.parameters()) for unit in blocks(model)]
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    unit_bytes = (
        model_bytes - sum(block_bytes) + max(block_bytes)
    )  # the root (gathered for all of generate()) and a block
    shard(model, init_device_mesh("cpu", (args.processes,)), "student", chunked=False)
    prompts = torch.randint(0, args.vocab, (args.rows, args.prompt), generator=torch.Generator().manual_seed(1 + rank))

    def gathered() -> torch.Tensor:
        return model.generate(prompts, args.new_tokens, greedy=True, synced=True)

    def copied() -> torch.Tensor:
        whole.load_state_dict(full_state_dict(model))
        return whole.generate(prompts, args.new_tokens, greedy=True)

    variants = {"gathered": gathered, "copy": copied}
    made = {name: run() for name, run in variants.items()}  # warm-up, and the same tokens both ways
    assert torch.equal(made["gathered"], made["copy"]), "the two ways generated different tokens"
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, run in variants.items():
            dist.barrier()
            start = time.perf_counter()
            run()
            dist.barrier()
            seconds[name].append(time.perf_counter() - start)
    if rank == 0:
        medians = {name: statistics.median(times) for name, times in seconds.items()}
        tokens = args.processes * args.rows * args.new_tokens
        result = {
            "machine": f"CPU, {args.processes} gloo processes x {torch.get_num_threads()} threads",
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "median_s": medians,
            "tokens_per_s": {name: tokens / s for name, s in medians.items()},
            "extra_bytes": {"gathered": unit_bytes, "copy": model_bytes},
            "seconds": seconds,
        }
        for name in variants:
            print(
                f"{name:>9}: {medians[name]:.3f} s, {tokens / medians[name]:,.0f} tokens/s, "
                f"{result['extra_bytes'][name] / 2**20:.2f} MiB beyond the shard"
            )
        print(f"ratio gathered / copy: {medians['gathered'] / medians['copy']:.2f}")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rows", type=int, default=8, help="prompts per process")
    parser.add_argument("--prompt", type=int, default=32, help="tokens per prompt")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(worker, args=(args, port), nprocs=args.processes, join=True)


if __name__ == "__main__":
    main()
