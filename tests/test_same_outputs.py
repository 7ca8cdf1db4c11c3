"""``bench/same_outputs.py``, the before/after check of a refactor: it ignores timings and stamps, and nothing else."""

from __future__ import annotations

import json
import subprocess
import sys

from studylib.study import ROOT


def write(root, metrics: dict, table: str, markdown: str) -> None:
    (root / "lm" / "run").mkdir(parents=True)
    (root / "lm" / "run" / "metrics.json").write_text(json.dumps(metrics))
    (root / "runs.csv").write_text(table)
    (root / "runs.md").write_text(markdown)


def compare(before, after) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "same_outputs.py"), str(before), str(after)],
        capture_output=True,
        text=True,
    )
    return done.returncode, done.stdout


def test_timings_and_stamps_differ_freely_results_do_not(tmp_path):
    metrics = {"win_rate": 0.5, "train_seconds": 1.0, "params": {"results_dir": str(tmp_path / "a" / "lm")}}
    table = "method,kl,seconds\ndpo,0.25,3.0\n"
    markdown = "- created: `today`\n\n| method | kl | seconds |\n|---|---|---|\n| dpo | 0.25 | 3.0 |\n"
    write(tmp_path / "a", metrics, table, markdown)
    later = {"win_rate": 0.5, "train_seconds": 9.0, "params": {"results_dir": str(tmp_path / "b" / "lm")}}
    write(
        tmp_path / "b", later, table.replace("3.0", "7.5"), markdown.replace("today", "tomorrow").replace("3.0", "7.5")
    )
    assert compare(tmp_path / "a", tmp_path / "b") == (
        0,
        "3 files compared (metrics.json, CSV, Markdown; timings aside)\nthe same\n",
    )
    (tmp_path / "b" / "runs.csv").write_text(table.replace("0.25", "0.2500001"))
    (tmp_path / "b" / "lm" / "run" / "metrics.json").write_text(json.dumps({**later, "win_rate": 0.51}))
    code, out = compare(tmp_path / "a", tmp_path / "b")
    assert code == 1 and "differs: runs.csv" in out and "differs: lm/run/metrics.json" in out
    (tmp_path / "b" / "runs.md").unlink()
    assert "only in" in compare(tmp_path / "a", tmp_path / "b")[1]
