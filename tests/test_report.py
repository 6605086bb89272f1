"""kd_lightning.run.report gathers a sweep's jobs into one table and marks failed ones."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from kd_lightning.run.report import main


def job(sweep: Path, name: str, overrides: list[str], results: dict | None) -> None:
    (sweep / name / ".hydra").mkdir(parents=True)
    (sweep / name / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if results is not None:
        (sweep / name / "metrics.json").write_text(json.dumps(results))


def test_report_lists_every_job_and_marks_failures(tmp_path: Path, capsys) -> None:
    ok = {"teacher": {"test/acc": 0.98}, "baseline": {"test/acc": 0.96}, "distilled": {"test/acc": 0.97}, "gain": 0.01}
    job(tmp_path, "0", ["distill.temperature=1"], ok)
    job(tmp_path, "1", ["distill.temperature=4"], None)
    job(tmp_path, "2", ["distill.temperature=8"], {**ok, "distilled": {"test/acc": 0.99}, "gain": 0.03})
    (tmp_path / "1" / "error.txt").write_text("no space left on device, /runs/1/distilled; free space there.\n")
    main([str(tmp_path)])
    printed = capsys.readouterr().out
    assert "FAILED" in printed and "distill.temperature=4" in printed
    assert "job 1 failed: no space left on device, /runs/1/distilled; free space there." in printed
    assert "mean  2 ok" in printed and "98.0" in printed  # mean of 97 and 99
    std_row = next(line for line in printed.splitlines() if line.startswith("std"))
    assert "1.41" in std_row and "0.0" in std_row  # distilled 97 and 99: sample std 1.41; the teacher: 0
    rows = list(csv.DictReader(open(tmp_path / "report.csv")))
    assert [r["status"] for r in rows] == ["ok", "FAILED", "ok"] and rows[1]["error"].startswith("no space left")
    assert rows[2]["distilled"] == "99.0" and rows[0]["gain"] == "1.0"
    assert (tmp_path / "sweep.png").stat().st_size > 5_000


def test_a_job_without_results_or_reason_is_unfinished_not_failed(tmp_path: Path, capsys) -> None:
    ok = {"teacher": {"test/acc": 0.98}, "baseline": {"test/acc": 0.96}, "distilled": {"test/acc": 0.97}, "gain": 0.01}
    job(tmp_path, "0", ["seed=0"], ok)
    job(tmp_path, "1", ["seed=1"], None)  # still running (or killed): no metrics.json, no error.txt
    main([str(tmp_path)])
    printed = capsys.readouterr().out
    assert "FAILED" not in printed and "unfinished" in printed
    assert "job 1: no results yet: still running, or killed before it could say why" in printed


def test_a_job_whose_results_cannot_be_read_is_marked_and_the_others_reported(tmp_path: Path, capsys) -> None:
    ok = {"teacher": {"test/acc": 0.98}, "baseline": {"test/acc": 0.96}, "distilled": {"test/acc": 0.97}, "gain": 0.01}
    job(tmp_path, "0", ["seed=0"], ok)
    job(tmp_path, "1", ["seed=1"], ok)
    job(tmp_path, "2", ["seed=2"], {"teacher": 5})
    (tmp_path / "1" / "metrics.json").write_text(json.dumps(ok)[:20])  # truncated
    main([str(tmp_path)])
    printed = capsys.readouterr().out
    assert f"job 1: {tmp_path / '1' / 'metrics.json'} is unreadable" in printed
    assert f"job 2: {tmp_path / '2' / 'metrics.json'} does not hold a run's results" in printed
    rows = list(csv.DictReader(open(tmp_path / "report.csv")))
    assert [r["status"] for r in rows] == ["ok", "unreadable", "unreadable"] and rows[0]["distilled"] == "97.0"


def test_language_model_jobs_are_reported_by_test_perplexity(tmp_path: Path, capsys) -> None:
    for name, seed, alone, distilled in (("0", 0, 120.0, 100.0), ("1", 1, 110.0, 99.0)):
        job(
            tmp_path,
            name,
            [f"seed={seed}"],
            {
                "teacher": {"test/ppl": 60.0, "test/acc": 0.3},
                "baseline": {"test/ppl": alone},
                "distilled": {"test/ppl": distilled},
                "ppl_ratio": distilled / alone,
            },
        )
    main([str(tmp_path)])
    printed = capsys.readouterr().out
    assert printed.startswith("test perplexity (lower is better)")
    rows = list(csv.DictReader(open(tmp_path / "report.csv")))
    assert [(r["teacher"], r["alone"], r["distilled"], r["gain"]) for r in rows] == [
        ("60.0", "120.0", "100.0", "-16.67"),
        ("60.0", "110.0", "99.0", "-10.0"),
    ]
    mean_row = next(line for line in printed.splitlines() if line.startswith("mean"))
    assert mean_row.split()[3:7] == ["60.0", "115.0", "99.5", "-"]  # teacher, alone, distilled, val (none for LMs)


def test_a_task_with_answers_is_reported_by_exact_match_with_a_column_per_on_policy_stage(
    tmp_path: Path, capsys
) -> None:
    job(tmp_path, "0", ["seed=0"], None)  # failed first: the stage columns come from the later jobs
    (tmp_path / "0" / "error.txt").write_text("error: something\n")
    for name, seed, on, off in (("1", 1, 0.30, 0.40), ("2", 2, 0.34, 0.44)):
        job(
            tmp_path,
            name,
            [f"seed={seed}"],
            {
                "teacher": {"test/exact_match": 1.0},
                "baseline": {"test/exact_match": 0.42},
                "distilled": {"test/exact_match": on, "test/ppl": 2.0},
                "off_policy": {"test/exact_match": off},
                "on_policy_stages": ["off_policy"],
            },
        )
    main([str(tmp_path)])
    printed = capsys.readouterr().out
    assert printed.startswith("test exact match, % of the greedy answers")
    header = next(line for line in printed.splitlines() if line.startswith("job"))
    assert header.split()[:6] == ["job", "status", "teacher", "alone", "distilled", "off_policy"]
    rows = list(csv.DictReader(open(tmp_path / "report.csv")))
    assert [(r["distilled"], r["off_policy"], r["gain"]) for r in rows] == [
        ("", "", ""),
        ("30.0", "40.0", "-12.0"),
        ("34.0", "44.0", "-8.0"),
    ]
    mean_row = next(line for line in printed.splitlines() if line.startswith("mean"))
    assert mean_row.split()[3:7] == ["100.0", "42.0", "32.0", "42.0"]


def test_a_job_whose_overrides_cannot_be_read_or_whose_results_are_a_folder_is_marked(tmp_path: Path, capsys) -> None:
    ok = {"teacher": {"test/acc": 0.98}, "baseline": {"test/acc": 0.96}, "distilled": {"test/acc": 0.97}, "gain": 0.01}
    job(tmp_path, "0", ["seed=0"], ok)
    job(tmp_path, "1", ["seed=1"], ok)
    job(tmp_path, "2", ["seed=2"], None)
    (tmp_path / "1" / ".hydra" / "overrides.yaml").write_text("- seed=1\n- [unclosed\n")  # a kill mid-write
    (tmp_path / "2" / "metrics.json").mkdir()
    main([str(tmp_path)])
    printed = capsys.readouterr().out
    assert f"job 1: {tmp_path / '1' / '.hydra' / 'overrides.yaml'} is unreadable" in printed
    assert f"job 2: {tmp_path / '2' / 'metrics.json'} is not a file" in printed
    rows = list(csv.DictReader(open(tmp_path / "report.csv")))
    assert [r["status"] for r in rows] == ["ok", "unreadable", "unreadable"] and rows[0]["distilled"] == "97.0"


def test_a_missing_path_or_a_file_is_named_as_such(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="does not exist"):
        main([str(tmp_path / "no-such-sweep")])
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(SystemExit, match="is a file, not a sweep's directory"):
        main([str(tmp_path / "a-file")])
    with pytest.raises(SystemExit, match="no Hydra jobs under"):
        main([str(tmp_path)])


def test_slippery_walk_jobs_are_reported_by_success_with_slips(tmp_path: Path, capsys) -> None:
    def walk(success: float) -> dict:
        return {"test/ppl": 2.0, "test/acc": 0.5, "test/success": success, "test/success_q0.2": success}

    results = {"teacher": walk(1.0), "baseline": walk(0.87), "distilled": walk(0.986), "off_policy": walk(0.886)}
    job(tmp_path, "0", ["seed=0"], {**results, "on_policy_stages": ["off_policy"], "ppl_ratio": 1.0})
    main([str(tmp_path)])
    printed = capsys.readouterr().out
    assert printed.startswith("test success, % of the walks finished with slips at the hardest q (greedy)")
    rows = list(csv.DictReader(open(tmp_path / "report.csv")))
    assert (rows[0]["alone"], rows[0]["distilled"], rows[0]["off_policy"], rows[0]["gain"]) == (
        "87.0",
        "98.6",
        "88.6",
        "11.6",
    )
