"""Give the committed study records made before results knew their sources the sources they had (run once).

Results made before ``studylib.provenance`` existed record no sources, so ``--stale`` could only say "not recorded".
This rebuilds them: for each entry of ``results/study-<profile>.json`` with a clean commit, the studylib modules
that a run of the same notebook imports today (read from a study record that has sources, e.g. a smoke study run
on the current code) and the notebook, each hashed as it was at that commit (``provenance.backfill``; the entry
says ``sources_backfilled``). The data files those runs read are not known and are left out. It also rewrites each
record's time totals one machine at a time (``seconds_by_machine``)::

    python -m studylib study --profile smoke --results-dir scratch/smoke --no-html
    python bench/backfill_sources.py scratch/smoke/study-smoke.json results/study-cpu.json results/study-pilot.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from studylib import provenance
from studylib.study import _write_summary, load_study


def modules_by_notebook(record: Path) -> dict[str, set[str]]:
    """The studylib modules each notebook's runs used, from a study record that has sources."""
    found: dict[str, set[str]] = {}
    for entry in json.loads(record.read_text())["runs"].values():
        modules = {path for path in entry.get("sources", {}) if path.startswith("studylib/")}
        found.setdefault(entry["notebook"], set()).update(modules)
    return found


def main(measured: str, *records: str) -> int:
    modules = modules_by_notebook(Path(measured))
    for record in map(Path, records):
        data = json.loads(record.read_text())
        runs = data["runs"]
        filled = [n for n, e in runs.items() if provenance.backfill(e, modules.get(e["notebook"], ()), e["notebook"])]
        names = [run.name for run in load_study(data["profile"])[1]]
        _write_summary(record, data["profile"], runs, names + [n for n in runs if n not in names])
        print(f"{record}: sources rebuilt for {len(filled)} of {len(runs)} entries")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
