"""The checks that need built data or models, run once before anything trains (after :mod:`~kd_lightning.run.settings`
has checked every value): the chunked loss suits the models, packing is supported, pretrained folders share the
run's tokenizer, on-policy prompts fit the student's context, feature layers exist, teacher and student predict the
same classes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd_lightning.data.batch import kept_labels
from kd_lightning.data.memory import InMemoryDataModule
from kd_lightning.errors import KDError
from kd_lightning.models.outputs import check_packing, model_logits, output_head
from kd_lightning.models.pretrained import is_pretrained, pretrained_tokenizer
from kd_lightning.run.settings import Settings
from kd_lightning.sequences import context_length, prompt_lengths
from kd_lightning.speed import check_chunk_rows
from kd_lightning.vocab import check_same_classes, check_same_tokenizer, check_widths


def check_models(settings: Settings, datamodule: Any) -> None:
    """Before any training: ``speed.chunk_rows`` suits the task and the models trained here (final hidden states and
    an output head); with a live teacher, the feature terms' layers exist and teacher and student predict the same
    classes."""
    task, live, chunked = (
        getattr(datamodule, "task", "classification"),
        settings.teacher.mode == "live",
        settings.speed.chunk_rows,
    )
    check_chunk_rows(chunked, task, settings.loss_mix.features is not None)
    check_tokenizers(settings, datamodule)
    packing = packs(datamodule)
    if not (live or chunked or packing):
        return  # a recorded teacher: the module checks the student's logits against the recording on the first batch
    student = settings.student()
    # a pretrained teacher is read once, by teacher_model; its logits are checked on the first batch
    teacher = (
        settings.teacher.model() if (live and not settings.teacher.pretrained) or settings.teacher.trains else None
    )
    for role, model in (("student", student), ("teacher", teacher)) if packing else ():
        if model is not None:
            check_packing(model, role)
    check_sampling_fits(settings, datamodule, student)
    if chunked is not None:
        for role, model in (("student", student), ("teacher", teacher if settings.teacher.trains else None)):
            if model is not None and output_head(model) is None:
                raise KDError(
                    f"speed.chunk_rows trains from final hidden states and an output head, but the {role} "
                    f"({type(model).__name__}) has neither hidden_states() and head (as kd_lightning.models.GPT) nor "
                    "get_output_embeddings() (as transformers causal LMs); unset speed.chunk_rows."
                )
    if not live or teacher is None:
        return
    if settings.loss_mix.features is not None:
        settings.loss_mix.features.check_paths(student, teacher)
    if not hasattr(datamodule, "example_input"):
        return  # DistillationModule checks on the first batch instead
    batch = {"inputs": datamodule.example_input()}
    student_logits, teacher_logits = (
        example_logits("student", student, batch, datamodule),
        example_logits("teacher", teacher, batch, datamodule),
    )
    if task == "tokens":  # the teacher's padding rows are checked on the teacher distilled from, on the first batch
        check_widths(student_logits.shape[-1], teacher_logits.shape[-1], settings.run.num_classes)
    else:
        check_same_classes(student_logits, teacher_logits)


def example_logits(role: str, model: nn.Module, batch: dict[str, Any], datamodule: Any) -> torch.Tensor:
    """``model``'s logits for the data's example batch; a model that cannot read the data's inputs (an image model
    given tokens) is named in one line."""
    try:
        with torch.no_grad():
            return model_logits(model.eval(), batch)
    except (RuntimeError, TypeError, ValueError, IndexError) as error:
        task = getattr(datamodule, "task", "classification")
        models = (
            "language models (e.g. teacher=gpt_teacher student=gpt_student)" if task == "tokens" else "image models"
        )
        raise KDError(
            f"the {role} ({type(model).__name__}) cannot read the inputs of {type(datamodule).__name__} "
            f"({str(error).splitlines()[0]}); for {'token' if task == 'tokens' else task} data choose {models}."
        ) from None


def check_sampling_fits(settings: Settings, datamodule: Any, student: nn.Module) -> None:
    """``distill.on_policy`` (and its stages): the data has prompts, and the longest training prompt and
    ``max_new_tokens`` fit the student's context."""
    if not settings.samples:
        return
    task = getattr(datamodule, "task", "classification")
    if task != "tokens":
        raise KDError(
            f"distill.on_policy samples completions from a language model, but {type(datamodule).__name__} is "
            f"{task} data; unset distill.on_policy (fraction=0, teacher_fraction=0), or distil a language model."
        )
    if settings.speed.generate_per_step and not isinstance(datamodule, InMemoryDataModule):
        raise KDError(
            f"speed.generate_per_step needs each training batch served with the batches of its optimizer step, which "
            f"kd_lightning's data modules do (InMemoryDataModule) and {type(datamodule).__name__} does not; unset "
            "speed.generate_per_step."
        )
    splits = getattr(datamodule, "splits", None)
    if not splits or "train" not in splits:
        return
    keep = kept_labels(splits["train"].targets)
    lengths = prompt_lengths(keep)[keep.any(1)]
    if not len(lengths) or bool((lengths == 1).all()):
        raise KDError(
            f"distill.on_policy completes prompts, but every training row of {type(datamodule).__name__} is "
            "learned from its first token (running text has no prompts); use chat data (data=chat) or "
            "prompt/completion pairs."
        )
    longest = int(lengths.max())
    new = max(
        on_policy.max_new_tokens
        for on_policy in (settings.on_policy, *settings.on_policy_stages.values())
        if on_policy.samples
    )
    context = context_length(student)
    if context and longest + new > context:
        raise KDError(
            f"distill.on_policy.max_new_tokens={new} after prompts of up to {longest} tokens exceeds the "
            f"student's context of {context}; lower max_new_tokens (or shorten the prompts)."
        )


def packs(datamodule: Any) -> bool:
    """Whether the batches pack several examples into a row (``data.packing=true``)."""
    return bool(getattr(datamodule, "packing", False))


def check_tokenizers(settings: Settings, datamodule: Any) -> None:
    """A pretrained teacher or student whose folder has a tokenizer other than the run's (``data.tokenizer``) is
    refused: token-level KD compares the two models id by id."""
    run_tokenizer, run_path = getattr(datamodule, "tokenizer", None), getattr(datamodule, "pretrained", None)
    if run_tokenizer is None:
        return
    for role, model in (("teacher", settings.teacher.model.settings), ("student", settings.student.settings)):
        folder = Path(str(model.get("path"))) if is_pretrained(model) else None
        if (
            folder is None
            or not folder.is_dir()
            or str(model.get("path")) == str(run_path)
            or not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
        ):
            continue
        theirs = pretrained_tokenizer(str(folder))
        check_same_tokenizer(theirs, run_tokenizer) if role == "teacher" else check_same_tokenizer(
            run_tokenizer, theirs
        )
