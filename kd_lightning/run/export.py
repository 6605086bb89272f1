"""Export the distilled student alone: a plain state_dict, optionally TorchScript / ``torch.export``, or a
``transformers`` model folder.

    python -m kd_lightning export RUN/distilled/checkpoints/last.ckpt student.pt [--torchscript student.ts]
                                  [--torch-export student.pt2] [--config RUN/.hydra/config.yaml] [--overwrite]
    python -m kd_lightning export RUN/distilled/checkpoints/last.ckpt DIR --format hf [--overwrite]

``--format hf`` writes the model with ``save_pretrained`` and the run's tokenizer beside it, so that
``AutoModelForCausalLM.from_pretrained(DIR)`` and ``AutoTokenizer.from_pretrained(DIR)`` load it: a
transformers student as it is, the built-in ``GPT`` as the GPT-2 model it is the same network as. The
teacher stage's checkpoint exports the same way (the run's teacher).

The student's architecture comes from the run's Hydra config (``.hydra/config.yaml``, found
next to or above the checkpoint) or ``--config``. The teacher, the feature adapters and the
optimizer state are left out; the written file loads into the bare student with
``model.load_state_dict(torch.load("student.pt"), strict=True)``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd_lightning.checkpoints import existing_checkpoint, load_weights
from kd_lightning.errors import KDError, one_line
from kd_lightning.files import atomic_directory, atomic_write


def find_run_config(checkpoint: Path) -> Path:
    """``.hydra/config.yaml`` of the run a checkpoint belongs to (searched upwards from it)."""
    for folder in checkpoint.resolve().parents:
        candidate = folder / ".hydra" / "config.yaml"
        if candidate.is_file():
            return candidate
    raise KDError(
        f"no .hydra/config.yaml above {checkpoint} to tell the student's architecture; pass "
        "--config RUN/.hydra/config.yaml (or call export_student(..., student=model))."
    )


def student_from_config(config: Path) -> tuple[nn.Module, tuple[int, ...] | None]:
    """The (untrained) student of a run config, and the data's input shape when known."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    from kd_lightning.run.settings import build

    cfg = OmegaConf.load(config)
    student = build(cfg.student.model)
    input_shape = getattr(get_class(cfg.data._target_), "input_shape", None) if cfg.get("data") else None
    return student, input_shape


EXPORT_FILE = "kd_lightning_export.json"  # in a folder --format hf wrote: the files it wrote


def check_outputs(checkpoint: Path, outputs: list[Path], overwrite: bool, folder: bool = False) -> None:
    """Before anything is written: no output is the checkpoint itself, holds it, or is another output, and none exists
    unless ``overwrite`` and it is an earlier export (:func:`earlier_export`): nothing else is ever replaced."""
    resolved = [out.resolve() for out in outputs]
    for out, where in zip(outputs, resolved):
        if where == checkpoint.resolve():
            raise KDError(
                f"{out} is the checkpoint being exported; write the student to another path (the checkpoint is "
                "what ckpt_path=last resumes from)."
            )
        if where in checkpoint.resolve().parents:
            raise KDError(
                f"{out} holds the checkpoint being exported ({checkpoint}); write the export to a path of its "
                "own, outside the run."
            )
        if resolved.count(where) > 1:
            raise KDError(f"{out} is named for two outputs; give each of them its own path.")
        if folder and out.is_file():
            raise KDError(
                f"{out} is a file, but --format hf writes a folder; give a folder path (e.g. {out.with_name(out.stem + '_hf')})."
            )
        if not folder and out.is_dir():
            raise KDError(
                f"{out} is a folder, but this export writes a file; give a file path (e.g. {out / 'student.pt'})."
            )
        if out.exists() and not overwrite:
            raise KDError(f"{out} already exists; choose another path or pass --overwrite to replace it.")
        if out.exists():
            earlier_export(out, folder)


