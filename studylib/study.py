"""The study runner: execute every notebook of a study config with papermill.

A study config (``studies/<profile>.yaml``) lists runs; each names a notebook and its parameters, and a
``grid`` of parameters to expand (every combination becomes one run; a grid entry may be a mapping with a
``name``, whose other keys are set together, e.g. a method with its knobs). ``{results_dir}`` and
``{profile}`` in string parameters are filled in. When a config loads (so ``--list`` catches them), its
top-level keys, notebook names, every parameter's name (defined by the notebook's ``parameters`` cell) and
type (a number where the default is a number; YAML 1.2 numbers, so ``1e-3`` is one) are checked, and a
language-model run's knobs as the run will check them.

Each run's executed notebook goes to ``<results_dir>/notebooks/<run name>.ipynb`` with an HTML export beside
it, both naming no path of the machine that ran it (``portable_notebook``). A run is skipped only if it is
complete on this machine (``is_complete``: its local ``.done`` stamp, never committed, records these parameters
and every output it wrote still exists), unless ``force``. A failing notebook is kept, with its error, as
``<run name>.failed.ipynb``; the runner finishes the other runs and then raises, naming every failure.
``study-<profile>.json`` records each run (status, seconds, code version), and the profile's ``compare`` tables
are compared with their committed versions at the end.
"""

from __future__ import annotations

import ast
import itertools
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from studylib.checks import ALSO_ACCEPTED, check_like_default
from studylib.compare import what_moved
from studylib.results import git_commit, resolve, write_atomic

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


TOP_LEVEL_KEYS = ("profile", "description", "results_dir", "defaults", "runs", "compare")


class _Loader(yaml.SafeLoader):
    """YAML with 1.2's numbers: ``1e-3`` is a float (YAML 1.1, PyYAML's default, reads it as text)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _check_types(path: Path, where: str, notebook: str, params: dict[str, Any]) -> None:
    """Each parameter must be like its default in the notebook's parameters cell (``checks.check_like_default``)."""
    defaults = parameter_defaults(NOTEBOOKS / f"{notebook}.ipynb")
    for name, value in params.items():
        try:
            also = ALSO_ACCEPTED.get(name, ()) if notebook == "04_lm_alignment" else ()
            check_like_default(f"parameter {name!r} of {notebook}", value, defaults.get(name), also)
        except ValueError as err:
            raise StudyError(f"{path}: {where}: {err}") from None


def _check_lm_runs(path: Path, runs: list[Run]) -> None:
    """Language-model runs, checked as the notebook will run them: its parameters cell's defaults under the run's
    parameters, through ``RunConfig.from_flat``; and no two runs the same run (same knobs, same folder)."""
    from studylib.lm.config import RunConfig

    defaults = parameter_defaults(NOTEBOOKS / "04_lm_alignment.ipynb")
    seen: dict[str, str] = {}
    for run in runs:
        try:
            config = RunConfig.from_flat(defaults | run.parameters)
        except (ValueError, TypeError, KeyError) as err:
            raise StudyError(f"{path}: run {run.name!r}: {err}") from None
        folder = str(config.run_dir())
        if folder in seen:
            raise StudyError(
                f"{path}: runs {seen[folder]!r} and {run.name!r} are the same run (every knob that changes a result "
                f"agrees, one folder {config.name()}): list it once"
            )
        seen[folder] = run.name


def run_folders_written(outputs: list[str], results: Path) -> list[str]:
    """The run folders among a run's ``outputs`` (those holding a ``metrics.json`` it wrote), relative to the results
    folder ``results``: what the runner records for the report to read."""
    folders = set()
    for output in outputs:
        path = ROOT / output
        if path.name == "metrics.json" and path.parent.is_relative_to(results):
            folders.add(str(path.parent.relative_to(results)))
    return sorted(folders)


def recorded_run_folders(record: str | Path, notebook: str = "04_lm_alignment") -> list[str]:
    """The names of the run folders that ``notebook``'s runs of a study wrote, as the runner recorded them in its
    ``study-<profile>.json`` (``record``): what a profile's report reads, so that runs of other configs left in the
    same results folder (an earlier config's, committed or not) are never mixed into its tables."""
    path = resolve(record)
    if not path.is_file():
        raise StudyError(f"{record}: no record of the study's runs (the runner writes it: python -m studylib study)")
    runs = [r for r in json.loads(path.read_text()).get("runs", {}).values() if r.get("notebook") == notebook]
    return sorted(Path(folder).name for r in runs for folder in r.get("run_folders", []))


