"""The study runner: execute every notebook of a study config with papermill.

A study config (``studies/<profile>.yaml``) lists runs; each names a notebook and its parameters, and a
``grid`` of parameters to expand (every combination becomes one run; a grid entry may be a mapping with a
``name``, whose other keys are set together, e.g. a method with its knobs). ``{results_dir}`` and
``{profile}`` in string parameters are filled in. Top-level keys, notebook names and every parameter name
are checked when the config is loaded (a parameter must be defined by the notebook's ``parameters`` cell).
Each run's executed notebook goes to ``<results_dir>/notebooks/<run name>.ipynb`` with an HTML export
beside it. A run whose executed copy
and ``.done`` stamp (recording its parameters) exist is skipped unless ``force``. A failing notebook is
kept, with its error, as ``<run name>.failed.ipynb``; the runner finishes the other runs and then
raises, naming every failure.
"""

from __future__ import annotations

import ast
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent.parent
STUDIES = ROOT / "studies"
NOTEBOOKS = ROOT / "notebooks"


@dataclass
class Run:
    """One notebook execution: the notebook's stem, a unique name, and its parameters."""

    notebook: str
    name: str
    parameters: dict[str, Any] = field(default_factory=dict)


class StudyError(RuntimeError):
    """A study config is invalid, or some of its notebooks failed."""


def _fill(value: Any, context: dict[str, str]) -> Any:
    if isinstance(value, str):
        return value.format(**context) if "{" in value else value
    if isinstance(value, list):
        return [_fill(v, context) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, context) for k, v in value.items()}
    return value


TOP_LEVEL_KEYS = ("profile", "description", "results_dir", "defaults", "runs")


def notebook_parameters(path: Path) -> tuple[str, ...]:
    """The names a notebook's ``parameters`` cell assigns, in order (the cell is parsed, not run)."""
    cells = json.loads(path.read_text())["cells"]
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if not tagged:
        raise StudyError(f"{path} has no cell tagged 'parameters'")
    source = tagged[0]["source"]
    tree = ast.parse(source if isinstance(source, str) else "".join(source))
    names = []
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        names += [t.id for t in targets if isinstance(t, ast.Name)]
    return tuple(names)


def _check_parameters(path: Path, where: str, notebook: str, names: Any) -> None:
    accepted = notebook_parameters(NOTEBOOKS / f"{notebook}.ipynb")
    unknown = sorted(set(names) - set(accepted))
    if unknown:
        raise StudyError(
            f"{path}: {where}: notebook {notebook!r} has no parameter(s) {unknown}; "
            f"its parameters cell defines: {', '.join(accepted)}"
        )


def _slug(value: Any) -> str:
    return str(value).replace("/", "-").replace(" ", "")


def load_study(profile: str, results_dir: str | Path | None = None) -> tuple[dict, list[Run]]:
    """Read and validate ``studies/<profile>.yaml``; return its header and the expanded list of runs."""
    studies_dir = STUDIES
    path = studies_dir / f"{profile}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in studies_dir.glob("*.yaml"))
        raise StudyError(f"no study profile {profile!r} (no {path}); known profiles: {', '.join(known)}")
    config = yaml.safe_load(path.read_text())
    for key in ("profile", "runs"):
        if key not in config:
            raise StudyError(f"{path}: missing key {key!r}")
    unknown = sorted(set(config) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise StudyError(f"{path}: unknown key(s) {unknown}; accepted: {', '.join(TOP_LEVEL_KEYS)}")
    for notebook, defaults in config.get("defaults", {}).items():
        if not (NOTEBOOKS / f"{notebook}.ipynb").exists():
            raise StudyError(
                f"{path}: defaults name notebook {notebook!r}, but notebooks/{notebook}.ipynb does not exist"
            )
        _check_parameters(path, "defaults", notebook, defaults)
    results_dir = Path(results_dir or config.get("results_dir", "results"))
    if not results_dir.is_absolute():
        results_dir = ROOT / results_dir
    # notebooks run with the repository root as working directory: keep paths inside it relative, so
    # executed notebooks and stamps name no machine's paths
    shown = results_dir.relative_to(ROOT) if results_dir.is_relative_to(ROOT) else results_dir
    context = {"results_dir": str(shown), "profile": profile}
    runs: list[Run] = []
    for i, spec in enumerate(config["runs"]):
        unknown = set(spec) - {"notebook", "name", "parameters", "grid"}
        if unknown or "notebook" not in spec:
            raise StudyError(f"{path}: run {i} needs 'notebook' and may have name/parameters/grid; got {sorted(spec)}")
        notebook = spec["notebook"]
        if not (NOTEBOOKS / f"{notebook}.ipynb").exists():
            raise StudyError(
                f"{path}: run {i} names notebook {notebook!r}, but notebooks/{notebook}.ipynb does not exist"
            )
        base = {**config.get("defaults", {}).get(notebook, {}), **spec.get("parameters", {})}
        grid = spec.get("grid", {})
        keys = list(grid)
        for combo in itertools.product(*(grid[k] for k in keys)) if keys else [()]:
            params, suffix = dict(base), ""
            for key, value in zip(keys, combo, strict=True):
                if isinstance(value, dict):  # a bundle of parameters, e.g. a method and its knobs
                    if "name" not in value:
                        raise StudyError(f"{path}: run {i}: grid {key!r} entries that are mappings need a 'name'")
                    params.update({k: v for k, v in value.items() if k != "name"})
                    value = value["name"]
                else:
                    params[key] = value
                suffix += f"-{key}={_slug(value)}"
            name = f"{spec.get('name', notebook)}{suffix}"
            _check_parameters(path, f"run {name!r}", notebook, params)
            runs.append(Run(notebook, name, _fill(params, context)))
    names = [r.name for r in runs]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise StudyError(f"{path}: run names repeat: {sorted(duplicates)}; give the runs distinct 'name's")
    header = {k: v for k, v in config.items() if k != "runs"} | {"results_dir": str(results_dir)}
    return header, runs


def _export_html(notebook_path: Path) -> None:
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(notebook_path, as_version=4))
    tmp = notebook_path.with_suffix(".html.tmp")
    tmp.write_text(body)
    tmp.replace(notebook_path.with_suffix(".html"))


