"""Notebook text holds no control characters: a LaTeX command written in a non-raw Python string (``"\\theta"``)
loses its backslash to an escape (TAB + ``heta``), and the equation renders broken ("π_ heta", "σig(eta")."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXECUTED = "results/notebooks"

CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f]")
"""Any character below 32 but the newline (``\\r`` included)."""
ENTITY = re.compile(r"&#(?:[xX]0*([0-9a-fA-F]{1,2})|0*([0-9]{1,2}));")
"""A numeric character reference that may name a control character, e.g. ``&#8;`` or ``&#x8;``."""
STREAM = re.compile(r'(data-mime-type="application/vnd\.jupyter\.std(?:out|err)"[^>]*>\s*<pre>)(.*?)(?=</pre>)', re.S)
"""A cell's printed output in nbconvert's HTML: a progress bar's carriage returns are what it printed (and an HTML
parser reads a raw ``\\r`` as a line break), so they are the one control character allowed, and only there."""


def committed(folder: str, suffix: str) -> list[Path]:
    """The files under ``folder`` (relative to the repository root) ending in ``suffix`` that git tracks (every such
    file there outside a git checkout)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--", folder], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split("\0")
    except (OSError, subprocess.CalledProcessError):
        return sorted(p for p in (ROOT / folder).rglob(f"*{suffix}") if p.is_file())
    return sorted(ROOT / name for name in listed if name.endswith(suffix) and (ROOT / name).is_file())


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


def control_characters(text: str) -> list[str]:
    """Each control character in ``text`` (raw, or as a numeric reference), shown with what surrounds it."""
    found = [m.start() for m in CONTROL.finditer(text)]
    for m in ENTITY.finditer(text):
        code = int(m[1], 16) if m[1] else int(m[2])
        if code < 32 and code != 10:
            found.append(m.start())
    return [repr(text[max(0, i - 20) : i + 20]) for i in sorted(found)]


def read(path: Path) -> str:
    """The file's text as it is (``read_text`` would turn a ``\\r`` into a newline)."""
    return path.read_bytes().decode("utf-8")


def html_control_characters(page: str) -> list[str]:
    """``control_characters`` of an HTML page, but for the carriage returns of printed output (``STREAM``)."""
    return control_characters(STREAM.sub(lambda m: m[1] + m[2].replace("\r", ""), page))


def markdown_sources(path: Path) -> list[str]:
    cells = json.loads(read(path))["cells"]
    sources = (c["source"] for c in cells if c["cell_type"] == "markdown")
    return [s if isinstance(s, str) else "".join(s) for s in sources]


NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb")) + committed(EXECUTED, ".ipynb")
PAGES = committed(EXECUTED, ".html")


def test_there_are_notebooks_to_check():
    assert len(NOTEBOOKS) > 6 and PAGES


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_markdown_has_no_control_characters(path: Path):
    bad = [c for source in markdown_sources(path) for c in control_characters(source)]
    assert not bad, f"{path.relative_to(ROOT)}: control characters in Markdown (a lost backslash?): {bad}"


@pytest.mark.parametrize("path", PAGES, ids=_ids(PAGES))
def test_html_has_no_control_characters(path: Path):
    bad = html_control_characters(read(path))
    assert not bad, f"{path.relative_to(ROOT)}: control characters (raw or as &#...;): {bad}"


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("$\\pi_\\theta$", False),
        ("$\\pi_\theta$", True),
        ("\\sigma\x08ig(", True),
        ("(1 + \x07lpha)", True),
        ("a\r\nb", True),
        ("line one\nline two", False),
        ("&#8;eta", True),
        ("&#x08;ig", True),
        ("&#X7;lpha", True),
        ("&#10;&#32;&#xa0;&#8501;", False),
    ],
)
def test_control_characters_are_found(text: str, found: bool):
    assert bool(control_characters(text)) is found


def test_carriage_returns_are_allowed_only_in_printed_output():
    stream = '<div class="jp-RenderedText" data-mime-type="application/vnd.jupyter.stderr" tabindex="0">\n<pre>'
    assert not html_control_characters(f"{stream}\rsampling:  50%\r</pre>\n<p>$\\rho$</p>")
    assert html_control_characters(f"{stream}\rsampling\x08</pre>")  # only the carriage return is allowed there
    assert html_control_characters(f"{stream}\rsampling</pre>\n<p>$\rho$</p>")  # a lost backslash, in Markdown