RUN_CHECKS = {"04_lm_alignment": _check_lm_runs}
"""Notebooks whose runs are checked further when a config loads, by what the notebook runs."""


def parameter_defaults(path: Path) -> dict[str, Any]:
    """The names a notebook's ``parameters`` cell assigns, in order, each with its literal default (None where the
    value is not a literal), as papermill reads them (``papermill.inspect_notebook``: the cell is parsed, not run)."""
    import papermill

    found = papermill.inspect_notebook(str(path))
    if not found and not any("parameters" in c.get("metadata", {}).get("tags", []) for c in _cells(path)):
        raise StudyError(f"{path} has no cell tagged 'parameters'")  # papermill says {} for that too
    defaults: dict[str, Any] = {}
    for name, parameter in found.items():
        try:
            defaults[name] = ast.literal_eval(parameter["default"])
        except (ValueError, SyntaxError):
            defaults[name] = None
    return defaults


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def notebook_parameters(path: Path) -> tuple[str, ...]:
    """The names a notebook's ``parameters`` cell assigns, in order."""
    return tuple(parameter_defaults(path))


def notebook_stamp(notebook: str, namespace: Mapping[str, Any], seed: Any = None) -> dict[str, Any]:
    """A notebook's stamp for ``studylib.results``: its name, the values its parameters cell defines (read from
    ``namespace``, the notebook's globals; ``out_dir`` left out), and the seed."""
    names = notebook_parameters(NOTEBOOKS / f"{notebook}.ipynb")
    params = {name: namespace[name] for name in names if name != "out_dir"}
    return {"notebook": notebook, "params": params, "seed": seed}


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
    try:
        with path.open() as handle:  # a file stream: YAML's errors name the file, not "<unicode string>"
            config = yaml.load(handle, Loader=_Loader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as err:
        raise StudyError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(config, dict):
        raise StudyError(f"{path}: expected a mapping with 'profile' and 'runs', got {type(config).__name__}")
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
            params = _fill(params, context)
            _check_types(path, f"run {name!r}", notebook, params)
            runs.append(Run(notebook, name, params))
    for notebook, check in RUN_CHECKS.items():
        if any(r.notebook == notebook for r in runs):
            check(path, [r for r in runs if r.notebook == notebook])
    names = [r.name for r in runs]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise StudyError(f"{path}: run names repeat: {sorted(duplicates)}; give the runs distinct 'name's")
    header = {k: v for k, v in config.items() if k != "runs"} | {"results_dir": str(results_dir)}
    return header, runs


TEXT_MIME = ("text/", "application/json", "application/javascript", "image/svg+xml")
"""Output data of these types is text, whose paths ``portable_notebook`` rewrites (the others are base64)."""


def portable_text(text: str, root: Path = ROOT) -> str:
    """``text`` without this machine's absolute paths: the repository's made relative (``<root>/a/b`` becomes
    ``a/b``, ``<root>`` alone ``.``) and the home folder's written with ``~``."""
    prefixes = [(root, ".")]
    if len(Path.home().parts) > 1:  # a home folder that is not "/"
        prefixes.append((Path.home(), "~"))
    for prefix, short in prefixes:
        # where a path starts (after a space, a quote, a colour code), not inside another path (/mnt<root>)
        here = r"(?:(?<![\w.~/-])|(?<=[\d;\[]m))" + re.escape(str(prefix))
        text = re.sub(here + "/", "" if short == "." else short + "/", text)
        text = re.sub(here + r"(?![\w.-])", short, text)
    return text


def _portable(value: Any, root: Path) -> Any:
    if isinstance(value, str):
        return portable_text(value, root)
    if isinstance(value, list):
        return [_portable(v, root) for v in value]
    return value


def portable_notebook(nb: dict[str, Any], output_path: Path, root: Path = ROOT) -> dict[str, Any]:
    """Rewrite an executed notebook (in place; returned) so that it names no path of the machine that ran it:
    papermill's ``input_path``, and ``output_path`` set to ``output_path`` (where the runner keeps it, not where
    papermill wrote it), relative to ``root``; and the same paths in the cells' printed text, errors and text
    outputs (a warning's file, a "saved to" line) by ``portable_text``."""
    papermill = nb.get("metadata", {}).get("papermill")
    if papermill is not None:
        papermill["input_path"] = _portable(papermill.get("input_path"), root)
        papermill["output_path"] = portable_text(str(output_path), root)
    for cell in nb.get("cells", []):
        for output in cell.get("outputs", []):
            for key in ("text", "traceback", "evalue"):
                if key in output:
                    output[key] = _portable(output[key], root)
            data = output.get("data", {})
            for mime in data:
                if mime.startswith(TEXT_MIME):
                    data[mime] = _portable(data[mime], root)
    return nb


def _keep(written: Path, kept: Path) -> None:
    """Move papermill's notebook ``written`` to ``kept`` (atomically), its machine's paths made portable."""
    import nbformat

    nb = nbformat.read(written, as_version=4)
    write_atomic(kept, nbformat.writes(portable_notebook(nb, kept, ROOT)))
    written.unlink()


def executed_notebooks(profile: str, results_dir: str | Path | None = None) -> list[Path]:
    """Where ``run_study`` keeps the executed notebooks of a profile's runs, one per run:
    ``<results_dir>/notebooks/<run name>.ipynb`` (each with its HTML export beside it)."""
    header, runs = load_study(profile, results_dir)
    return [_notebooks_dir(header) / f"{run.name}.ipynb" for run in runs]


def _notebooks_dir(header: dict) -> Path:
    return Path(header["results_dir"]) / "notebooks"


def _export_html(notebook_path: Path) -> None:
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(notebook_path, as_version=4))
    write_atomic(notebook_path.with_suffix(".html"), body)


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
            _keep(partial, failed)
        raise
    _keep(partial, final)
    failed.unlink(missing_ok=True)
    return final


