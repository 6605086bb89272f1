"""trainer=fsdp: FSDP2 through Lightning's ModelParallelStrategy, on CPU with gloo. Two processes sharding the student
(and the teacher, or a whole teacher on each) train the weights one process trains on the same global batch; the
teacher never changes; the command line runs every stage sharded; the settings are checked before anything runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kd_lightning import KDError
from kd_lightning.memory import device_memory
from kd_lightning.models import GPT

from test_cli import run_cli
from sharded_step import LENGTH, models

WORKER = Path(__file__).resolve().parent / "sharded_step.py"


def step(tmp_path: Path, processes: int, chunk_rows: int | None, shard_teacher: bool, dtype: str = "none",
         kind: str = "gpt") -> dict:
    out = tmp_path / f"{processes}-{chunk_rows}-{int(shard_teacher)}-{dtype}-{kind}.pt"
    done = subprocess.run([sys.executable, str(WORKER), str(processes), str(chunk_rows or "none"), str(int(shard_teacher)), str(out),
                           dtype, kind],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out, weights_only=False)


@pytest.mark.slow  # two processes
@pytest.mark.parametrize("kind, chunk_rows, shard_teacher", [
    ("gpt", None, True), ("gpt", 5, True), ("gpt", None, False), ("gpt", 5, False), ("llama", None, True), ("llama", 5, True),
], ids=["gpt-plain-teacher_sharded", "gpt-chunked-teacher_sharded", "gpt-plain-teacher_whole", "gpt-chunked-teacher_whole",
        "llama-plain-teacher_sharded", "llama-chunked-teacher_sharded"])
def test_two_sharded_processes_train_the_one_process_weights(tmp_path: Path, kind: str, chunk_rows: int | None,
                                                             shard_teacher: bool) -> None:
    """The built-in GPT and a transformers Llama built from a config; the chunked loss of a sharded Llama reads its
    hidden states through the root method kd_lightning.sharding gives it."""
    one, two = step(tmp_path, 1, chunk_rows, shard_teacher, kind=kind), step(tmp_path, 2, chunk_rows, shard_teacher, kind=kind)
    assert two["sharded"] == {"student": True, "teacher": shard_teacher} and one["sharded"] == {"student": False, "teacher": False}
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    for name in one["student"]:  # 3 SGD-with-momentum steps on padded sequences of 1-10 learned tokens
        torch.testing.assert_close(two["student"][name], one["student"][name], atol=1e-6, rtol=1e-6, msg=name)
    for run in (one, two):
        assert all(torch.equal(run["teacher"][k], run["teacher_before"][k]) for k in run["teacher_before"])
    assert any(not torch.equal(one["student"][k], one["teacher_before"][k]) for k in one["student"])  # it did train
    # what a process holds is what the memory calculator says, and about half of what one process holds
    with torch.device("meta"):
        student, teacher = models(kind)
    for run, processes in ((one, 1), (two, 2)):
        calculated = device_memory(teacher, student, processes=processes, sharded=processes > 1, shard_teacher=shard_teacher,
                                   optimizer_states_per_parameter=1, batch_size=4, length=LENGTH)
        assert run["held"] == {k: getattr(calculated, k) for k in run["held"]}
    for name in ("student_parameters", "student_gradients", "optimizer_state") + (("teacher_parameters",) if shard_teacher else ()):
        assert two["held"][name] == pytest.approx(one["held"][name] / 2, rel=0.05)


@pytest.mark.slow  # two processes, twice
def test_sharded_parameters_gathered_in_bfloat16_train_close_to_float32_and_stay_float32(tmp_path: Path) -> None:
    full, mixed = step(tmp_path, 2, None, True), step(tmp_path, 2, None, True, dtype="bfloat16")
    assert mixed["dtypes"] == {torch.float32} and mixed["held"] == full["held"]  # the shards and optimizer state
    differences = [(mixed["student"][k] - full["student"][k]).abs().max().item() for k in full["student"]]
    assert 0 < max(differences) < 1e-2  # computed in bfloat16 (float32 would agree to 1e-6), and close
    assert mixed["loss"] == pytest.approx(full["loss"], rel=1e-2)
    assert all(torch.equal(mixed["teacher"][k], mixed["teacher_before"][k]) for k in mixed["teacher_before"])


TINY = ["data=arithmetic", "data.train_size=256", "data.val_size=32", "data.test_size=32",
        "data.eval_batch_size=16", "teacher=gpt_teacher", "teacher.model.dim=16", "teacher.model.depth=2", "teacher.model.heads=2",
        "student=gpt_student", "student.model.dim=16", "student.model.depth=1", "teacher.fit.max_epochs=1",
        "trainer.max_epochs=2", "distill.alpha=1", "distill.temperature=1"]
SHARDED = [*TINY, "trainer=fsdp", "data.batch_size=16"]  # 2 processes x 16 rows


def numbers(results: dict) -> dict[str, float]:
    """A run's metrics, less the ones of drawn samples (drawn per batch, so per split of the batch) and timings."""
    return {f"{stage}/{name}": value for stage, metrics in results.items() if isinstance(metrics, dict)
            for name, value in metrics.items() if isinstance(value, (int, float)) and "sample_" not in name}


CRASH = ["+callbacks.crash._target_=crash_callback.CrashAtStep", "+callbacks.crash.stage=distilled", "+callbacks.crash.step=12"]