def earlier_export(out: Path, folder: bool) -> None:
    """Refuse to replace ``out`` unless an export wrote it: a folder that ``--format hf`` wrote (its
    ``kd_lightning_export.json`` lists every file in it), or a PyTorch archive file (a state dict, TorchScript or
    ``torch.export``). A run directory, a folder with other files, or any other file is never replaced."""
    if not folder:
        if not is_torch_archive(out):
            raise KDError(
                f"{out} is not a file an export wrote (not a PyTorch archive); --overwrite replaces earlier "
                "exports only: choose another path, or remove it yourself."
            )
        return
    if (out / ".hydra").is_dir() or (out / "metrics.json").exists():
        raise KDError(
            f"{out} is a run directory; --overwrite replaces earlier exports only: write the export to a folder "
            "of its own."
        )
    try:
        written = set(json.loads((out / EXPORT_FILE).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise KDError(
            f"{out} is not a folder an export wrote (no {EXPORT_FILE}); --overwrite replaces earlier exports "
            "only: choose another folder, or remove it yourself."
        ) from None
    others = sorted(
        str(path.relative_to(out))
        for path in out.rglob("*")
        if path.is_file() and str(path.relative_to(out)) not in written | {EXPORT_FILE}
    )
    if others:
        raise KDError(
            f"{out} holds files no export wrote ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); "
            "--overwrite replaces earlier exports only: move them, or choose another folder."
        )


def is_torch_archive(path: Path) -> bool:
    """Whether ``path`` is a file ``torch.save``, ``torch.jit.save`` or ``torch.export.save`` wrote (a zip archive with
    PyTorch's version record)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith(("/version", "/archive_version", "/.data/version")) for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def stage_of(checkpoint: Path, config: Path) -> str | None:
    """The stage (``teacher``, ``distilled``, ``baseline``) of the run of ``config`` that ``checkpoint`` belongs to."""
    try:
        return checkpoint.resolve().relative_to(config.resolve().parent.parent).parts[0]
    except (ValueError, IndexError):
        return None


def check_stage(checkpoint: Path, config: Path) -> None:
    """Refuse the teacher stage's checkpoint of a run: it holds the teacher, not the student of the run's config."""
    run = config.resolve().parent.parent
    if stage_of(checkpoint, config) == "teacher":
        raise KDError(
            f"{checkpoint} is the teacher stage's checkpoint: it holds the run's teacher, not its student. Export "
            f"{run / 'distilled' / 'checkpoints' / 'last.ckpt'} (the distilled student), or use this file as "
            "teacher.checkpoint=... of another run."
        )


def check_role(role: str, stage: str | None, checkpoint: Path, cfg: Any) -> None:
    """``--role teacher`` reads a teacher's weights: not a student stage's checkpoint, and not for a run whose teacher is
    a pretrained folder it used as it is (that folder is the teacher's transformers export already)."""
    from kd_lightning.models.pretrained import is_pretrained

    if role != "teacher":
        return
    teacher = cfg.teacher
    if is_pretrained(teacher.model) and not teacher.get("fit", {}).get("pretrained", False):
        raise KDError(
            f"the run's teacher is the pretrained model {teacher.model.path}, distilled from as it was (nothing of it "
            f"was trained): it is a transformers folder already; read it with from_pretrained({str(teacher.model.path)!r})."
        )
    if stage is not None and stage != "teacher":
        raise KDError(
            f"{checkpoint} is the {stage} stage's checkpoint: it holds a student, not the teacher; drop --role teacher, "
            "or give the teacher stage's checkpoint (RUN/teacher/checkpoints/last.ckpt) or the trained teacher's file."
        )


def export_student(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    student: nn.Module | None = None,
    config: str | os.PathLike | None = None,
    example_input: torch.Tensor | None = None,
    torchscript: str | os.PathLike | None = None,
    torch_export: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> nn.Module:
    """Write the student weights of ``checkpoint`` to ``out`` as a plain state_dict; return the loaded student.

    Args:
        checkpoint: a DistillationModule checkpoint (``.ckpt``) or any file :func:`load_weights` reads.
        out: where the state_dict goes.
        student: the bare student architecture; default built from the run's config.
        config: the run's ``.hydra/config.yaml``; default found above ``checkpoint``.
        example_input: for TorchScript / ``torch.export``; default zeros of the data's input shape.
        torchscript, torch_export: also write a traced TorchScript module / an ``ExportedProgram`` here.
        overwrite: replace existing output files.
    """
    checkpoint, out = existing_checkpoint(checkpoint, "the checkpoint to export"), Path(out)
    check_outputs(checkpoint, [Path(p) for p in (out, torchscript, torch_export) if p], overwrite)
    input_shape = None
    if student is None:
        config = Path(config) if config else find_run_config(checkpoint)
        check_stage(checkpoint, config)
        student, input_shape = student_from_config(config)
    load_weights(student, checkpoint)  # strict: every student key, nothing else
    student.eval()
    state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    atomic_write(out, lambda tmp: torch.save(state, tmp))

    if torchscript or torch_export:
        if example_input is None:
            if input_shape is None:
                raise KDError(
                    "TorchScript / torch.export need an example input; pass example_input=... "
                    "(or --config of a run whose data declares input_shape)."
                )
            example_input = torch.zeros(2, *input_shape)
        with torch.no_grad():
            if torchscript:
                traced = torch.jit.trace(student, example_input)
                atomic_write(Path(torchscript), lambda tmp: torch.jit.save(traced, tmp))
            if torch_export:
                batch = torch.export.Dim("batch")  # any batch size, not just the example's
                program = torch.export.export(student, (example_input,), dynamic_shapes=({0: batch},))
                atomic_write(Path(torch_export), lambda tmp: torch.export.save(program, tmp))
    return student


def export_transformers(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,
    role: str | None = None,
    overwrite: bool = False,
) -> nn.Module:
    """Write the model of ``checkpoint`` (the student; the teacher for the teacher stage's checkpoint) to the folder
    ``out`` with ``save_pretrained``, and the run's tokenizer beside it; return the written transformers model.
    ``role="teacher"`` reads ``checkpoint`` as the run's teacher wherever it lies (a trained teacher the run reused
    from ``paths.cache_dir/trained_teachers/``, with ``config`` the run's ``.hydra/config.yaml``).

    A transformers model is written as it is; the built-in :class:`~kd_lightning.models.GPT` as the GPT-2 model of
    the same network (:func:`~kd_lightning.models.gpt.gpt_to_transformers`). The tokenizer is the one the run saved
    (``RUN/tokenizer``), or its ``data.tokenizer``.
    """
    from omegaconf import OmegaConf

    from kd_lightning.models.gpt import GPT, gpt_to_transformers
    from kd_lightning.run.settings import build

    checkpoint, out = existing_checkpoint(checkpoint, "the checkpoint to export"), Path(out)
    check_outputs(checkpoint, [out], overwrite, folder=True)
    config = Path(config) if config else find_run_config(checkpoint)
    cfg = OmegaConf.load(config)
    if role not in (None, "teacher", "student"):
        raise KDError(f"--role must be teacher or student, got {role!r}.")
    stage = stage_of(checkpoint, config)
    role = role or ("teacher" if stage == "teacher" else "student")
    check_role(role, stage, checkpoint, cfg)
    model = load_weights(build(cfg[role].model), checkpoint)
    if isinstance(model, GPT):
        model = gpt_to_transformers(model)
    if not hasattr(model, "save_pretrained"):
        raise KDError(
            f"--format hf writes transformers models (and kd_lightning's GPT, as GPT-2); the {role} is a "
            f"{type(model).__name__}: export it as a state_dict instead (without --format)."
        )
    tokenizer = run_tokenizer(config, cfg)
    model = model.eval()
    eos = getattr(tokenizer, "eos_token_id", None)
    if (
        eos is not None and getattr(model.config, "eos_token_id", None) is None
    ):  # generate() stops at the tokenizer's EOS
        model.config.eos_token_id = model.config.bos_token_id = eos
        model.generation_config.eos_token_id = model.generation_config.pad_token_id = eos
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        files = sorted(str(path.relative_to(tmp)) for path in tmp.rglob("*") if path.is_file())
        (tmp / EXPORT_FILE).write_text(
            json.dumps({"checkpoint": str(checkpoint.resolve()), "role": role, "files": files}, indent=2) + "\n"
        )
    if tokenizer is None:
        print(
            f"warning: the run in {config.parent.parent} saved no tokenizer; {out} holds the model alone",
            file=sys.stderr,
        )
    return model


def run_tokenizer(config: Path, cfg: Any) -> Any:
    """The tokenizer a text run used: the one it saved (``RUN/tokenizer``), else its ``data.tokenizer``; else ``None``."""
    from kd_lightning.models.pretrained import pretrained_tokenizer
    from kd_lightning.run.run_dir import TOKENIZER_DIR

    saved = config.parent.parent / TOKENIZER_DIR
    if (saved / "tokenizer_config.json").is_file():
        return pretrained_tokenizer(str(saved))
    data = cfg.get("data")
    path = data.get("tokenizer") if data is not None else None
    return pretrained_tokenizer(str(path)) if path else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="kd_lightning export", description="Write the distilled student alone as a plain state_dict."
    )
    parser.add_argument("checkpoint", type=Path, help="e.g. outputs/DATE/TIME/distilled/checkpoints/last.ckpt")
    parser.add_argument("out", type=Path, help="where the student's state_dict goes (e.g. student.pt)")
    parser.add_argument(
        "--config", type=Path, help="the run's .hydra/config.yaml (default: found above the checkpoint)"
    )
    parser.add_argument("--torchscript", type=Path, help="also write a traced TorchScript module here")
    parser.add_argument("--torch-export", type=Path, help="also write a torch.export ExportedProgram here (.pt2)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument(
        "--format",
        choices=("state_dict", "hf"),
        default="state_dict",
        help="hf: a transformers model folder (save_pretrained) with the run's tokenizer",
    )
    parser.add_argument(
        "--role",
        choices=("teacher", "student"),
        help="with --format hf: which of the run's models the checkpoint holds (default: the teacher for "
        "RUN/teacher/..., else the student); teacher for a trained teacher from the cache",
    )
    args = parser.parse_args(argv)
    try:
        if args.role and args.format != "hf":
            raise KDError("--role is for --format hf; a state_dict export writes the run's student.")
        if args.format == "hf":
            if args.torchscript or args.torch_export:
                raise KDError(
                    "--format hf writes a transformers folder; export TorchScript / torch.export without --format."
                )
            model = export_transformers(
                args.checkpoint, args.out, config=args.config, role=args.role, overwrite=args.overwrite
            )
            tokenizer = " and its tokenizer" if (args.out / "tokenizer_config.json").is_file() else ""
            print(
                f"{type(model).__name__} ({sum(p.numel() for p in model.parameters()):,} parameters){tokenizer} "
                f"written to {args.out}: AutoModelForCausalLM.from_pretrained({str(args.out)!r})"
            )
            return
        student = export_student(
            args.checkpoint,
            args.out,
            config=args.config,
            torchscript=args.torchscript,
            torch_export=args.torch_export,
            overwrite=args.overwrite,
        )
    except (KDError, OSError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        raise SystemExit(1) from None
    params = sum(p.numel() for p in student.parameters())
    written = [str(p) for p in (args.out, args.torchscript, args.torch_export) if p]
    print(f"student {type(student).__name__} ({params:,} parameters) written: {', '.join(written)}")


if __name__ == "__main__":
    main()
