"""Results that know their sources: what a stamp records, and how a changed source makes a result stale."""

from __future__ import annotations

import json
import subprocess

import pytest
from test_study import sandbox, write_profile  # noqa: F401, F811 (a fixture)

from studylib import provenance, study
from studylib.results import save_table
from studylib.study import Run, is_complete


def test_a_modules_hash_follows_its_code_not_its_comments_or_docstrings():
    plain = provenance.content_hash("m.py", b"def f(x):\n    return x + 1\n")
    documented = b'"""A module."""\n\n\ndef f(x):  # add one\n    """Add one."""\n    return x + 1\n'
    assert provenance.content_hash("m.py", documented) == plain
    assert provenance.content_hash("m.py", b"def f(x):\n    return x + 2\n") != plain
    assert provenance.content_hash("m.txt", b"a") != provenance.content_hash("m.txt", b"b")


def test_a_notebooks_hash_follows_its_sources_not_its_outputs():
    cell = {"cell_type": "code", "source": ["x = 1"], "outputs": [], "metadata": {}}
    ran = dict(cell, outputs=[{"output_type": "stream", "text": "1"}])
    edited = dict(cell, source=["x = 2"])
    hashes = [provenance.content_hash("n.ipynb", json.dumps({"cells": [c]}).encode()) for c in (cell, ran, edited)]
    assert hashes[0] == hashes[1] != hashes[2]


def test_a_stamp_names_the_modules_and_the_files_read(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "ROOT", tmp_path)
    monkeypatch.setattr(provenance, "_opened", set())
    data = tmp_path / "data" / "rows.jsonl"
    data.parent.mkdir()
    data.write_text('{"a": 1}\n')
    with open(data) as handle:  # read: a source
        handle.read()
    (tmp_path / "out.txt").write_text("written")  # written: not a source
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "07_x.ipynb").write_text(json.dumps({"cells": []}))
    sources = provenance.current_sources("07_x")
    assert sources["data/rows.jsonl"] == provenance.file_hash(data)
    assert "notebooks/07_x.ipynb" in sources and "out.txt" not in sources
    outside = tmp_path.parent / f"{tmp_path.name}-outside.txt"
    outside.write_text("x")
    outside.read_text()
    assert not any("outside" in path for path in provenance.current_sources())  # outside the checkout


def test_every_saved_table_carries_its_sources(tmp_path):
    pd = pytest.importorskip("pandas")
    paths = save_table(pd.DataFrame({"a": [1]}), tmp_path / "t", {"notebook": "01_density_ratio"})
    stamp = json.loads(paths["json"].read_text())
    assert stamp["sources"]["studylib/results.py"] == provenance.file_hash(provenance.ROOT / "studylib/results.py")
    assert "notebooks/01_density_ratio.ipynb" in stamp["sources"]
    assert 'sources: `"' in paths["md"].read_text()  # the Markdown header counts them instead of listing them


def _repo(tmp_path):
    """A checkout of two modules and a notebook, and two runs' records: one imported a.py, the other b.py."""
    for name, code in (("a.py", "A = 1\n"), ("b.py", "B = 1\n")):
        (tmp_path / "studylib").mkdir(exist_ok=True)
        (tmp_path / "studylib" / name).write_text(code)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "t.csv").write_text("a\n1\n")
    entries = {}
    for run, module in (("first", "a.py"), ("second", "b.py")):
        sources = {f"studylib/{module}": provenance.file_hash(tmp_path / "studylib" / module)}
        entries[run] = {
            "status": "executed",
            "commit": "abc",
            "parameters": {"k": 1},
            "sources": sources,
            "outputs": ["out/t.csv"],
        }
    return entries


def test_editing_a_module_makes_stale_only_the_results_that_imported_it(tmp_path):
    entries = _repo(tmp_path)
    assert all(provenance.stale_reasons({"k": 1}, e, tmp_path) == [] for e in entries.values())
    (tmp_path / "studylib" / "a.py").write_text('"""Now documented."""\nA = 1  # one\n')
    assert all(provenance.stale_reasons({"k": 1}, e, tmp_path) == [] for e in entries.values())  # no code changed
    (tmp_path / "studylib" / "a.py").write_text("A = 2\n")
    assert provenance.stale_reasons({"k": 1}, entries["first"], tmp_path) == ["studylib/a.py changed"]
    assert provenance.stale_reasons({"k": 1}, entries["second"], tmp_path) == []
    (tmp_path / "studylib" / "b.py").unlink()
    assert provenance.stale_reasons({"k": 1}, entries["second"], tmp_path) == ["studylib/b.py is gone"]


