"""trainer=fsdp: FSDP2 through Lightning's ModelParallelStrategy, on CPU with gloo. Two processes sharding the student
(and the teacher, or a whole teacher on each) train the weights and gradients one process trains on the same global
batch, token and chat; the teacher never changes; the command line runs every stage sharded (a recorded teacher and
on-policy samples too), resumes from gathered and distributed checkpoints, and exports them; damaged distributed
checkpoints are refused; the settings are checked before anything runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sharded_step import LENGTH, models
from test_cli import run_cli

from kd_lightning import KDError
from kd_lightning.checkpoints import load_weights
from kd_lightning.models import GPT
from kd_lightning.run.memory_plan import device_memory

WORKER = Path(__file__).resolve().parent / "sharded_step.py"


def step(
    tmp_path: Path, processes: int, chunk_rows: int | None, shard_teacher: bool, dtype: str = "none", kind: str = "gpt"
) -> dict:
    out = tmp_path / f"{processes}-{chunk_rows}-{int(shard_teacher)}-{dtype}-{kind}.pt"
    done = subprocess.run(
        [
            sys.executable,
            str(WORKER),
            str(processes),
            str(chunk_rows or "none"),
            str(int(shard_teacher)),
            str(out),
            dtype,
            kind,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out, weights_only=False)


def chat_folders(tmp_path: Path) -> None:
    """``tok`` (a tokenizer) and ``chats``: 8 conversations of 1 to 3 exchanges of different lengths, some with a system
    turn, for the worker's ``chat`` batches."""
    from data_factory import WORDS, make_corpus
    from test_chat import write_chats
    from test_pretrained import save_tokenizer

    save_tokenizer(make_corpus(tmp_path / "corpus"), tmp_path / "tok")
    words = iter(WORDS * 20)

    def say(count: int) -> str:
        return " ".join(next(words) for _ in range(count))

    chats = [
        {
            "messages": ([{"role": "system", "content": say(2)}] if i % 3 == 0 else [])
            + [
                turn
                for exchange in range(1 + i % 3)
                for turn in (
                    {"role": "user", "content": say(1 + (i + exchange) % 4)},
                    {"role": "assistant", "content": say(1 + i % 3)},
                )
            ]
        }
        for i in range(8)
    ]
    write_chats(tmp_path / "chats", chats)


@pytest.mark.slow  # two processes
@pytest.mark.parametrize(
    "kind, chunk_rows, shard_teacher",
    [
        ("gpt", None, True),
        ("gpt", 5, True),
        ("gpt", None, False),
        ("gpt", 5, False),
        ("llama", None, True),
        ("llama", 5, True),
        ("chat", None, True),
        ("chat", 5, False),
    ],
    ids=[
        "gpt-plain-teacher_sharded",
        "gpt-chunked-teacher_sharded",
        "gpt-plain-teacher_whole",
        "gpt-chunked-teacher_whole",
        "llama-plain-teacher_sharded",
        "llama-chunked-teacher_sharded",
        "chat-plain-teacher_sharded",
        "chat-chunked-teacher_whole",
    ],
)
def test_two_sharded_processes_train_the_one_process_weights(
    tmp_path: Path, monkeypatch, kind: str, chunk_rows: int | None, shard_teacher: bool
) -> None:
    """The built-in GPT and a transformers Llama built from a config, on padded token batches and (``chat``) on
    chat-template conversations padded to each process's longest; the chunked loss of a sharded Llama reads its hidden
    states through the root method kd_lightning.sharding gives it."""
    monkeypatch.chdir(tmp_path)
    if kind == "chat":
        chat_folders(tmp_path)
    one, two = (
        step(tmp_path, 1, chunk_rows, shard_teacher, kind=kind),
        step(tmp_path, 2, chunk_rows, shard_teacher, kind=kind),
    )
    assert two["sharded"] == {"student": True, "teacher": shard_teacher} and one["sharded"] == {
        "student": False,
        "teacher": False,
    }
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    for name in one["gradients"]:  # the third step's whole gradients (a tied weight once)
        torch.testing.assert_close(two["gradients"][name], one["gradients"][name], atol=1e-5, rtol=1e-5, msg=name)
    for name in one["student"]:  # the weights after 3 SGD-with-momentum steps
        torch.testing.assert_close(two["student"][name], one["student"][name], atol=1e-6, rtol=1e-6, msg=name)
    for run in (one, two):
        assert all(torch.equal(run["teacher"][k], run["teacher_before"][k]) for k in run["teacher_before"])
    assert any(not torch.equal(one["student"][k], one["teacher_before"][k]) for k in one["student"])  # it did train
    assert all(g.abs().sum() > 0 for g in one["gradients"].values())
    # what a process holds is what the memory calculator says, and about half of what one process holds
    with torch.device("meta"):
        student, teacher = models(kind)
    for run, processes in ((one, 1), (two, 2)):
        calculated = device_memory(
            teacher,
            student,
            processes=processes,
            sharded=processes > 1,
            shard_teacher=shard_teacher,
            optimizer_states_per_parameter=1,
            batch_size=4,
            length=LENGTH,
        )  # parameter bytes: exact
        assert run["held"] == {k: getattr(calculated, k) for k in run["held"]}
    for name in ("student_parameters", "student_gradients", "optimizer_state") + (
        ("teacher_parameters",) if shard_teacher else ()
    ):
        assert two["held"][name] == pytest.approx(one["held"][name] / 2, rel=0.05)