def execute_run(run: Run, out_dir: Path, kernel_name: str = "python3") -> Path:
    """Execute one run with papermill into ``out_dir``; a failure leaves ``<name>.failed.ipynb`` and raises."""
    import papermill

    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"{run.name}.ipynb"
    failed = out_dir / f"{run.name}.failed.ipynb"
    partial = out_dir / f"{run.name}.running.ipynb"
    try:
        papermill.execute_notebook(
            str(NOTEBOOKS / f"{run.notebook}.ipynb"),
            str(partial),
            parameters=run.parameters,
            kernel_name=kernel_name,
            cwd=str(ROOT),
            progress_bar=False,
        )
    except Exception:
        if partial.exists():
            partial.replace(failed)
        raise
    partial.replace(final)
    failed.unlink(missing_ok=True)
    return final


def run_study(
    profile: str,
    *,
    results_dir: str | Path | None = None,
    force: bool = False,
    only: str | None = None,
    html: bool = True,
) -> list[str]:
    """Execute every run of a profile; returns the names of the runs executed (not skipped)."""
    header, runs = load_study(profile, results_dir)
    if only:
        runs = [r for r in runs if only in r.name]
    out_dir = Path(header["results_dir"]) / "notebooks"
    executed, failures = [], []
    started = time.time()
    progress = tqdm(runs, desc=f"study {profile}", unit="notebook")
    for run in progress:
        progress.set_postfix_str(run.name)
        stamp = out_dir / f"{run.name}.done"
        if not force and stamp.exists() and json.loads(stamp.read_text()).get("parameters") == run.parameters:
            continue
        t0 = time.time()
        try:
            path = execute_run(run, out_dir)
        except Exception as err:  # keep going: report every failure at the end
            if hasattr(err, "ename"):  # papermill's execution error: the notebook's own exception
                reason = f"{err.ename}: {err.evalue} (in cell [{err.exec_count}])"
            else:
                reason = f"{type(err).__name__}: {str(err).strip()[:300]}"
            failures.append(f"{run.name} ({run.notebook}.ipynb): {reason}")
            continue
        if html:
            _export_html(path)
        stamp.write_text(json.dumps({"parameters": run.parameters, "seconds": round(time.time() - t0, 1)}, indent=2))
        executed.append(run.name)
    elapsed = time.time() - started
    summary = {"profile": profile, "runs": len(runs), "executed": len(executed), "seconds": round(elapsed, 1)}
    Path(header["results_dir"]).mkdir(parents=True, exist_ok=True)
    (Path(header["results_dir"]) / f"study-{profile}.json").write_text(json.dumps(summary, indent=2))
    if failures:
        kept = out_dir.relative_to(ROOT) if out_dir.is_relative_to(ROOT) else out_dir
        raise StudyError(
            f"{len(failures)} notebook(s) failed (kept as *.failed.ipynb in {kept}):\n" + "\n".join(failures)
        )
    return executed
