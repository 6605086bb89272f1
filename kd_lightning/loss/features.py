"""Feature distillation: intermediate activations matched through forward hooks.

Layer pairs are declared by module path (``model.get_submodule(path)``), e.g.
``distill.features=[{student: layer3, teacher: layer3, loss: fitnet, weight: 100}]``; the
user's model and its ``forward`` stay untouched. Losses:

- ``fitnet`` (FitNets hints, Romero et al. 2015): MSE between the teacher's feature and the
  student's after a learned adapter: a 1x1 conv for ``(N, C, H, W)`` maps, a linear layer
  for ``(N, D)`` / ``(N, L, D)`` vectors, sized from the shapes seen in a dry run;
- ``mse``: the same without an adapter (shapes must already agree);
- ``attention`` (attention transfer, Zagoruyko & Komodakis 2017): MSE between the
  L2-normalised spatial maps ``mean_c f^p`` (``p=2``) of ``(N, C, H, W)`` features.

Feature maps of different spatial size are average-pooled to the smaller one. The adapters
are trained with the student (they are in the optimizer) and never part of the exported student.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from kd_lightning.errors import KDError

LOSSES = ("fitnet", "mse", "attention")


@dataclass
class FeatureTerm:
    """One feature loss: ``student`` / ``teacher`` module paths, ``loss``, ``weight``, logged as ``name``."""

    student: str
    teacher: str
    loss: str = "fitnet"
    weight: float = 1.0
    name: str | None = None
    p: float = 2.0  # attention: exponent of the activation map

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise KDError(f"feature loss must be one of {', '.join(LOSSES)}, got {self.loss!r} (in distill.features).")
        if self.name is None:
            self.name = f"{'at' if self.loss == 'attention' else self.loss}/{self.student}"


def _as_terms(specs: Iterable[FeatureTerm | Mapping[str, Any]] | None) -> list[FeatureTerm]:
    terms = []
    for spec in specs or []:
        if isinstance(spec, FeatureTerm):
            terms.append(spec)
            continue
        try:
            terms.append(FeatureTerm(**dict(spec)))
        except TypeError as exc:
            raise KDError(
                f"distill.features entry {dict(spec)}: {exc}; an entry takes student, teacher, loss, "
                "weight, name (and p for attention)."
            ) from None
    names = [t.name for t in terms]
    if len(set(names)) != len(names):
        raise KDError(f"distill.features has two terms named alike ({names}); give them distinct name=... values.")
    return terms


def _first_tensor(output: Any) -> Tensor:
    """A hooked module's output, or the first tensor of a tuple/list output."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise KDError(f"a hooked module returned {type(output).__name__}; feature distillation needs a tensor output.")