@pytest.mark.slow  # two processes, twice
def test_sharded_parameters_gathered_in_bfloat16_train_close_to_float32_and_stay_float32(tmp_path: Path) -> None:
    full, mixed = step(tmp_path, 2, None, True), step(tmp_path, 2, None, True, dtype="bfloat16")
    assert mixed["dtypes"] == {torch.float32} and mixed["held"] == full["held"]  # the shards and optimizer state
    differences = [(mixed["student"][k] - full["student"][k]).abs().max().item() for k in full["student"]]
    assert 0 < max(differences) < 1e-2  # computed in bfloat16 (float32 would agree to 1e-6), and close
    assert mixed["loss"] == pytest.approx(full["loss"], rel=1e-2)
    assert all(torch.equal(mixed["teacher"][k], mixed["teacher_before"][k]) for k in mixed["teacher_before"])


TINY = [
    "data=arithmetic",
    "data.train_size=256",
    "data.val_size=32",
    "data.test_size=32",
    "data.eval_batch_size=16",
    "teacher=gpt_teacher",
    "teacher.model.dim=16",
    "teacher.model.depth=2",
    "teacher.model.heads=2",
    "student=gpt_student",
    "student.model.dim=16",
    "student.model.depth=1",
    "teacher.fit.max_epochs=1",
    "trainer.max_epochs=2",
    "distill.alpha=1",
    "distill.temperature=1",
]
SHARDED = [*TINY, "trainer=fsdp", "data.batch_size=16"]  # 2 processes x 16 rows


