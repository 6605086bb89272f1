"""Where a language-model step's sequences come from: the data set's completions, or completions sampled for the
batch's prompts by the current student (on-policy distillation, GKD's lambda) or by the teacher (sequence-level KD).

``distill.on_policy``: ``fraction`` is the chance that a training batch's completions are the student's own,
``teacher_fraction`` the chance that they are the teacher's; otherwise the batch is the data set's, as it came.
The choice and the samples are drawn from a generator seeded by the run's seed and the step, so a run resumed from
a checkpoint samples exactly what the uninterrupted one did.

A prompt is every token of a row before its first learned label: ``inputs[:j + 1]`` when ``labels[j]`` is the first
kept label (the token at ``j`` predicts the completion's first token). Prompts are aligned on the right (padding on
the left) for generation; the completion is labelled like a data set's: the prompt is ``-100``, and so is
everything after the completion's first EOS (which is learned); rows are padded on the right. Generation sits
behind :func:`generate`: the built-in ``GPT``'s cached ``generate()`` or transformers' ``generate()``, in eval mode,
under ``no_grad``, with the current weights. Another generator (a vLLM server) would be another branch there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from kd_lightning.data.batch import IGNORE_INDEX, Batch, kept_labels, with_kept
from kd_lightning.errors import KDError, check_integer, is_number

SOURCES = ("data", "student", "teacher")


@dataclass(frozen=True)
class OnPolicy:
    """``distill.on_policy``: how often a batch's completions are sampled, and how.

    Args:
        fraction: the chance that a training batch is the student's own samples (GKD's lambda; 0: off-policy).
        teacher_fraction: the chance that it is the teacher's samples (sequence-level KD).
        max_new_tokens: the longest sampled completion.
        temperature, top_k, top_p: sampling settings (``temperature > 0``; ``greedy=true`` for the likeliest token).
        greedy: the likeliest token instead of a draw.
        after_steps: optimizer steps that train on the data set's completions before any batch is sampled (a student
            that writes noise learns little from the teacher's scores of it; GKD and its successors start from a
            student that was fine-tuned first).
    """

    fraction: float = 0.0
    teacher_fraction: float = 0.0
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    greedy: bool = False
    after_steps: int = 0

    def __post_init__(self) -> None:
        for key in ("fraction", "teacher_fraction"):
            value = getattr(self, key)
            if not is_number(value) or not 0 <= value <= 1:
                raise KDError(
                    f"distill.on_policy.{key} must be in [0, 1] (the chance that a batch is sampled), got {value!r}."
                )
        if self.fraction + self.teacher_fraction > 1:
            raise KDError(
                f"distill.on_policy.fraction + teacher_fraction must be at most 1 (the chances of one batch), "
                f"got {self.fraction} + {self.teacher_fraction}."
            )
        check_integer("distill.on_policy.max_new_tokens", self.max_new_tokens)
        check_integer("distill.on_policy.after_steps", self.after_steps, least=0)
        if not (is_number(self.temperature) and self.temperature > 0):
            raise KDError(
                f"distill.on_policy.temperature must be > 0, got {self.temperature!r}; "
                + (
                    "greedy=true takes the likeliest token whatever it is (leave it at 1)."
                    if self.greedy
                    else "for the likeliest token set distill.on_policy.greedy=true."
                )
            )
        if self.top_k is not None:
            check_integer("distill.on_policy.top_k", self.top_k)
        if self.top_p is not None and not (is_number(self.top_p) and 0 < self.top_p <= 1):
            raise KDError(f"distill.on_policy.top_p must be in (0, 1], got {self.top_p!r}.")

    @property
    def samples(self) -> bool:
        """Whether any batch is sampled."""
        return self.fraction > 0 or self.teacher_fraction > 0


class Sequences:
    """The sequences of each training step: :meth:`__call__` gives the batch the step trains on."""

    def __init__(self, settings: OnPolicy, eos_token_id: int | None, pad_token_id: int = 0) -> None:
        self.settings, self.eos_token_id, self.pad_token_id = settings, eos_token_id, pad_token_id
        self.buffered: dict[int, Batch] = {}  # an optimizer step's sampled batches, by their place in it
        self.buffered_key: tuple[int, int] | None = None  # (optimizer step, its first micro-batch)

    @classmethod
    def of(cls, settings: OnPolicy, datamodule: Any) -> Sequences | None:
        """The run's sequences, with the EOS and padding ids of ``datamodule``'s tokenizer; ``None`` when nothing is
        sampled."""
        return cls(settings, *token_ids(datamodule)) if settings.samples else None

    def describe(self) -> str:
        s = self.settings
        how = (
            "greedy"
            if s.greedy
            else f"temperature {s.temperature}"
            + (f", top_k {s.top_k}" if s.top_k else "")
            + (f", top_p {s.top_p}" if s.top_p is not None else "")
        )
        after = f" after step {s.after_steps}" if s.after_steps else ""
        return (
            f"student {s.fraction:g}, teacher {s.teacher_fraction:g} of the batches{after}, up to {s.max_new_tokens} "
            f"tokens, {how}"
        )

    def generator(self, step: int, micro_batch: int) -> torch.Generator:
        """The random state of one micro-batch of one optimizer step: the run's seed, the step, the micro-batch."""
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))  # set by lightning.seed_everything
        return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + micro_batch)

    def source(self, generator: torch.Generator) -> str:
        """``data``, ``student`` or ``teacher``, with the chances of the settings."""
        draw = float(torch.rand((), generator=generator))
        if draw < self.settings.fraction:
            return "student"
        return "teacher" if draw < self.settings.fraction + self.settings.teacher_fraction else "data"

    def __call__(
        self, batch: Batch, student: nn.Module, teacher: nn.Module | None, step: int, micro_batch: int = 0
    ) -> Batch:
        """The batch to train on: ``batch`` itself, or its prompts completed by the student or the teacher.

        ``micro_batch`` is the batch's index in the epoch. A batch served with the batches of its optimizer step
        (``step_batches``, ``speed.generate_per_step``) is completed from :meth:`sampled_step`, made once for the whole
        step (each model's completions in one call) at its first batch, or at the first the step meets after a restart.
        """
        step_batches = batch.pop("step_batches", None)
        position = batch.pop("step_position", 0)
        if not self.settings.samples or step < self.settings.after_steps:
            return batch
        first = micro_batch - position
        if step_batches is None:
            return self.sampled_step([batch], student, teacher, step, micro_batch).get(0, batch)
        if self.buffered_key != (step, first):
            self.buffered = self.sampled_step([with_kept(b) for b in step_batches], student, teacher, step, first)
            self.buffered_key = (step, first)
        return self.buffered.get(position, batch)

    def sampled_step(
        self, batches: list[Batch], student: nn.Module, teacher: nn.Module | None, step: int, first: int
    ) -> dict[int, Batch]:
        """``{position: batch}``: the batches of ``batches`` (micro-batches ``first, first + 1, ...`` of optimizer step
        ``step``) whose source is a model, completed by it; each model completes all of its batches in one call.

        Each batch's source is drawn from its own :meth:`generator`, as if it were sampled alone; the seed of a model's
        call is drawn next from the generator of its first batch."""
        generators = [self.generator(step, first + position) for position in range(len(batches))]
        sources = [self.source(generator) for generator in generators]
        completed_batches: dict[int, Batch] = {}
        for source, model in (("student", student), ("teacher", teacher)):
            positions = [position for position, drawn in enumerate(sources) if drawn == source]
            if not positions:
                continue
            if model is None:
                raise KDError(
                    "distill.on_policy.teacher_fraction > 0 needs a live teacher to sample from (teacher.mode=live)."
                )
            blocks = [prompts_of(batches[position], self.pad_token_id) for position in positions]
            prompts = left_padded([block for block, _ in blocks], self.pad_token_id)
            mask = left_padded([block_mask for _, block_mask in blocks], 0)
            seed = int(torch.randint(2**62, (), generator=generators[positions[0]]))
            made = generate(model, prompts, mask, self.settings, self.eos_token_id, self.pad_token_id, seed)
            sizes = [len(block) for block, _ in blocks]
            for position, rows in zip(positions, torch.arange(sum(sizes)).split(sizes)):
                completed_batches[position] = completed(
                    prompts[rows], mask[rows], made[rows, prompts.shape[1] :], self.eos_token_id, self.pad_token_id
                )
        return completed_batches