def _mtimes(root: Path) -> dict[Path, int]:
    """Modification times of every file under ``root`` except the runner's own (executed notebooks, stamps)."""
    if not root.is_dir():
        return {}
    notebooks = root / "notebooks"
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and notebooks not in p.parents}


def is_complete(run: Run, stamp: Path, out_dir: Path) -> bool:
    """A run is complete when this machine ran it with these parameters and every file it wrote is still there.

    The stamp (``<run>.done``, never committed) records the parameters and the outputs; a fresh clone has
    none, so it runs everything; a deleted output makes its run stale, so it is rebuilt.
    """
    if not stamp.is_file() or not (out_dir / f"{run.name}.ipynb").is_file():
        return False
    record = json.loads(stamp.read_text())
    if "outputs" not in record:  # a stamp of the old kind, which knew nothing of outputs: run again
        return False
    outputs = [ROOT / o for o in record["outputs"]]
    return record.get("parameters") == run.parameters and all(o.is_file() and readable(o) for o in outputs)


def readable(path: Path) -> bool:
    """Whether a result file reads back whole: JSON (``.json``, ``.ipynb``) parses; a CSV is not empty and ends with
    its last row's newline (a file cut short mid-row does not); other files only need to be there. (A CSV is not
    parsed: completions may hold a lone carriage return, which a CSV reader takes for the end of a row.)"""
    try:
        if path.suffix in (".json", ".ipynb"):
            json.loads(path.read_text())
        elif path.suffix == ".csv":
            data = path.read_bytes()
            return len(data) > 0 and data.endswith(b"\n")
    except (OSError, ValueError):
        return False
    return True


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def machine() -> dict[str, Any]:
    """What a run's time was measured on (recorded with each executed run in ``study-<profile>.json``): the
    processor, its cores, and whether it runs bf16 natively."""
    import os

    from studylib.lm.runtime import cpu_bf16_support, processor_name

    native, why = cpu_bf16_support()
    return {"processor": processor_name(), "cores": os.cpu_count(), "native_bf16": native, "bf16_decided_by": why}


def _write_summary(path: Path, profile: str, runs: dict[str, dict], names: list[str]) -> None:
    """``study-<profile>.json``: one entry per run of the profile, in its order (status, seconds, commit, machine,
    and the run folders a run wrote), and the total seconds of the recorded runs."""
    ordered = {name: runs[name] for name in names if name in runs}
    total = round(sum(r.get("seconds", 0.0) for r in ordered.values()), 1)
    write_atomic(path, json.dumps({"profile": profile, "seconds_of_recorded_runs": total, "runs": ordered}, indent=2))


def time_left(seconds: Mapping[str, float | None], names: list[str]) -> str:
    """An estimate of the time the runs ``names`` will take, from their last recorded ``seconds`` (the committed
    ``study-<profile>.json``: another machine's times scale with its speed), and how many were never timed."""
    known = [seconds[n] for n in names if seconds.get(n)]
    untimed = len(names) - len(known)
    estimate = f"about {sum(known) / 60:.0f} min left by the last recorded times" if known else "no recorded times"
    return estimate + (f" (+{untimed} run(s) never timed)" if untimed and known else "")