@pytest.mark.slow  # two processes, three stages, five runs
def test_every_stage_runs_sharded_from_the_command_line_equal_to_one_process_and_resumes(tmp_path: Path) -> None:
    sharded = run_cli(tmp_path, *SHARDED, "hydra.run.dir=two")
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert sharded.stdout.count("student distilled") == 1  # one summary, from rank 0
    results = json.loads((tmp_path / "two" / "metrics.json").read_text())
    for stage in ("teacher", "distilled", "baseline"):
        assert 0 <= results[stage]["test/exact_match"] <= 1
    # the same global batches in one process: the same teacher, students and metrics
    single = run_cli(tmp_path, *TINY, "data.batch_size=32", "hydra.run.dir=one", env={"KD_LIGHTNING_CACHE": str(tmp_path / "own")})
    assert single.returncode == 0, single.stderr[-3000:]
    expected = numbers(json.loads((tmp_path / "one" / "metrics.json").read_text()))
    assert len(expected) > 30 and numbers(results) == pytest.approx(expected, rel=1e-5, abs=1e-6)

    # one consolidated checkpoint per stage, the student's whole weights: it loads into a plain model
    state = torch.load(tmp_path / "two" / "distilled" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert not any(k.startswith("teacher.") for k in state["state_dict"])
    GPT(14, 16, 16, 1, 2).load_state_dict({k.removeprefix("student."): v for k, v in state["state_dict"].items()})

    # killed in the distilled stage's second epoch, rerun with ckpt_path=last: the uninterrupted run's weights
    env = {"PYTHONPATH": str(Path(__file__).resolve().parent)}
    killed = run_cli(tmp_path, *SHARDED, "hydra.run.dir=killed", *CRASH, env=env)
    assert killed.returncode != 0 and "simulated pre-emption at step 12" in killed.stderr
    resumed = run_cli(tmp_path, *SHARDED, "hydra.run.dir=killed", "ckpt_path=last", "changed_on_resume=[callbacks.crash]", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = torch.load(tmp_path / "killed" / "distilled" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    for name, value in state["state_dict"].items():
        torch.testing.assert_close(after["state_dict"][name], value, rtol=0, atol=0, msg=name)
    assert numbers(json.loads((tmp_path / "killed" / "metrics.json").read_text())) == numbers(results)

    (tmp_path / "two" / "metrics.json").unlink()  # killed while summarising: the stages are read back, not refitted
    again = run_cli(tmp_path, *SHARDED, "hydra.run.dir=two", "ckpt_path=last")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["distilled"] == results["distilled"]


def test_fsdp_settings_are_checked_before_anything_runs(make_cfg) -> None:
    from conftest import settings_of

    cfg = make_cfg("trainer=fsdp", "trainer.accelerator=cpu")
    assert cfg.trainer.strategy.data_parallel_size == 2 and settings_of(cfg).teacher.shard is True
    with pytest.raises(KDError, match=r"data_parallel_size=2, but the run has 4 processes \(trainer.devices=2 x "
                                      r"trainer.num_nodes=2\); set trainer.strategy.data_parallel_size=4"):
        settings_of(make_cfg("trainer=fsdp", "trainer.accelerator=cpu", "trainer.num_nodes=2"))
    with pytest.raises(KDError, match="kd_lightning shards by data parallelism only"):
        settings_of(make_cfg("trainer=fsdp", "trainer.accelerator=cpu", "trainer.strategy.tensor_parallel_size=2"))
    with pytest.raises(KDError, match="teacher.shard must be true or false"):
        settings_of(make_cfg("teacher.shard=maybe"))
    assert settings_of(make_cfg("trainer=fsdp", "trainer.accelerator=cpu", "speed.shard_dtype=bfloat16")).speed.shard_dtype == "bfloat16"
    with pytest.raises(KDError, match=r"speed.shard_dtype=bfloat16 is FSDP's mixed precision, for trainer=fsdp; unset it"):
        settings_of(make_cfg("speed.shard_dtype=bfloat16"))
    with pytest.raises(KDError, match="speed.shard_dtype must be null, bfloat16 or float16, got 'fp8'"):
        settings_of(make_cfg("trainer=fsdp", "trainer.accelerator=cpu", "speed.shard_dtype=fp8"))


def test_a_model_without_known_blocks_is_refused_when_sharded() -> None:
    from kd_lightning.sharding import shard

    with pytest.raises(KDError, match=r"the student \(Linear\) has none that kd_lightning knows"):
        shard(torch.nn.Linear(2, 2), mesh=None, role="student", chunked=False)


@pytest.mark.parametrize("size, drop_last", [(37, False), (37, True), (33, False), (40, False)])
def test_processes_share_out_the_one_process_batches(size: int, drop_last: bool) -> None:
    from torch.utils.data import DataLoader

    from kd_lightning.data.memory import EpochShuffle, RankShare

    order = EpochShuffle(size, lambda: 3)
    one = [batch.tolist() for batch in DataLoader(range(size), batch_size=8, sampler=order, drop_last=drop_last)]
    shares = [list(DataLoader(range(size), batch_size=4, sampler=RankShare(order, 4, rank, 2, drop_last))) for rank in (0, 1)]
    assert len(shares[0]) == len(shares[1])  # the same number of steps on every process
    assert [sorted(a.tolist() + b.tolist()) for a, b in zip(*shares)] == [sorted(b) for b in one if len(b) >= 2]
    assert [len(RankShare(order, 4, rank, 2, drop_last)) for rank in (0, 1)] == [sum(map(len, s)) for s in shares]