def left_padded(rows: list[Tensor], value: int) -> Tensor:
    """``(sum N, max P)``: the ``(N, P)`` blocks of ``rows`` stacked, each widened on the left with ``value``."""
    width = max(block.shape[1] for block in rows)
    return torch.cat([nn.functional.pad(block, (width - block.shape[1], 0), value=value) for block in rows])


def token_ids(datamodule: Any) -> tuple[int | None, int]:
    """``(EOS, padding)`` ids of ``datamodule``'s tokenizer (padding: its ``pad_id()``, else EOS, else 0)."""
    eos = getattr(getattr(datamodule, "tokenizer", None), "eos_token_id", None)
    return eos, datamodule.pad_id() if hasattr(datamodule, "pad_id") else (eos if eos is not None else 0)


def context_length(model: nn.Module) -> int | None:
    """The most positions ``model`` reads (``GPT.context_length``, a transformers config's), ``None`` if unknown."""
    config = getattr(model, "config", None)
    return (
        getattr(model, "context_length", None)
        or getattr(config, "max_position_embeddings", None)
        or getattr(config, "n_positions", None)
    )


def prompt_lengths(keep: Tensor) -> Tensor:
    """``(N,)``: each row's prompt length, its tokens up to the first kept label's position (that token predicts the
    completion's first); rows must have one."""
    return keep.long().argmax(1) + 1