def export(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kd_lightning", "export", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


def numbers(results: dict) -> dict[str, float]:
    """A run's metrics, less the ones of drawn samples (drawn per batch, so per split of the batch) and timings."""
    return {
        f"{stage}/{name}": value
        for stage, metrics in results.items()
        if isinstance(metrics, dict)
        for name, value in metrics.items()
        if isinstance(value, (int, float)) and "sample_" not in name
    }


DISTRIBUTED = ["trainer.strategy.save_distributed_checkpoint=true"]


def crash(stage: str) -> list[str]:
    return [
        "+callbacks.crash._target_=crash_callback.CrashAtStep",
        f"+callbacks.crash.stage={stage}",
        "+callbacks.crash.step=12",
    ]


@pytest.mark.slow  # two processes, three stages, five runs and two exports
def test_every_stage_runs_sharded_from_the_command_line_equal_to_one_process_resumes_and_exports(
    tmp_path: Path,
) -> None:
    sharded = run_cli(tmp_path, *SHARDED, "hydra.run.dir=two")
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert sharded.stdout.count("student distilled") == 1  # one summary, from rank 0
    results = json.loads((tmp_path / "two" / "metrics.json").read_text())
    for stage in ("teacher", "distilled", "baseline"):
        assert 0 <= results[stage]["test/exact_match"] <= 1
    # the same global batches in one process: the same teacher, students and metrics
    single = run_cli(
        tmp_path, *TINY, "data.batch_size=32", "hydra.run.dir=one", env={"KD_LIGHTNING_CACHE": str(tmp_path / "own")}
    )
    assert single.returncode == 0, single.stderr[-3000:]
    expected = numbers(json.loads((tmp_path / "one" / "metrics.json").read_text()))
    assert len(expected) > 30 and numbers(results) == pytest.approx(expected, rel=1e-5, abs=1e-6)

    # one consolidated checkpoint per stage, the student's whole weights: it loads into a plain model
    state = torch.load(
        tmp_path / "two" / "distilled" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    assert not any(k.startswith("teacher.") for k in state["state_dict"])
    GPT(14, 16, 16, 1, 2).load_state_dict({k.removeprefix("student."): v for k, v in state["state_dict"].items()})

    # killed in the distilled stage's second epoch, rerun with ckpt_path=last writing distributed checkpoints (a folder
    # of each process's shards) from then on, killed in the baseline's, rerun: the uninterrupted run's weights and metrics
    env = {"PYTHONPATH": str(Path(__file__).resolve().parent)}
    killed = run_cli(tmp_path, *SHARDED, "hydra.run.dir=killed", *crash("distilled"), env=env)
    assert killed.returncode != 0 and "simulated pre-emption at step 12 of stage distilled" in killed.stderr
    again = run_cli(
        tmp_path,
        *SHARDED,
        *DISTRIBUTED,
        "hydra.run.dir=killed",
        "ckpt_path=last",
        "changed_on_resume=[callbacks.crash]",
        *crash("baseline"),
        env=env,
    )
    assert again.returncode != 0 and "simulated pre-emption at step 12 of stage baseline" in again.stderr
    resumed = run_cli(
        tmp_path,
        *SHARDED,
        *DISTRIBUTED,
        "hydra.run.dir=killed",
        "ckpt_path=last",
        "changed_on_resume=[callbacks.crash]",
        env=env,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    shards = tmp_path / "killed" / "distilled" / "checkpoints" / "last.ckpt"
    assert sorted(p.name for p in shards.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    assert numbers(json.loads((tmp_path / "killed" / "metrics.json").read_text())) == numbers(results)
    baseline = torch.load(
        tmp_path / "two" / "baseline" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    resumed_baseline = load_weights(
        GPT(14, 16, 16, 1, 2), tmp_path / "killed" / "baseline" / "checkpoints" / "last.ckpt"
    )
    for name, value in resumed_baseline.state_dict().items():
        torch.testing.assert_close(value, baseline["state_dict"][f"student.{name}"], rtol=0, atol=0, msg=name)

    # the export consolidates the shards: the uninterrupted run's student exactly, and one process's
    assert export(tmp_path, str(shards), "student.pt").returncode == 0
    exported = torch.load(tmp_path / "student.pt", weights_only=True)
    one_process = torch.load(
        tmp_path / "one" / "distilled" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    for name, value in state["state_dict"].items():
        torch.testing.assert_close(exported[name.removeprefix("student.")], value, rtol=0, atol=0, msg=name)
        # 32 AdamW steps: within 2e-6, but for the attention's key bias, whose gradient is zero in exact arithmetic
        # and which AdamW moves by its normalised rounding noise (5e-5)
        torch.testing.assert_close(
            value, one_process["state_dict"][name], rtol=0, atol=1e-4 if "qkv.bias" in name else 2e-6, msg=name
        )
    assert export(tmp_path, str(shards), "hf", "--format", "hf").returncode == 0
    from transformers import AutoModelForCausalLM

    student = GPT(14, 16, 16, 1, 2).eval()
    student.load_state_dict(exported)
    tokens = torch.randint(0, 14, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()(tokens).logits, student(tokens).detach()
    )

    (tmp_path / "killed" / "metrics.json").unlink()  # killed while summarising: the stages are read back, not refitted
    written = (shards / ".metadata").stat().st_mtime_ns
    summarised = run_cli(tmp_path, *SHARDED, *DISTRIBUTED, "hydra.run.dir=killed", "ckpt_path=last")
    assert summarised.returncode == 0, summarised.stderr[-3000:]
    assert (shards / ".metadata").stat().st_mtime_ns == written
    assert numbers(json.loads((tmp_path / "killed" / "metrics.json").read_text())) == numbers(results)


ON_POLICY = [
    "distill.on_policy.fraction=0.5",
    "distill.on_policy.teacher_fraction=0.25",
    "distill.on_policy.greedy=true",
    "distill.on_policy.max_new_tokens=8",
]


@pytest.mark.slow  # two processes, and one, for each
@pytest.mark.parametrize(
    "teacher", [["teacher.mode=recorded"], ON_POLICY], ids=["recorded_teacher", "on_policy_samples"]
)
def test_a_recorded_teacher_and_on_policy_samples_train_sharded_as_in_one_process(
    tmp_path: Path, teacher: list[str]
) -> None:
    """A recorded teacher (the student alone is sharded; the teacher's logits are looked up), and training batches
    completed by the sharded student or the sharded teacher (greedy, so that the completions are the same however
    the batch is split), the student generating sharded or through its whole copy: every metric of one process."""
    sharded = run_cli(tmp_path, *SHARDED, *teacher, "baseline=false", "hydra.run.dir=two")
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    single = run_cli(
        tmp_path,
        *TINY,
        "data.batch_size=32",
        *teacher,
        "baseline=false",
        "hydra.run.dir=one",
        env={"KD_LIGHTNING_CACHE": str(tmp_path / "own")},
    )
    assert single.returncode == 0, single.stderr[-3000:]
    expected = numbers(json.loads((tmp_path / "one" / "metrics.json").read_text()))
    assert len(expected) > 15 and numbers(json.loads((tmp_path / "two" / "metrics.json").read_text())) == pytest.approx(
        expected, rel=1e-5, abs=1e-6
    )
    if teacher == ON_POLICY:  # the student generating through a whole copy of its weights: the same samples
        whole = run_cli(
            tmp_path, *SHARDED, *teacher, "baseline=false", "speed.generate_whole=true", "hydra.run.dir=whole"
        )
        assert whole.returncode == 0, whole.stderr[-3000:]
        assert "the student generating through a whole copy" in whole.stdout + whole.stderr
        assert numbers(json.loads((tmp_path / "whole" / "metrics.json").read_text())) == pytest.approx(
            expected, rel=1e-5, abs=1e-6
        )
    if teacher == ["teacher.mode=recorded"]:
        assert len([p for p in (tmp_path / "cache" / "recordings").iterdir() if p.is_dir()]) == 1  # recorded once
    else:
        assert "completions sampled" in sharded.stderr + sharded.stdout


def test_fsdp_settings_are_checked_before_anything_runs(make_cfg) -> None:
    from conftest import settings_of

    cfg = make_cfg("trainer=fsdp", "trainer.accelerator=cpu")
    assert cfg.trainer.strategy.data_parallel_size == 2 and settings_of(cfg).teacher.shard is True
    with pytest.raises(
        KDError,
        match=r"data_parallel_size=2, but the run has 4 processes \(trainer.devices=2 x "
        r"trainer.num_nodes=2\); set trainer.strategy.data_parallel_size=4",
    ):
        settings_of(make_cfg("trainer=fsdp", "trainer.accelerator=cpu", "trainer.num_nodes=2"))
    with pytest.raises(KDError, match="kd_lightning shards by data parallelism only"):
        settings_of(make_cfg("trainer=fsdp", "trainer.accelerator=cpu", "trainer.strategy.tensor_parallel_size=2"))
    with pytest.raises(KDError, match="teacher.shard must be true or false"):
        settings_of(make_cfg("teacher.shard=maybe"))
    assert (
        settings_of(make_cfg("trainer=fsdp", "trainer.accelerator=cpu", "speed.shard_dtype=bfloat16")).speed.shard_dtype
        == "bfloat16"
    )
    with pytest.raises(
        KDError, match=r"speed.shard_dtype=bfloat16 is FSDP's mixed precision, for trainer=fsdp; unset it"
    ):
        settings_of(make_cfg("speed.shard_dtype=bfloat16"))
    with pytest.raises(KDError, match="speed.shard_dtype must be null, bfloat16 or float16, got 'fp8'"):
        settings_of(make_cfg("trainer=fsdp", "trainer.accelerator=cpu", "speed.shard_dtype=fp8"))
    assert settings_of(
        make_cfg("trainer=fsdp", "trainer.accelerator=cpu", "speed.generate_whole=true")
    ).speed.generate_whole
    with pytest.raises(
        KDError,
        match=r"speed.generate_whole=true generates through a whole copy of a sharded student, for trainer=fsdp",
    ):
        settings_of(make_cfg("speed.generate_whole=true"))
    with pytest.raises(KDError, match="speed.generate_whole must be true or false"):
        settings_of(make_cfg("trainer=fsdp", "trainer.accelerator=cpu", "speed.generate_whole=sometimes"))
    with pytest.raises(
        KDError, match=r"kd_lightning shards through kd_lightning.sharding.ShardedStrategy \(trainer=fsdp\)"
    ):
        settings_of(
            make_cfg(
                "trainer=fsdp",
                "trainer.accelerator=cpu",
                "trainer.strategy._target_=lightning.pytorch.strategies.ModelParallelStrategy",
            )
        )


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
    shares = [
        list(DataLoader(range(size), batch_size=4, sampler=RankShare(order, 4, rank, 2, drop_last))) for rank in (0, 1)
    ]
    assert len(shares[0]) == len(shares[1])  # the same number of steps on every process
    assert [sorted(a.tolist() + b.tolist()) for a, b in zip(*shares)] == [sorted(b) for b in one if len(b) >= 2]
    assert [len(RankShare(order, 4, rank, 2, drop_last)) for rank in (0, 1)] == [sum(map(len, s)) for s in shares]


def distributed_checkpoint(path: Path, student: torch.nn.Module) -> Path:
    """A distributed checkpoint of a DistillationModule holding ``student``, written by one process as a sharded run's
    processes write theirs (torch.distributed.checkpoint, then Lightning's meta.pt)."""
    from torch.distributed.checkpoint import save

    with pytest.warns(UserWarning, match="torch.distributed is disabled"):  # that it is written by one process
        save(
            {"state_dict": {f"student.{k}": v for k, v in student.state_dict().items()}},
            checkpoint_id=path,
            no_dist=True,
        )
    torch.save({"epoch": 0, "global_step": 8}, path / "meta.pt")
    return path


def test_a_distributed_checkpoint_loads_whole_into_a_plain_model_or_is_refused_in_one_line(tmp_path: Path) -> None:
    from kd_lightning.checkpoints import existing_checkpoint, load_weights

    torch.manual_seed(0)
    trained = GPT(14, 16, 16, 1, 2)
    shards = distributed_checkpoint(tmp_path / "last.ckpt", trained)
    assert existing_checkpoint(shards) == shards
    loaded = load_weights(GPT(14, 16, 16, 1, 2), shards)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in trained.state_dict().items())
    with pytest.raises(KDError, match=r"does not fit the model GPT .*missing keys: blocks.1"):
        load_weights(GPT(14, 16, 16, 2, 2), shards)
    with pytest.raises(
        KDError, match=r"wrong shapes: token_embedding.weight: checkpoint \(14, 16\) vs model \(15, 16\)"
    ):
        load_weights(GPT(15, 16, 16, 1, 2), shards)


def test_a_damaged_distributed_checkpoint_is_refused_before_resuming_or_exporting(tmp_path: Path) -> None:
    from kd_lightning.checkpoints import check_resumable, existing_checkpoint

    shards = distributed_checkpoint(tmp_path / "last.ckpt", GPT(14, 16, 16, 1, 2))
    check_resumable(shards, "distilled")  # complete
    (shards / "meta.pt").unlink()
    with pytest.raises(
        KDError,
        match=r"distributed checkpoint .* is damaged \(meta.pt, the epoch, step and callback states, is missing\)",
    ):
        check_resumable(shards, "distilled")
    shards = distributed_checkpoint(tmp_path / "other.ckpt", GPT(14, 16, 16, 1, 2))
    (part,) = shards.glob("*.distcp")
    part.write_bytes(part.read_bytes()[:100])  # a process killed while writing
    with pytest.raises(KDError, match=rf"is damaged \({part.name} is missing or cut short\); delete it to restart"):
        check_resumable(shards, "distilled")
    with pytest.raises(
        KDError,
        match=rf"cannot read the distributed checkpoint .*: it is damaged \({part.name} is missing or cut short\)",
    ):
        load_weights(GPT(14, 16, 16, 1, 2), shards)  # as the export reads it
    (shards / ".metadata").unlink()
    with pytest.raises(KDError, match="is damaged"):
        check_resumable(shards, "distilled")
    with pytest.raises(
        KDError, match=r"holds the shards of a distributed checkpoint but not their index \(.metadata\)"
    ):
        existing_checkpoint(shards, "the checkpoint to export")


def test_a_checkpoint_is_replaced_whole_and_put_back_when_killed_in_between(tmp_path: Path) -> None:
    from kd_lightning.files import replace_path, restore_replaced

    last, new = tmp_path / "last.ckpt", tmp_path / ".last.ckpt.partial"
    last.write_text("a consolidated file")
    new.mkdir()
    (new / "shard").write_text("new")
    replace_path(new, last)  # a folder in place of a file
    assert (
        (last / "shard").read_text() == "new" and not new.exists() and not (tmp_path / ".last.ckpt.replaced").exists()
    )
    last.rename(tmp_path / ".last.ckpt.replaced")  # killed between moving the old one aside and renaming the new one
    restore_replaced(last)
    assert (last / "shard").read_text() == "new"
    restore_replaced(last)  # nothing to put back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_overwrite_removes_an_earlier_runs_distributed_checkpoints(tmp_path: Path) -> None:
    from kd_lightning.run.run_dir import check, clear_earlier_run

    shards = distributed_checkpoint(tmp_path / "distilled" / "checkpoints" / "last.ckpt", GPT(14, 16, 16, 1, 2))
    (tmp_path / "distilled" / "checkpoints" / ".last.ckpt.partial").mkdir()
    with pytest.raises(KDError, match=r"holds the checkpoints of an earlier run \(distilled/checkpoints/last.ckpt\)"):
        check(None, tmp_path, resume=False, overwrite=False)
    clear_earlier_run(tmp_path)
    assert not shards.exists() and not (tmp_path / "distilled").exists()


def test_a_sharded_run_made_with_lightnings_strategy_class_resumes_with_trainer_fsdps() -> None:
    from kd_lightning.run.run_dir import differences

    def run(target: str) -> dict:
        return {"trainer": {"strategy": {"_target_": target, "data_parallel_size": 2}}}

    assert (
        differences(
            run("lightning.pytorch.strategies.ModelParallelStrategy"), run("kd_lightning.sharding.ShardedStrategy")
        )
        == {}
    )
    assert (
        differences(run("kd_lightning.sharding.ShardedStrategy"), run("lightning.pytorch.strategies.DDPStrategy")) != {}
    )
