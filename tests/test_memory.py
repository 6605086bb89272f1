"""The memory calculator (kd_lightning.run.memory_plan): exact parameter, gradient and optimizer bytes per process for DDP and
FSDP, from models built on the meta device; what two processes actually hold is checked in tests/test_sharding.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kd_lightning.models import GPT
from kd_lightning.run.memory_plan import device_memory, main, shard_bytes


def test_a_shard_is_ceil_rows_over_processes_of_every_parameter() -> None:
    layer = nn.Linear(5, 3)  # weight (3, 5), bias (3,): 2 of 3 rows each on the first of two processes
    assert shard_bytes(layer, 1) == (15 + 3) * 4 and shard_bytes(layer, 2) == (2 * 5 + 2) * 4
    assert shard_bytes(layer.to(torch.bfloat16), 3) == (5 + 1) * 2


def test_fsdp_divides_what_ddp_copies() -> None:
    with torch.device("meta"):
        teacher, student = GPT(256, 64, 64, 4, 4), GPT(256, 64, 32, 2, 2)
    kw = dict(optimizer_states_per_parameter=2, batch_size=2, length=64)
    ddp = device_memory(teacher, student, processes=4, sharded=False, shard_teacher=True, **kw)
    fsdp = device_memory(teacher, student, processes=4, sharded=True, shard_teacher=True, **kw)
    whole = device_memory(teacher, student, processes=4, sharded=True, shard_teacher=False, **kw)
    recorded = device_memory(None, student, processes=4, sharded=False, shard_teacher=False, **kw)
    student_bytes = sum(p.numel() for p in student.parameters()) * 4
    assert ddp.student_parameters == ddp.student_gradients == student_bytes and ddp.optimizer_state == 2 * student_bytes
    assert fsdp.student_parameters == pytest.approx(student_bytes / 4, rel=0.05) and ddp.gathered == 0 < fsdp.gathered
    assert whole.teacher_parameters == ddp.teacher_parameters == sum(p.numel() for p in teacher.parameters()) * 4
    assert (
        fsdp.teacher_parameters == pytest.approx(ddp.teacher_parameters / 4, rel=0.05)
        and recorded.teacher_parameters == 0
    )
    assert fsdp.activations == ddp.activations and fsdp.total < whole.total < ddp.total


def test_the_command_prints_the_columns_for_a_run_it_does_not_start(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    main(["--device-gib", "80", "+recipe=lm_shakespeare", "trainer=fsdp", "trainer.devices=8", "data.batch_size=4"])
    out = capsys.readouterr().out
    assert (
        "per device, 8 processes" in out
        and out.splitlines()[1].startswith("MiB")
        and "batch 4 x 128 tokens" in out
        and "chunked loss (64 rows)" in out  # speed.chunk_rows=auto: 1/8 of 4 x 128 tokens
    )
    rows = {line[:24].strip(): line[24:].split() for line in out.splitlines()[2:]}
    assert set(rows) >= {"teacher parameters", "student parameters", "optimizer state", "total", "fits 80 GiB"}
    teacher = [float(v) for v in rows["teacher parameters"]]  # ddp, fsdp, fsdp whole teacher, recorded
    assert teacher[0] == teacher[2] > 0 and teacher[3] == 0 and rows["fits 80 GiB"] == ["yes"] * 4
    assert list(tmp_path.iterdir()) == []  # no run directory, nothing trained


def test_the_command_refuses_what_it_cannot_count(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["trainer=fsdp"])  # the digits default: image models have no output head over tokens
    assert capsys.readouterr().err.startswith("error: the memory calculator is for language models")
