"""``python -m kd_lightning.run.report MULTIRUN_DIR``: one table of every job of a sweep.

Reads each job's ``metrics.json`` (test accuracies in %; for language models test perplexities, with ``gain`` the
distilled student's change in perplexity over the student alone's, in %; for a task with answers greedy exact match
in %, with a column for each stage of ``distill.on_policy_stages``; for the slippery walk the share of walks finished
with slips at the hardest ``q``) and the overrides Hydra recorded for it
(``.hydra/overrides.yaml``), prints the table, writes ``report.csv`` into the sweep
directory, and marks jobs that left no results as failed, with the one-line reason they
recorded (``error.txt``), or as unfinished when they recorded none (still running, or killed). A job
whose ``metrics.json`` or ``.hydra/overrides.yaml`` cannot be read (truncated, not what a run writes, a folder) is
marked unreadable; the others are reported as usual. For an Optuna search it also names the best trial.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

import yaml

from kd_lightning.files import atomic_write
from kd_lightning.run.plots import plot_sweep

FAILURE_FILE = "error.txt"  # written by kd_lightning.run.cli for a failed sweep job
COLUMNS = [("teacher", "teacher"), ("baseline", "alone"), ("distilled", "distilled")]
# a row's keys that are not a stage's figure
REPORTED = {"job", "overrides", "error", "status", "measure", "teacher", "alone", "distilled", "val", "gain"}


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_results(results_file: Path) -> tuple[dict | None, str | None]:
    """A job's ``metrics.json``, or why it cannot be used: ``(results, None)``, ``(None, reason)``, or
    ``(None, None)`` when there is none."""
    if not results_file.exists():
        return None, None
    if not results_file.is_file():
        return None, f"{results_file} is not a file; move it away or rerun the job"
    try:
        results = json.loads(results_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        return None, f"{results_file} is unreadable ({' '.join(str(error).split())}); delete it or rerun the job"
    sections = [results.get(key) for key, _ in COLUMNS] if isinstance(results, dict) else [0]
    numbers = (
        [results.get(key) for key in ("gain", "distilled_val_acc", "objective")] if isinstance(results, dict) else []
    )
    if not all(
        section is None or (isinstance(section, dict) and all(is_number(v) for v in section.values()))
        for section in sections
    ) or not all(n is None or is_number(n) for n in numbers):
        return None, f"{results_file} does not hold a run's results; delete it or rerun the job"
    return results, None


def read_overrides(overrides_file: Path) -> tuple[list[str], str | None]:
    """A job's overrides as Hydra recorded them (``.hydra/overrides.yaml``): ``(overrides, None)``, or ``([], reason)``
    when the file cannot be read as a list of overrides."""
    try:
        overrides = yaml.safe_load(overrides_file.read_text()) or []
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        return [], f"{overrides_file} is unreadable ({' '.join(str(error).split())}); its settings are unknown"
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        return [], f"{overrides_file} is not a list of overrides; its settings are unknown"
    return overrides, None


def collect(sweep_dir: Path) -> list[dict[str, str | float | None]]:
    """One row per job directory: its overrides, test accuracies (%), the distilled student's validation accuracy (``val``, what a search maximises) and status."""
    rows = []
    jobs = sorted(
        (p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")), key=lambda p: (len(p.name), p.name)
    )
    for job in jobs:
        overrides, unreadable = read_overrides(job / ".hydra" / "overrides.yaml")
        row: dict[str, str | float | None] = {"job": job.name, "overrides": " ".join(overrides)}
        results, unreadable_results = read_results(job / "metrics.json")
        unreadable = unreadable or unreadable_results
        results = None if unreadable else results
        failure = job / FAILURE_FILE
        row["error"] = unreadable or (failure.read_text().strip() if not results and failure.is_file() else None)
        row["status"] = (
            "ok" if results else "unreadable" if unreadable else "FAILED" if row["error"] is not None else "unfinished"
        )
        language = any("test/ppl" in ((results or {}).get(key) or {}) for key, _ in COLUMNS)
        answers = "test/exact_match" in ((results or {}).get("distilled") or {})
        walks = "test/success" in ((results or {}).get("distilled") or {})
        row["measure"] = "success" if walks else "exact_match" if answers else "ppl" if language else "acc"
        for key, name in COLUMNS + [(stage, stage) for stage in (results or {}).get("on_policy_stages", [])]:
            value = ((results or {}).get(key) or {}).get(f"test/{row['measure']}")
            row[name] = None if value is None else round(value if row["measure"] == "ppl" else 100 * value, 2)
        if answers or walks:
            row["gain"] = (
                None if row["alone"] is None or row["distilled"] is None else round(row["distilled"] - row["alone"], 2)
            )
        elif language:
            row["gain"] = None if "ppl_ratio" not in results else round(100 * (results["ppl_ratio"] - 1), 2)
        else:
            row["gain"] = None if not results or "gain" not in results else round(100 * results["gain"], 2)
        val = results.get("distilled_val_acc", results.get("objective")) if results else None  # "objective": before 0.5
        row["val"] = None if val is None else round(100 * val, 2)
        rows.append(row)
    return rows


def best_trial(sweep_dir: Path, rows: list[dict]) -> str | None:
    """The best trial of an Optuna search (``optimization_results.yaml``), by the distilled student's validation accuracy."""
    results_file = sweep_dir / "optimization_results.yaml"
    if not results_file.is_file():
        return None
    found = yaml.safe_load(results_file.read_text())
    settings = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in found["best_params"].items())
    job = next((r["job"] for r in rows if r["val"] == round(100 * found["best_value"], 2)), None)
    return f"best of {len(rows)} trials: validation accuracy {100 * found['best_value']:.2f}% with {settings}" + (
        f" (job {job})" if job is not None else ""
    )