def prompts_of(batch: Batch, pad_token_id: int) -> tuple[Tensor, Tensor]:
    """``(prompts (N, P), mask (N, P))``: each row's tokens up to its first kept label, aligned on the right."""
    inputs, keep = batch["inputs"], batch.get("kept", kept_labels(batch["labels"]))
    if not keep.any(1).all():
        raise KDError(
            "on-policy distillation needs a prompt and a completion in every row (a learned label after the "
            "prompt); a row of the batch has no learned token. Use chat data (data=chat) or prompt/completion pairs."
        )
    lengths = prompt_lengths(keep)
    width = int(lengths.max())
    prompts = torch.full((len(inputs), width), pad_token_id, dtype=inputs.dtype, device=inputs.device)
    mask = torch.zeros((len(inputs), width), dtype=torch.long, device=inputs.device)
    for row, length in enumerate(lengths.tolist()):
        prompts[row, width - length :] = inputs[row, :length]
        mask[row, width - length :] = 1
    return prompts, mask


def generate(
    model: nn.Module,
    prompts: Tensor,
    mask: Tensor,
    settings: OnPolicy,
    eos_token_id: int | None,
    pad_token_id: int,
    seed: int,
) -> Tensor:
    """``(N, P + T)``: ``prompts`` continued by ``model`` (the built-in GPT's cached ``generate()``, or transformers'),
    in eval mode, under ``no_grad``, from ``seed``."""
    from kd_lightning.sharding import for_generation, is_sharded

    model = for_generation(model)  # a sharded model's whole copy, with speed.generate_whole
    training, synced = model.training, is_sharded(model)  # sharded: every process takes every step together
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[prompts.device] if prompts.is_cuda else []):
            torch.manual_seed(seed)
            if hasattr(model, "hidden_states") and hasattr(model, "generate"):  # kd_lightning.models.GPT
                return model.generate(
                    prompts,
                    settings.max_new_tokens,
                    prompt_mask=mask,
                    greedy=settings.greedy,
                    temperature=settings.temperature,
                    top_k=settings.top_k,
                    top_p=settings.top_p,
                    eos_token_id=eos_token_id,
                    synced=synced,
                )
            if callable(getattr(model, "generate", None)) and hasattr(model, "generation_config"):  # transformers
                sampling: dict[str, Any] = (
                    {"do_sample": False}
                    if settings.greedy
                    else {
                        "do_sample": True,
                        "temperature": settings.temperature,
                        "top_k": settings.top_k or 0,
                        "top_p": settings.top_p if settings.top_p is not None else 1.0,
                    }
                )
                return model.generate(
                    input_ids=prompts,
                    attention_mask=mask,
                    max_new_tokens=settings.max_new_tokens,
                    eos_token_id=eos_token_id,
                    pad_token_id=pad_token_id,
                    synced_gpus=synced,
                    **sampling,
                )
    finally:
        model.train(training)
    raise KDError(
        f"on-policy distillation samples from the model, but {type(model).__name__} has no generate(); use "
        "kd_lightning.models.GPT or a transformers causal LM."
    )