def run_study(
    profile: str,
    *,
    results_dir: str | Path | None = None,
    force: bool = False,
    only: str | None = None,
    html: bool = True,
) -> list[str]:
    """Execute every run of a profile that is not complete (``is_complete``), or every run with ``force``;
    returns the names of the runs executed.

    Writes ``<results_dir>/study-<profile>.json`` after each run, with one entry per run (status, seconds, code
    version, and ``run_folders``: the run folders it wrote, relative to ``results_dir``, which the report reads) and,
    for the profile's ``compare`` tables, prints what moved against their committed versions.
    """
    header, runs = load_study(profile, results_dir)
    if only:
        runs = [r for r in runs if only in r.name]
    results = Path(header["results_dir"])
    out_dir = _notebooks_dir(header)
    summary_path = results / f"study-{profile}.json"
    previous = json.loads(summary_path.read_text()).get("runs", {}) if summary_path.is_file() else {}
    if not isinstance(previous, dict):
        previous = {}
    executed, failures = [], []
    all_names = [r.name for r in load_study(profile, results_dir)[1]]
    commit = git_commit()
    progress = tqdm(runs, desc=f"study {profile}", unit="notebook")
    here = machine()
    timed_before = {name: entry.get("seconds") for name, entry in previous.items()}  # the last recorded durations
    for i, run in enumerate(progress):
        progress.set_postfix_str(f"{run.name}; {time_left(timed_before, [r.name for r in runs[i:]])}")
        stamp = out_dir / f"{run.name}.done"
        if not force and is_complete(run, stamp, out_dir):
            entry = previous.setdefault(run.name, {"notebook": run.notebook})
            entry["status"] = "complete, skipped"
            entry.setdefault("run_folders", run_folders_written(json.loads(stamp.read_text())["outputs"], results))
            _write_summary(summary_path, profile, previous, all_names)
            continue
        before, t0 = _mtimes(results), time.time()
        try:
            path = execute_run(run, out_dir)
        except Exception as err:  # keep going: report every failure at the end
            if hasattr(err, "ename"):  # papermill's execution error: the notebook's own exception
                reason = f"{err.ename}: {err.evalue} (in cell [{err.exec_count}])"
            else:
                reason = f"{type(err).__name__}: {str(err).strip()[:300]}"
            failed = out_dir / f"{run.name}.failed.ipynb"
            kept = f"kept as {_shown(failed)}" if failed.exists() else "no notebook was written"
            failures.append(f"{run.name} ({run.notebook}.ipynb): {reason} [{kept}]")
            stamp.unlink(missing_ok=True)
            previous[run.name] = {"notebook": run.notebook, "status": "failed", "reason": reason, "commit": commit}
            _write_summary(summary_path, profile, previous, all_names)
            continue
        if html:
            _export_html(path)
        seconds = round(time.time() - t0, 1)
        outputs = sorted(_shown(p) for p, m in _mtimes(results).items() if before.get(p) != m)
        record = {"parameters": run.parameters, "seconds": seconds, "commit": commit, "outputs": outputs}
        write_atomic(stamp, json.dumps(record, indent=2))
        previous[run.name] = {"notebook": run.notebook, "status": "executed", "seconds": seconds, "commit": commit}
        previous[run.name]["machine"] = here  # what these seconds were measured on
        previous[run.name]["run_folders"] = run_folders_written(outputs, results)  # what the report reads
        executed.append(run.name)
        _write_summary(summary_path, profile, previous, all_names)  # after each run: a later one (05) reads it
    if executed and header.get("compare"):
        context = {"results_dir": _shown(results), "profile": profile}
        tables = []
        for entry in header["compare"]:  # a path, or {path, keys}
            entry = entry if isinstance(entry, dict) else {"path": entry}
            tables.append((resolve(_fill(entry["path"], context)), entry.get("keys")))
        try:
            moved = what_moved(tables)
        except Exception as err:  # a comparison must never hide the runs' own failures
            moved = [f"could not compare: {type(err).__name__}: {err}"]
        print("What moved against the committed tables:\n  " + "\n  ".join(moved))
    if failures:
        raise StudyError(f"{len(failures)} notebook(s) failed:\n" + "\n".join(failures))
    return executed
