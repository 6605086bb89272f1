"""The two wings: the library (everything in ``kd_lightning/`` but ``run/``) never imports the run wing, and no module
imports itself back through others. Read from the source with ``ast``: every import written in a module counts, the
ones inside functions too (a package's ``__init__`` counts when it is named; the parents Python imports on the way
do not)."""

from __future__ import annotations

import ast
import itertools
import sys
from collections import Counter
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kd_lightning"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """``{module: the kd_lightning modules it imports}``."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
        graph[name] = {module for module in found if module in modules and module != name}
    return graph


def in_run_wing(module: str) -> bool:
    return module == "kd_lightning.run" or module.startswith("kd_lightning.run.")


def test_the_library_never_imports_the_run_wing() -> None:
    upward = {
        (module, target)
        for module, targets in imports().items()
        for target in targets
        if not in_run_wing(module) and module != "kd_lightning.__main__" and in_run_wing(target)
    }
    assert not upward, sorted(upward)


def test_no_module_imports_itself_back() -> None:
    graph = imports()

    def reaches(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo += graph[module]
        return seen

    cycles = sorted(module for module in graph if module in reaches(module))
    assert not cycles, cycles


def config_trail(run) -> list[tuple[str, str]]:
    """``(file, function)`` of each call into ``kd_lightning`` that receives a config node (an OmegaConf ``DictConfig``
    or ``ListConfig``) among its arguments, in the order the calls happen while ``run()`` runs."""
    from omegaconf import DictConfig, ListConfig

    package, calls = f"{PACKAGE}/", []

    def profile(frame, event: str, arg) -> None:
        code = frame.f_code
        if event != "call" or not code.co_filename.startswith(package):
            return
        arguments = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
        if any(isinstance(frame.f_locals.get(name), (DictConfig, ListConfig)) for name in arguments):
            calls.append((code.co_filename.removeprefix(package), code.co_name))

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return calls


@pytest.mark.parametrize(
    "overrides",
    [
        [],  # the digits demo: a teacher trained here, the student distilled and alone
        ["teacher.mode=recorded", "baseline=false"],
        [
            "+recipe=lm_shakespeare",
            "data.val_works=[beta]",
            "data.test_works=[gamma]",
            "data.vocab_size=300",
            "data.block_size=16",
            "teacher.model.dim=32",
            "teacher.model.depth=1",
            "student.model.dim=16",
            "student.model.depth=1",
            "speed.chunk_rows=24",
            "baseline=false",
        ],
        ["+recipe=onpolicy_arithmetic", "baseline=false"],  # on-policy stages, exact match
    ],
    ids=["digits", "recorded", "text", "on-policy"],
)
def test_the_config_stays_in_the_run_wing(make_cfg, tmp_path: Path, overrides: list[str]) -> None:
    """Where a run's config travels, measured on a run (``sys.setprofile``): every call that receives a config node.
    None lies below ``run/``; ``settings.py``, which reads the config, and ``config.py`` (Hydra's side) are each
    entered at most twice, every other file at most three times (a stay: consecutive calls in one file)."""
    from data_factory import make_corpus

    from kd_lightning.run.train import train

    corpus = [f"data.data_dir={make_corpus(tmp_path / 'corpus')}"] if "+recipe=lm_shakespeare" in overrides else []
    cfg = make_cfg(*overrides, *corpus, "trainer.fast_dev_run=true", output_dir=tmp_path / "run")
    calls = config_trail(lambda: train(cfg))
    assert calls[:2] == [("run/train.py", "train"), ("run/settings.py", "from_config")]
    below = sorted({call for call in calls if not call[0].startswith("run/")})
    assert not below, below
    stays = Counter(file for file, _ in itertools.groupby(file for file, _ in calls))
    most = {"run/settings.py": 2, "run/config.py": 2}
    assert all(count <= most.get(file, 3) for file, count in stays.items()), stays
