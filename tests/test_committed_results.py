"""What is committed under results/ names no path of the machine that made it, and every executed notebook there
belongs to a run of a study profile (an earlier config's notebook, orphaned, would be read as a current result)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from studylib import study

ROOT = study.ROOT
TEXT = (".json", ".csv", ".md", ".html", ".ipynb")

MACHINE_PATH = re.compile(r"(?<![\w.:/~+-])/(?:work|tmp|root|home)(?![\w.-])")
"""An absolute path into a machine's work, temporary or home folders, where a path starts (so not
``https://host/tmp/x``, ``results/tmp``, ``a/home/b`` or base64 text, and not ``/tmpfile``)."""


def committed(folder: str) -> list[Path]:
    """The files under ``folder`` (relative to the repository root) that git tracks (every file there outside a git
    checkout)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--", folder], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split("\0")
    except (OSError, subprocess.CalledProcessError):
        return sorted(p for p in (ROOT / folder).rglob("*") if p.is_file())
    return sorted(ROOT / name for name in listed if name and (ROOT / name).is_file())


def machine_paths(text: str) -> list[str]:
    """Each absolute machine path in ``text``, shown with what follows it."""
    return [text[m.start() : m.start() + 60].split("\n")[0] for m in MACHINE_PATH.finditer(text)]


def test_committed_results_name_no_machine_path():
    files = [p for p in committed("results") if p.suffix in TEXT]
    assert len([p for p in files if p.parent == ROOT / "results" / "notebooks"]) > 10
    found = {str(p.relative_to(ROOT)): machine_paths(p.read_bytes().decode("utf-8")) for p in files}
    found = {name: paths for name, paths in found.items() if paths}
    assert not found, f"absolute paths of the machine that ran them, in {len(found)} file(s): {found}"


@pytest.mark.parametrize(
    "text",
    [
        '"input_path": "/work/main/notebooks/04_lm_alignment.ipynb"',
        "saved to /tmp/fresh/results/lm/offline-dpo-seed=0\n",
        "/root/.cache/huggingface/hub/models--x",
        "File /home/me/.venv/lib/python3.11/site-packages/tqdm/auto.py:21",
        "<pre>/tmp/fresh/.venv/lib/python3.11/site-packages/x.py:3: UserWarning",
        "cwd: /tmp\n",
    ],
)
def test_machine_paths_are_found(text):
    assert machine_paths(text)


@pytest.mark.parametrize(
    "text",
    [
        "https://example.org/tmp/x and http://host/home/index.html",
        "results/notebooks/lm-method=dpo-seed=0.ipynb",
        ".venv/lib/python3.11/site-packages/tqdm/auto.py:21",
        "~/.cache/huggingface and a/root/b and x/work/y",
        "iVBORw0KGgo+/tmp/x8",  # base64
        "/tmpfile /homework /workspace",
    ],
)
def test_legitimate_text_is_not_a_machine_path(text):
    assert not machine_paths(text)


def test_every_executed_notebook_belongs_to_a_run_of_a_profile():
    """Each executed notebook (and HTML export) under results/notebooks is where ``run_study`` keeps one run of a
    profile (``study.executed_notebooks``): a run dropped from a config leaves its notebook behind, which must go."""
    profiles = sorted(p.stem for p in study.STUDIES.glob("*.yaml"))
    kept = {path for profile in profiles for path in study.executed_notebooks(profile)}
    executed = [p for p in committed("results/notebooks") if p.suffix in (".ipynb", ".html")]
    assert len(executed) > 10
    orphans = sorted(str(p.relative_to(ROOT)) for p in executed if p.with_suffix(".ipynb") not in kept)
    assert not orphans, f"executed notebooks of no run of {profiles} (an earlier config's? git rm them): {orphans}"