def completed(prompts: Tensor, mask: Tensor, completions: Tensor, eos_token_id: int | None, pad_token_id: int) -> Batch:
    """The batch of each real prompt followed by its completion up to and including its first EOS, padded on the
    right: ``inputs`` and ``labels`` (the next tokens; ``-100`` on the prompt, after the completion and on padding)."""
    rows = []
    for row in range(len(prompts)):
        completion = completions[row]
        if eos_token_id is not None and (completion == eos_token_id).any():
            completion = completion[: int((completion == eos_token_id).nonzero()[0]) + 1]
        rows.append((prompts[row][mask[row].bool()], completion))
    width = max(len(prompt) + len(completion) for prompt, completion in rows) - 1
    inputs = torch.full((len(rows), width), pad_token_id, dtype=prompts.dtype, device=prompts.device)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=prompts.dtype, device=prompts.device)
    for row, (prompt, completion) in enumerate(rows):
        tokens = torch.cat([prompt, completion])
        inputs[row, : len(tokens) - 1] = tokens[:-1]
        labels[row, len(prompt) - 1 : len(tokens) - 1] = completion
    return with_kept(Batch(inputs=inputs, labels=labels))


@dataclass(frozen=True)
class Answers:
    """A task whose prompts each have one right completion (``data.exact_match``): the greedy completion of each
    prompt, up to its first EOS, must be the labelled one (``{split}/exact_match``)."""

    eos_token_id: int | None
    pad_token_id: int = 0

    @classmethod
    def of(cls, datamodule: Any) -> Answers | None:
        return cls(*token_ids(datamodule)) if getattr(datamodule, "exact_match", False) else None

    def matches(self, model: nn.Module, batch: Batch) -> Tensor:
        """``(N,)`` float: 1 where ``model``'s greedy completion of the row's prompt is exactly its labelled completion."""
        keep = batch.get("kept", kept_labels(batch["labels"]))
        prompts, mask = prompts_of(batch, self.pad_token_id)
        wanted = [batch["labels"][row][keep[row]] for row in range(len(keep))]
        settings = OnPolicy(greedy=True, max_new_tokens=max(len(w) for w in wanted))
        made = completed(
            prompts,
            mask,
            generate(model, prompts, mask, settings, self.eos_token_id, self.pad_token_id, 0)[:, prompts.shape[1] :],
            self.eos_token_id,
            self.pad_token_id,
        )
        return torch.tensor(
            [float(torch.equal(made["labels"][row][made["kept"][row]], wanted[row])) for row in range(len(keep))],
            device=prompts.device,
        )


