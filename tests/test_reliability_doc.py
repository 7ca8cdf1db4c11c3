"""``docs/RELIABILITY.md`` lists, for each failure, the test that shows it: every test it names must exist."""

from __future__ import annotations

import re

from studylib.study import ROOT

DOC = ROOT / "docs" / "RELIABILITY.md"


def named_tests() -> list[tuple[str, str]]:
    """``(file, test)`` for every ``[tests/]test_x.py::test_y`` the document names (a bare ``::test_y`` after a
    file named earlier in the same cell is that file's)."""
    found = []
    for cell in DOC.read_text().split("|"):
        current = None
        for match in re.finditer(
            r"`(?:tests/)?(test_\w+\.py)?::(test_\w+)(?:\[[^\]]*\])?`|`(?:tests/)?(test_\w+\.py)`", cell
        ):
            file = match.group(1) or match.group(3)
            current = file or current
            if match.group(2):
                found.append((current, match.group(2)))
    return found


def test_every_test_the_reliability_notes_name_exists():
    names = named_tests()
    assert len(names) >= 20
    missing = [
        f"{file}::{test}"
        for file, test in names
        if file is None or not re.search(rf"^def {test}\(", (ROOT / "tests" / file).read_text(), re.M)
    ]
    assert missing == [], f"docs/RELIABILITY.md names tests that do not exist: {missing}"


def test_the_probe_count_says_nothing_was_lost():
    """Every case tried is a clear error, recovered, lost or not handled; none lost; the cases not handled are the rows
    of the document's last section."""
    text = DOC.read_text()
    counts = re.search(r"tried (\d+), clear error (\d+), recovered (\d+), lost (\d+)(?:,\s+not handled (\d+))?", text)
    assert counts, "docs/RELIABILITY.md has no probe count line"
    tried, clear, recovered, lost, not_handled = (int(n or 0) for n in counts.groups())
    assert lost == 0 and tried == clear + recovered + lost + not_handled
    section = text.split("## Still not handled", 1)[1] if "## Still not handled" in text else ""
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| failure")]
    assert len(rows) == not_handled, "the count of cases not handled differs from the rows that list them"