def _match_spatial(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool the larger of two ``(N, C, H, W)`` maps to the other's ``H x W``."""
    if student.dim() != 4 or student.shape[-2:] == teacher.shape[-2:]:
        return student, teacher
    if student.shape[-1] > teacher.shape[-1]:
        return F.adaptive_avg_pool2d(student, teacher.shape[-2:]), teacher
    return student, F.adaptive_avg_pool2d(teacher, student.shape[-2:])


def attention_map(feature: Tensor, p: float) -> Tensor:
    """``(N, C, H, W)`` -> ``(N, H·W)``: ``normalize(mean_c |f|^p)`` (Zagoruyko & Komodakis 2017)."""
    return F.normalize(feature.abs().pow(p).mean(1).flatten(1), dim=1)


def _build_adapter(student: Tensor, teacher: Tensor) -> nn.Module:
    """1x1 conv for feature maps, linear for vectors: student channels -> teacher channels."""
    if student.dim() == 4 and teacher.dim() == 4:
        return nn.Conv2d(student.shape[1], teacher.shape[1], kernel_size=1)
    if student.dim() == teacher.dim() and student.dim() in (2, 3):
        return nn.Linear(student.shape[-1], teacher.shape[-1])
    raise KDError(
        f"cannot build an adapter from a student feature of shape {tuple(student.shape)} to a teacher "
        f"feature of shape {tuple(teacher.shape)}; pair layers whose outputs are both maps or both vectors."
    )


class FeatureDistiller(nn.Module):
    """Hooks on student and teacher layers, the adapters, and the feature loss terms.

    Lifecycle: :meth:`attach` registers the hooks, :meth:`build_adapters` sizes the adapters
    from one dry run, :meth:`losses_from_captured` computes the (unweighted) loss of each term
    from the features captured by the last forward passes, :meth:`detach` removes the hooks.
    """

    def __init__(self, terms: Iterable[FeatureTerm | Mapping[str, Any]]) -> None:
        super().__init__()
        self.terms = _as_terms(terms)
        self.adapters = nn.ModuleDict()  # str(term index) -> adapter, fitnet terms only
        self.handles: list[RemovableHandle] = []
        self.captured: dict[str, dict[str, Tensor]] = {"student": {}, "teacher": {}}
        self.capturing = False

    @property
    def attached(self) -> bool:
        return bool(self.handles)

    def layers(self, student: nn.Module, teacher: nn.Module) -> list[tuple[str, str, nn.Module]]:
        """``(side, path, module)`` of every distinct hooked layer; a missing path is refused with the fix."""
        found = []
        for side, model, paths in (
            ("student", student, {t.student for t in self.terms}),
            ("teacher", teacher, {t.teacher for t in self.terms}),
        ):
            for path in sorted(paths):
                try:
                    found.append((side, path, model.get_submodule(path)))
                except AttributeError:
                    names = [n for n, _ in model.named_modules() if n and "." not in n]
                    raise KDError(
                        f"the {side} has no module {path!r} for feature distillation; its top-level modules "
                        f"are {names}. Use a path from model.named_modules(), e.g. layer3 or features.3."
                    ) from None
        return found

    def check_paths(self, student: nn.Module, teacher: nn.Module) -> None:
        """Refuse a term whose layer path is in neither model (before anything trains)."""
        self.layers(student, teacher)

    def attach(self, student: nn.Module, teacher: nn.Module) -> None:
        """Register one forward hook per distinct layer path (idempotent)."""
        self.detach()
        for side, path, layer in self.layers(student, teacher):
            self.handles.append(layer.register_forward_hook(self._hook(side, path)))

    def _hook(self, side: str, path: str):
        def capture(module: nn.Module, inputs: Any, output: Any) -> None:
            if self.capturing:
                self.captured[side][path] = _first_tensor(output)

        return capture

    def detach(self) -> None:
        """Remove every hook this distiller registered."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.clear()

    def clear(self) -> None:
        self.captured = {"student": {}, "teacher": {}}

    def prepare(self, student: nn.Module, teacher: nn.Module, datamodule: Any, fitting: bool) -> None:
        """Hook the layers and, before fitting (the optimizer is built next), size the adapters from the datamodule's
        ``example_input()``."""
        if not self.attached:
            self.attach(student, teacher)
        if not fitting:
            return
        if not hasattr(datamodule, "example_input"):
            raise KDError(
                "feature distillation sizes its adapters from an example input: give the datamodule an "
                "example_input() method, or call module.loss_mix.features.build_adapters(student, teacher, x) first."
            )
        self.build_adapters(student, teacher, datamodule.example_input())

    def build_adapters(self, student: nn.Module, teacher: nn.Module, example_input: Tensor) -> None:
        """Run both models once on ``example_input`` (eval mode, no grad) and create the missing adapters."""
        needed = [i for i, t in enumerate(self.terms) if t.loss == "fitnet" and str(i) not in self.adapters]
        if not needed:
            return
        was_training = student.training
        student.eval()
        self.capturing = True
        try:
            with torch.no_grad():
                teacher(example_input)
                student(example_input)
            for i in needed:
                term = self.terms[i]
                self.adapters[str(i)] = _build_adapter(
                    self.captured["student"][term.student], self.captured["teacher"][term.teacher]
                )
        finally:
            self.capturing = False
            self.clear()
            student.train(was_training)

    def losses_from_captured(self) -> dict[str, Tensor]:
        """``{name: loss}`` for every term, from the features captured by the last forward passes."""
        out = {}
        for i, term in enumerate(self.terms):
            try:
                s = self.captured["student"][term.student].float()
                t = self.captured["teacher"][term.teacher].detach().float()
            except KeyError as exc:
                raise KDError(
                    f"feature term {term.name}: layer {exc} produced no output in this step; the layer is "
                    "not on the forward path of the model."
                ) from None
            if term.loss == "fitnet":
                if str(i) not in self.adapters:
                    raise KDError(
                        "feature adapters are not built; call build_adapters(student, teacher, x) before training."
                    )
                s = self.adapters[str(i)](s)
            s, t = _match_spatial(s, t)
            if term.loss == "attention":
                if s.dim() != 4 or t.dim() != 4:
                    raise KDError(
                        f"attention transfer ({term.name}) needs (N, C, H, W) feature maps, got "
                        f"{tuple(s.shape)} and {tuple(t.shape)}."
                    )
                loss = (attention_map(s, term.p) - attention_map(t, term.p)).pow(2).mean()
            else:
                if s.shape != t.shape:
                    raise KDError(
                        f"feature term {term.name}: student {tuple(s.shape)} vs teacher {tuple(t.shape)}; "
                        "use loss: fitnet to learn an adapter between different widths."
                    )
                loss = F.mse_loss(s, t)
            out[term.name] = loss
        return out


def check_live_teacher(features: Any, live: bool) -> None:
    """Feature terms read the live teacher's activations: refused with a recorded teacher."""
    if features and not live:
        raise KDError(
            "distill.features needs the live teacher's activations; set teacher.mode=live "
            "(a recorded teacher has logits only)."
        )