RESULT_NUMBER = re.compile(
    r"(?<![\w.])[-+−]?\d+\.\d+(?:\s?[x×])?(?![\w.])|\[\s*[-+−]?\d*\.?\d+\s*,\s*[-+−]?\d*\.?\d+\s*\]"
)
"""A decimal number (``0.474``, ``−0.6``), a decimal factor (``12.2x``) or an interval (``[0.36, 0.56]``)."""
STATED_NOT_MEASURED = (
    "preferred fraction 0.2",  # S2's design (studylib.toy.problems)
    "preferred fraction $0.2$",
    "q / 0.2",
    "classes 0.2 : 0.8",
    "\\gamma = 0.5",  # S3's design
    "below −0.5",  # the toy's rule for "converges"
    "contains 0.5",  # a win rate's tie
    "within 0.01 nats",  # the pilot's tie rule
    "\\log 10 = 2.30",  # the uniform entropy over 10 candidates
)
"""Numbers notebook prose may state: the settings' parameters, the rules' thresholds, a formula's value."""


def result_numbers(markdown: str) -> list[str]:
    """The decimal numbers, factors and intervals of ``markdown`` outside ``STATED_NOT_MEASURED``, with context."""
    text = " ".join(markdown.split())
    for allowed in STATED_NOT_MEASURED:
        text = text.replace(allowed, " ")
    return [repr(text[max(0, m.start() - 40) : m.end() + 10]) for m in RESULT_NUMBER.finditer(text)]


SOURCES = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", SOURCES, ids=_ids(SOURCES))
def test_notebook_prose_states_no_result_number(path: Path):
    """Prose prints its numbers from code or states none: a rerun with other results cannot leave it wrong."""
    found = [n for source in markdown_sources(path) for n in result_numbers(source)]
    assert not found, f"{path.relative_to(ROOT)}: result numbers in Markdown (print them from code): {found}"


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("falls at slope −0.6, not −1", True),
        ("accuracy 0.474 on held-out pairs", True),
        ("S1 12.2x [11.3, 13.9]", True),
        ("an interval [0.36, 0.56] over prompts", True),
        ("DDRO at $\\epsilon = 0.05$", True),
        ("preferred fraction 0.2 in every prompt, $\\gamma = 0.5$", False),
        ("when its slope is\nbelow −0.5 and its limit is 0; a fall at or above 3x", False),
        ("$10^{-4}$ nats, $K = 10$, SmolLM2-135M, data/lm_exact/prompts.jsonl", False),
    ],
)
def test_result_numbers_are_found(text: str, found: bool):
    assert bool(result_numbers(text)) is found


def test_paper_3s_target_is_defined_by_its_preference_model_not_by_a_reward():
    """pi* is defined by P(a > b) = sigma(gamma log pi*(a)/pi*(b)) (notebooks 02 and 06), not pi_ref exp(r*/beta)."""
    wrong = re.compile(
        r"(π\*|\\pi\^\*|\\pi\^\{\*\})\s*(∝|\\propto)\s*(π_ref|\\pi_\{?\\mathrm\{ref\}\}?)\s*(\\,\s*)?(exp|e\^)"
    )
    for path in SOURCES:
        for source in markdown_sources(path):
            assert not wrong.search(source), f"{path.relative_to(ROOT)}: pi* written as pi_ref exp(r/beta)"


def test_importing_the_library_in_a_kernel_without_ipywidgets_prints_no_tqdm_warning():
    """tqdm.auto (transformers and the study runner import it) warns in a Jupyter kernel without ipywidgets, and the
    warning landed in every executed notebook; the library drops that one warning, keeping tqdm's text bars."""
    code = (
        "import sys, types, warnings\n"
        "import IPython\n"
        "sys.modules['ipykernel.zmqshell'] = types.ModuleType('ipykernel.zmqshell')  # what tqdm takes for a kernel\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    import studylib, tqdm.auto\n"
        "print([str(w.message) for w in caught if 'IProgress' in str(w.message)])\n"
    )
    shown = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert shown.stdout.strip() == "[]", shown.stdout + shown.stderr