def test_parameters_missing_outputs_and_unrecorded_sources_make_a_result_stale(tmp_path):
    entries = _repo(tmp_path)
    assert provenance.stale_reasons({"k": 2}, entries["first"], tmp_path) == [
        "its parameters in the study config changed"
    ]
    (tmp_path / "out" / "t.csv").unlink()
    assert provenance.stale_reasons({"k": 1}, entries["first"], tmp_path) == ["out/t.csv is missing"]
    old = {k: v for k, v in entries["first"].items() if k != "sources"}
    assert "were not recorded (made at abc" in provenance.stale_reasons({"k": 1}, old, tmp_path)[0]
    assert provenance.stale_reasons({"k": 1}, None, tmp_path) == ["never run"]
    assert provenance.stale_reasons({"k": 1}, {"status": "failed"}, tmp_path) == ["its last run failed"]


def test_a_run_whose_source_changed_is_not_complete_and_runs_again(tmp_path):
    out_dir = tmp_path / "notebooks"
    out_dir.mkdir()
    run = Run("01_density_ratio", "01_density_ratio", {"alpha": 0.5})
    (out_dir / "01_density_ratio.ipynb").write_text("{}")
    current = {"studylib/results.py": provenance.file_hash(provenance.ROOT / "studylib/results.py")}
    stamp = out_dir / "01_density_ratio.done"
    for sources, complete in ((current, True), ({"studylib/results.py": "0" * 64}, False)):
        stamp.write_text(json.dumps({"parameters": run.parameters, "outputs": [], "sources": sources}))
        assert is_complete(run, stamp, out_dir) is complete
    stamp.write_text(json.dumps({"parameters": run.parameters, "outputs": []}))  # before sources were recorded
    assert not is_complete(run, stamp, out_dir)


def test_backfilled_sources_come_from_the_commit_that_made_the_result(tmp_path):
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "studylib").mkdir()
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "studylib" / "a.py").write_text("A = 1\n")
    (tmp_path / "notebooks" / "n.ipynb").write_text(json.dumps({"cells": []}))
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / "studylib" / "a.py").write_text("A = 2\n")  # changed after the result was made
    entry = {"status": "executed", "commit": commit}
    assert provenance.backfill(entry, ["studylib/a.py", "studylib/new.py"], "n", tmp_path)
    assert set(entry["sources"]) == {"studylib/a.py", "notebooks/n.ipynb"}  # new.py did not exist then
    assert provenance.stale_reasons({}, entry | {"parameters": {}}, tmp_path) == ["studylib/a.py changed"]
    assert not provenance.backfill({"commit": commit + "-dirty"}, ["studylib/a.py"], "n", tmp_path)


def test_a_fresh_clone_skips_a_current_committed_result_and_reruns_a_stale_one(sandbox):  # noqa: F811
    out = sandbox / "marker.txt"
    write_profile(sandbox, [{"notebook": "job", "parameters": {"out": str(out)}}])
    results = sandbox / "results"
    assert study.run_study("t", results_dir=results, html=False) == ["job"]
    (results / "notebooks" / "job.done").unlink()  # a fresh clone: the committed record, no local stamp
    assert study.run_study("t", results_dir=results, html=False) == []  # current: skipped
    record_path = results / "study-t.json"
    record = json.loads(record_path.read_text())
    record["runs"]["job"]["sources"]["studylib/results.py"] = "0" * 64  # made from another results.py
    record_path.write_text(json.dumps(record))
    assert study.stale_runs(*study.recorded_runs("t", results)) == {"job": ["studylib/results.py changed"]}
    assert study.run_study("t", results_dir=results, html=False) == ["job"]  # stale: rerun
    assert study.stale_runs(*study.recorded_runs("t", results)) == {}
    assert study.run_study("t", results_dir=results, html=False, force=True) == ["job"]


def test_the_runners_own_record_is_never_a_source(sandbox, monkeypatch):  # noqa: F811
    """The report reads study-<profile>.json, which the runner rewrites as each run ends (the report's own entry
    too): were it a source, the report would be stale the moment it was recorded."""
    write_profile(sandbox, [{"notebook": "job", "parameters": {"out": str(sandbox / "m.txt")}}])
    read = {"results/study-t.json": "0" * 64, "results/lm/run/metrics.json": "1" * 64}
    monkeypatch.setattr(provenance, "run_sources", lambda notebook, outputs, root: dict(read))
    results = sandbox / "results"
    study.run_study("t", results_dir=results, html=False)
    entry = json.loads((results / "study-t.json").read_text())["runs"]["job"]
    assert entry["sources"] == {"results/lm/run/metrics.json": "1" * 64}