class SampleScores:
    """What the student writes for held-out prompts (``{split}/sample_*`` in every student stage): one completion per
    prompt, sampled with the run's ``distill.on_policy`` settings from a seed fixed per batch (at most as many tokens
    as fit in the student's context after the prompts), scored by the teacher.

    - ``sample_teacher_nll``: the teacher's negative log-likelihood per completion token (lower: the teacher would
      have written it);
    - ``sample_reverse_kl``: ``KL(p_s ‖ p_t)`` per completion token, at temperature 1 (what on-policy KD minimises);
    - ``sample_distinct_2``: distinct token pairs over all pairs of the batch's completions (near 0: collapse);
    - ``sample_tokens_per_s``: completion tokens made per second of generation.
    """

    NAMES = ("sample_teacher_nll", "sample_reverse_kl", "sample_distinct_2", "sample_tokens_per_s")

    def __init__(self, settings: OnPolicy, eos_token_id: int | None, pad_token_id: int = 0) -> None:
        self.settings, self.eos_token_id, self.pad_token_id = settings, eos_token_id, pad_token_id

    @classmethod
    def of(cls, settings: OnPolicy, datamodule: Any, sampled: bool) -> SampleScores | None:
        """Scores for a run that samples in some stage (``sampled``), or a task with answers; ``None`` otherwise
        (generating for every held-out prompt of a large chat set each epoch costs more than most runs want)."""
        if not sampled and not getattr(datamodule, "exact_match", False):
            return None
        return cls(settings, *token_ids(datamodule))

    def __call__(
        self, student: nn.Module, teacher: nn.Module | None, batch: Batch, seed: int
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """``{name: (value, weight)}`` for ``batch``'s prompts: the teacher's scores only with a live ``teacher``."""
        from time import perf_counter

        from kd_lightning.models.outputs import model_logits

        prompts, mask = prompts_of(batch, self.pad_token_id)
        settings, context = self.settings, context_length(student)
        if context and prompts.shape[1] + settings.max_new_tokens > context:  # what fits after these prompts
            settings = replace(settings, max_new_tokens=max(1, context - prompts.shape[1]))
        started = perf_counter()
        made = generate(student, prompts, mask, settings, self.eos_token_id, self.pad_token_id, seed)
        seconds = perf_counter() - started
        samples = completed(prompts, mask, made[:, prompts.shape[1] :], self.eos_token_id, self.pad_token_id)
        kept, tokens = samples["kept"], samples["kept"].sum()
        scores = {
            "sample_distinct_2": distinct_pairs(samples),
            "sample_tokens_per_s": (tokens / max(seconds, 1e-9), torch.tensor(seconds)),
        }
        if teacher is not None:
            with torch.no_grad():
                student_log_p = model_logits(student, samples).float().log_softmax(-1)
                teacher_log_p = model_logits(teacher, samples).float().log_softmax(-1)
            width = min(student_log_p.shape[-1], teacher_log_p.shape[-1])  # the rows both models share
            student_log_p, teacher_log_p = student_log_p[..., :width], teacher_log_p[..., :width]
            drawn = samples["labels"].clamp_min(0)[..., None]
            nll = -teacher_log_p.gather(-1, drawn).squeeze(-1)
            reverse_kl = (student_log_p.exp() * (student_log_p - teacher_log_p)).sum(-1)
            scores["sample_teacher_nll"] = (nll[kept].sum() / tokens.clamp_min(1), tokens)
            scores["sample_reverse_kl"] = (reverse_kl[kept].sum() / tokens.clamp_min(1), tokens)
        return scores


def distinct_pairs(samples: Batch) -> tuple[Tensor, Tensor]:
    """``(distinct-2, pairs)``: the share of distinct adjacent token pairs among all pairs of the completions."""
    labels, kept = samples["labels"], samples["kept"]
    completions = [labels[row][kept[row]].tolist() for row in range(len(labels))]
    pairs = [pair for tokens in completions for pair in zip(tokens, tokens[1:])]
    return torch.tensor(len(set(pairs)) / max(len(pairs), 1)), torch.tensor(float(len(pairs)))