def format_table(rows: list[dict]) -> str:
    """Rows as aligned text, with a mean row over the successful jobs."""
    stages = [name for name in dict.fromkeys(key for r in rows for key in r) if name not in REPORTED]
    numbers = ["teacher", "alone", "distilled", *stages, "val", "gain"]
    names = ["job", "status", *numbers, "overrides"]
    ok = [r for r in rows if r["status"] == "ok"]
    table = list(rows)
    if len(ok) > 1:
        mean = {"job": "mean", "status": f"{len(ok)} ok", "overrides": ""}
        std = {"job": "std", "status": "", "overrides": "sample std over the jobs (e.g. seeds)"}
        for n in numbers:
            values = [r.get(n) for r in ok]
            mean[n] = round(statistics.mean(values), 2) if None not in values else None
            std[n] = round(statistics.stdev(values), 2) if None not in values else None
        table += [mean, std]

    def cell(value) -> str:
        return "-" if value is None else str(value)

    widths = {n: max(len(n), *(len(cell(r.get(n))) for r in table)) for n in names}
    lines = [
        "  ".join(cell(r.get(n)).ljust(widths[n]) for n in names).rstrip() for r in [dict(zip(names, names)), *table]
    ]
    if {r["measure"] for r in ok} == {"ppl"}:
        lines.insert(
            0, "test perplexity (lower is better); gain: the distilled student's over the student alone's, in %"
        )
    elif {r["measure"] for r in ok} == {"success"}:
        lines.insert(
            0,
            "test success, % of the walks finished with slips at the hardest q (greedy); gain: the distilled "
            "student's over the student alone's, in points",
        )
    elif {r["measure"] for r in ok} == {"exact_match"}:
        lines.insert(
            0,
            "test exact match, % of the greedy answers; gain: the distilled student's over the student alone's, "
            "in points",
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a Hydra multirun directory (multirun/DATE/TIME)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.exists():
        raise SystemExit(
            f"error: {args.sweep_dir} does not exist; pass the directory a `python -m kd_lightning -m ...` sweep printed."
        )
    if not args.sweep_dir.is_dir():
        raise SystemExit(
            f"error: {args.sweep_dir} is a file, not a sweep's directory; pass the directory a `python -m kd_lightning -m ...` sweep printed."
        )
    rows = collect(args.sweep_dir)
    if not rows:
        raise SystemExit(
            f"error: no Hydra jobs under {args.sweep_dir} (expected */.hydra/overrides.yaml); "
            "pass the directory a `python -m kd_lightning -m ...` sweep printed."
        )

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(args.sweep_dir / "report.csv", write_csv)
    print(format_table(rows))
    best = best_trial(args.sweep_dir, rows)
    if best:
        print(best)
    for row in rows:
        if row["status"] == "FAILED":
            print(f"job {row['job']} failed: {row['error']}")
        elif row["status"] == "unreadable":
            print(f"job {row['job']}: {row['error']}")
        elif row["status"] == "unfinished":
            print(
                f"job {row['job']}: no results yet: still running, or killed before it could say why "
                "(see its log in the job directory)"
            )
    picture = plot_sweep(rows, args.sweep_dir / "sweep.png")
    print(f"\nwritten: {args.sweep_dir / 'report.csv'}" + (f", {picture}" if picture else ""))


if __name__ == "__main__":
    main()
