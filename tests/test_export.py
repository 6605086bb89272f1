"""``python -m kd_lightning export``: nothing a user wrote is replaced. ``--overwrite`` replaces an earlier export only
(a folder ``--format hf`` wrote, a PyTorch archive file); a run folder, a folder holding the checkpoint, a folder with
other files, or any other file is refused in one line before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from kd_lightning.models import GPT
from kd_lightning.run.export import main as export_main

STUDENT = {
    "_target_": "kd_lightning.models.GPT",
    "vocab_size": 50,
    "context_length": 8,
    "dim": 8,
    "depth": 1,
    "heads": 2,
}


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A finished run's folder: its config, metrics, and the distilled stage's checkpoint (a GPT student)."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save({"student": {"model": STUDENT}}, run / ".hydra" / "config.yaml")
    (run / "metrics.json").write_text("{}\n")
    checkpoint = run / "distilled" / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    torch.manual_seed(0)
    student = GPT(50, 8, 8, 1, 2)
    torch.save({"state_dict": {f"student.{k}": v for k, v in student.state_dict().items()}, "epoch": 1}, checkpoint)
    return run


def refused(capsys, *args: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as status:
        export_main(list(args))
    assert status.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and len(error.strip().splitlines()) == 1, error
    return error


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_never_removes_a_run_or_a_folder_with_the_users_files(run: Path, tmp_path: Path, capsys) -> None:
    pytest.importorskip("transformers")
    checkpoint = str(run / "distilled" / "checkpoints" / "last.ckpt")
    before = snapshot(run)
    for target in (run, run / "distilled", run / "distilled" / "checkpoints"):  # each holds the checkpoint
        assert "holds the checkpoint being exported" in refused(
            capsys, checkpoint, str(target), "--format", "hf", "--overwrite"
        )
    other_run = tmp_path / "other_run"
    (other_run / ".hydra").mkdir(parents=True)
    assert "is a run directory" in refused(capsys, checkpoint, str(other_run), "--format", "hf", "--overwrite")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "ideas.txt").write_text("mine\n")
    assert "is not a folder an export wrote" in refused(capsys, checkpoint, str(notes), "--format", "hf", "--overwrite")
    assert (notes / "ideas.txt").read_text() == "mine\n" and snapshot(run) == before and (other_run / ".hydra").is_dir()

    # an earlier export is replaced; once the user adds a file to it, it is theirs
    export_main([checkpoint, str(tmp_path / "hf"), "--format", "hf"])
    export_main([checkpoint, str(tmp_path / "hf"), "--format", "hf", "--overwrite"])
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "kd_lightning_export.json").is_file()
    (tmp_path / "hf" / "README.md").write_text("my model card\n")
    assert "holds files no export wrote (README.md)" in refused(
        capsys, checkpoint, str(tmp_path / "hf"), "--format", "hf", "--overwrite"
    )
    assert (tmp_path / "hf" / "README.md").read_text() == "my model card\n"
    (tmp_path / "file").write_text("x")
    assert "is a file, but --format hf writes a folder" in refused(
        capsys, checkpoint, str(tmp_path / "file"), "--format", "hf", "--overwrite"
    )


def test_a_state_dict_export_replaces_an_earlier_export_only(run: Path, tmp_path: Path, capsys) -> None:
    checkpoint = str(run / "distilled" / "checkpoints" / "last.ckpt")
    folder = tmp_path / "folder"
    folder.mkdir()
    for flags in ((), ("--overwrite",)):
        error = refused(capsys, checkpoint, str(folder), *flags)
        assert "is a folder, but this export writes a file; give a file path" in error and ".tmp" not in error
    mine = tmp_path / "mine.pt"
    mine.write_text("not a model\n")
    assert "is not a file an export wrote" in refused(capsys, checkpoint, str(mine), "--overwrite")
    assert mine.read_text() == "not a model\n"
    export_main([checkpoint, str(tmp_path / "student.pt")])
    export_main([checkpoint, str(tmp_path / "student.pt"), "--overwrite"])
    assert set(torch.load(tmp_path / "student.pt")) == set(GPT(50, 8, 8, 1, 2).state_dict())


def test_role_teacher_names_what_the_checkpoint_or_the_run_holds(run: Path, tmp_path: Path, capsys) -> None:
    checkpoint = str(run / "distilled" / "checkpoints" / "last.ckpt")
    OmegaConf.save(
        {"student": {"model": STUDENT}, "teacher": {"model": {**STUDENT, "dim": 16}, "fit": {"pretrained": False}}},
        run / ".hydra" / "config.yaml",
    )
    error = refused(capsys, checkpoint, str(tmp_path / "out"), "--format", "hf", "--role", "teacher")
    assert "is the distilled stage's checkpoint: it holds a student, not the teacher; drop --role teacher" in error
    pretrained = {"_target_": "kd_lightning.models.pretrained_causal_lm", "path": str(tmp_path / "my_teacher")}
    OmegaConf.save(
        {"student": {"model": STUDENT}, "teacher": {"model": pretrained, "fit": {"pretrained": False}}},
        run / ".hydra" / "config.yaml",
    )
    error = refused(capsys, checkpoint, str(tmp_path / "out"), "--format", "hf", "--role", "teacher")
    assert f"the run's teacher is the pretrained model {tmp_path / 'my_teacher'}, distilled from as it was" in error
    assert not (tmp_path / "out").exists()


def test_a_file_where_format_hf_writes_a_folder_is_named_with_a_folder_to_use(run: Path, tmp_path: Path, capsys):
    (tmp_path / "model").write_text("my notes")
    checkpoint = str(run / "distilled" / "checkpoints" / "last.ckpt")
    error = refused(capsys, checkpoint, str(tmp_path / "model"), "--format", "hf", "--overwrite")
    assert f"{tmp_path / 'model'} is a file, but --format hf writes a folder; give a folder path (e.g. " in error
    assert f"{tmp_path / 'model_hf'})" in error and (tmp_path / "model").read_text() == "my notes"
