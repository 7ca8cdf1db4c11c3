"""Prose rendered from the tables: the rounding rule, table look-ups, and the check that the committed README and
docs are exactly their templates rendered over the committed tables."""

from __future__ import annotations

import re
import shutil

import pandas as pd
import pytest

from studylib import prose
from studylib.study import ROOT


def test_one_rounding_rule():
    assert str(prose.Num(12.5771746954862)) == "12.6"  # 3 significant figures by default
    assert str(prose.Num(0.000356)) == "0.000356" and prose.Num(0.000356).sci(2) == "3.6e-4"
    assert prose.Num(0.3945).f(2) == "0.39" and prose.Num(0.3955).f(2) == "0.40"
    assert prose.Num(0.1015625).signed(3) == "+0.102" and prose.Num(-0.0390625).signed(3) == "-0.039"
    assert prose.Num(0.474).pct() == "47%" and prose.Num(7.0).int == "7" and str(prose.Num(2.0)) == "2.00"
    with pytest.raises(ValueError, match="nan"):
        str(prose.Num(float("nan"), "falls.slope"))


def test_an_interval_is_read_from_its_columns():
    row = {"gain": prose.Num(0.1015625), "gain_low": prose.Num(0.015625), "gain_high": prose.Num(0.1875)}
    assert prose.ci(row, "gain", 3, signed=True) == "+0.102 [+0.016, +0.188]"
    fall = {"fall": prose.Num(9.09), "fall_low": prose.Num(8.17), "fall_high": prose.Num(10.35)}
    assert prose.ci(fall, "fall", 1, x=True) == "9.1x [8.2, 10.3]"


def _results(tmp_path):
    (tmp_path / "results" / "toy").mkdir(parents=True)
    frame = pd.DataFrame(
        {"setting": ["S1", "S1", "S2"], "method": ["DDRO", "RDRO", "RDRO"], "slope": [-1.18, -0.96, -0.9]}
    )
    frame.to_csv(tmp_path / "results" / "toy" / "t.csv", index=False)
    return tmp_path


def test_a_row_is_one_row_or_an_error_naming_the_table(tmp_path):
    table = prose.Table("toy/t", _results(tmp_path) / "results")
    assert table.row(setting="S1", method="DDRO").slope.f(2) == "-1.18"
    with pytest.raises(LookupError, match=r"toy/t\[method=RDRO\]: 2 rows match"):
        table.row(method="RDRO")
    with pytest.raises(KeyError, match="no column 'metod'"):
        table.row(metod="RDRO")
    assert [r.setting for r in table.rows(method="RDRO")] == ["S1", "S2"]


def _template(root, text):
    (root / "docs" / "templates").mkdir(parents=True, exist_ok=True)
    (root / "docs" / "templates" / "OUT.md.j2").write_text(text)


def test_a_number_from_no_table_is_marked_and_its_origin_listed(tmp_path):
    root = _results(tmp_path)
    _template(
        root,
        '{{ table("toy/t").row(setting="S2").slope }} in {{ hand("2 h", "timed by hand") }}.\n\n{{ footnotes() }}\n',
    )
    assert prose.write_all(root) == [root / "OUT.md"]
    assert (root / "OUT.md").read_text() == "-0.900 in 2 h[^h1].\n\n[^h1]: Not from a committed table: timed by hand\n"
    assert prose.differences(root) == {}


def test_a_hand_edited_number_or_a_rerun_table_fails_the_check(tmp_path):
    root = _results(tmp_path)
    _template(root, 'slope {{ table("toy/t").row(setting="S2").slope.f(2) }}\n')
    prose.write_all(root)
    (root / "OUT.md").write_text("slope -0.91\n")  # edited by hand
    (diff,) = prose.differences(root).values()
    assert "-slope -0.91" in diff and "+slope -0.90" in diff
    prose.write_all(root)
    frame = pd.read_csv(root / "results" / "toy" / "t.csv")
    frame.loc[2, "slope"] = -0.95  # the table rerun, the text not rendered again
    frame.to_csv(root / "results" / "toy" / "t.csv", index=False)
    assert list(prose.differences(root)) == [root / "OUT.md"]


def test_the_committed_readme_and_docs_are_their_templates_rendered_over_the_tables():
    rendered = [target.relative_to(ROOT).as_posix() for _, target in prose.templates()]
    assert {"README.md", "docs/RESULTS.md"} <= set(rendered)
    found = prose.differences()
    assert not found, "run `make docs` (python -m studylib docs):\n" + "\n".join(found.values())[:4000]


def test_editing_a_number_in_the_committed_readme_fails_the_check(tmp_path):
    shutil.copytree(ROOT / "docs" / "templates", tmp_path / "docs" / "templates")
    text = (ROOT / "README.md").read_text()
    number = re.search(r"\d+\.\d+x", text)  # a fall, printed from results/lm_exact/falls.csv
    assert number, "the README prints no fall"
    edited = text[: number.start()] + "99.9x" + text[number.end() :]
    (tmp_path / "README.md").write_text(edited)
    for _, target in prose.templates(ROOT):
        if target.name != "README.md" or target.parent != ROOT:
            relative = target.relative_to(ROOT)
            (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(target, tmp_path / relative)
    found = prose.differences(tmp_path, results_root=ROOT)
    assert list(found) == [tmp_path / "README.md"] and "99.9x" in found[tmp_path / "README.md"]
