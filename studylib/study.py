"""The study runner: execute every notebook of a study config with papermill.

A study config (``studies/<profile>.yaml``) lists runs; each names a notebook and its parameters, and a
``grid`` of parameters to expand (every combination becomes one run; a grid entry may be a mapping with a
``name``, whose other keys are set together, e.g. a method with its knobs). ``{results_dir}`` and
``{profile}`` in string parameters are filled in. When a config loads (so ``--list`` catches them), its shape
(``runs`` a list of mappings, a grid a mapping of non-empty lists), a key given twice, its top-level keys, notebook
names, run names (one plain file name each), every parameter's name (defined by the notebook's ``parameters`` cell)
and type (a number where the default is a number; YAML 1.2 numbers, so ``1e-3`` is one) are checked, and a
language-model run's knobs as the run will check them: a mistake is a ``StudyConfigError`` (exit status 2).

Each run's executed notebook goes to ``<results_dir>/notebooks/<run name>.ipynb`` with an HTML export beside
it, both naming no path of the machine that ran it (``portable_notebook``). A run is skipped only if it is
complete on this machine (``is_complete``: its local ``.done`` stamp, never committed, records these parameters
and every output it wrote still exists), unless ``force``. A failing notebook is kept, with its error, as
``<run name>.failed.ipynb``; the runner finishes the other runs and then raises, naming every failure.
``study-<profile>.json`` records each run (status, seconds, code version), and the profile's ``compare`` tables
are compared with their committed versions at the end.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from studylib import provenance, stamps
from studylib.checks import ALSO_ACCEPTED, UserError, check_like_default, plain_name
from studylib.compare import what_moved
from studylib.results import git_commit, resolve, write_atomic
from studylib.stamps import notebook_stamp, recorded_run_folders  # noqa: F401 (as before)

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


class StudyConfigError(StudyError, UserError):
    """A study config is invalid: a user's mistake, named (the command line prints one line, exit status 2), unlike
    a notebook that fails (a ``StudyError`` only: exit status 1)."""


def _fill(value: Any, context: dict[str, str], where: str = "") -> Any:
    """``value`` with ``{results_dir}`` and ``{profile}`` filled in its strings; another brace is a
    ``StudyConfigError`` naming ``where`` and the string."""
    if isinstance(value, str):
        try:
            return value.format(**context) if "{" in value else value
        except (ValueError, KeyError, IndexError, AttributeError):
            raise StudyConfigError(
                f"{where}: {value!r} holds a brace that is not {{results_dir}} or {{profile}} (a brace of the text "
                "itself is written {{ or }})"
            ) from None
    if isinstance(value, list):
        return [_fill(v, context, where) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, context, where) for k, v in value.items()}
    return value


TOP_LEVEL_KEYS = ("profile", "description", "results_dir", "defaults", "runs", "compare")


class _Loader(yaml.SafeLoader):
    """YAML with 1.2's numbers: ``1e-3`` is a float (YAML 1.1, PyYAML's default, reads it as text); a key given twice
    in one mapping, at any depth, is a ``StudyConfigError`` naming the key, the file and both lines (PyYAML keeps
    the later value silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *defaults": its keys may be overridden
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class names it
                continue
            if first is not None:
                raise StudyConfigError(
                    f"{key_node.start_mark.name}: line {line}: key {key!r} is given twice (first on line {first}); "
                    "the later value would silently win"
                )
            seen[key] = line
        return super().construct_mapping(node, deep)


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
            also = ALSO_ACCEPTED.get(name, ())
            default = defaults.get(name)
            if default in also and isinstance(value, bool):  # bf16: "auto" by default, True or False by choice
                continue
            check_like_default(f"parameter {name!r} of {notebook}", value, default, also)
        except ValueError as err:
            raise StudyConfigError(f"{path}: {where}: {err}") from None


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
            raise StudyConfigError(f"{path}: run {run.name!r}: {err}") from None
        folder = str(config.run_dir())
        if folder in seen:
            raise StudyConfigError(
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


RUN_CHECKS = {"04_lm_alignment": _check_lm_runs}
"""Notebooks whose runs are checked further when a config loads, by what the notebook runs."""


def parameter_defaults(path: Path) -> dict[str, Any]:
    """``stamps.parameter_defaults``, a notebook without a ``parameters`` cell being a bad config."""
    try:
        return stamps.parameter_defaults(path)
    except LookupError as err:
        raise StudyConfigError(str(err)) from None


def notebook_parameters(path: Path) -> tuple[str, ...]:
    """The names a notebook's ``parameters`` cell assigns, in order."""
    return tuple(parameter_defaults(path))


def _check_parameters(path: Path, where: str, notebook: str, names: Any) -> None:
    accepted = notebook_parameters(NOTEBOOKS / f"{notebook}.ipynb")
    unknown = sorted(set(names) - set(accepted))
    if unknown:
        raise StudyConfigError(
            f"{path}: {where}: notebook {notebook!r} has no parameter(s) {unknown}; "
            f"its parameters cell defines: {', '.join(accepted)}"
        )


def _slug(value: Any) -> str:
    return str(value).replace("/", "-").replace(" ", "")


def load_study(profile: str, results_dir: str | Path | None = None) -> tuple[dict, list[Run]]:
    """Read and validate ``studies/<profile>.yaml``; return its header and the expanded list of runs.

    Every mistake in the file is a ``StudyConfigError`` naming the file and the line, run, key or parameter, raised
    before anything runs or is written. Relative paths: ``results_dir`` given here (``--results-dir`` on the command
    line) is relative to the working directory, as any path on a command line; the YAML's own paths (its
    ``results_dir`` and every path among the parameters) are relative to the repository root, the working directory
    its notebooks run in. Notebooks get the results folder relative to the root where it lies inside it (executed
    notebooks and stamps then name no path of the machine), absolute elsewhere.
    """
    path = STUDIES / f"{profile}.yaml"
    config = _read_config(path, profile)
    _check_shape(path, config)
    results = _results_folder(path, config, results_dir)
    shown = results.relative_to(ROOT) if results.is_relative_to(ROOT) else results
    context = {"results_dir": str(shown), "profile": profile}
    for entry in config.get("compare", []):
        _fill(entry if isinstance(entry, str) else entry["path"], context, f"{path}: compare")
    runs = [run for i, spec in enumerate(config["runs"]) for run in _expand(path, i, spec, config, context)]
    for notebook, check in RUN_CHECKS.items():
        if any(r.notebook == notebook for r in runs):
            check(path, [r for r in runs if r.notebook == notebook])
    names = [r.name for r in runs]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise StudyConfigError(f"{path}: run names repeat: {sorted(duplicates)}; give the runs distinct 'name's")
    header = {k: v for k, v in config.items() if k != "runs"} | {"results_dir": str(results)}
    return header, runs


def _read_config(path: Path, profile: str) -> Any:
    if not path.exists():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise StudyConfigError(f"no study profile {profile!r} (no {path}); known profiles: {', '.join(known)}")
    try:
        with path.open("rb") as handle:  # a file stream: YAML's errors name the file; bytes: it names bad UTF-8
            return yaml.load(handle, Loader=_Loader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as err:
        raise StudyConfigError(f"{path}: not valid YAML: {err}") from None


def _check_shape(path: Path, config: Any) -> None:
    """The top level of a study config: its keys, ``runs`` a non-empty list, ``defaults`` a mapping of notebook to
    parameters, ``compare`` a list of table paths (or of ``{path, keys}``)."""
    if not isinstance(config, dict):
        raise StudyConfigError(f"{path}: expected a mapping with 'profile' and 'runs', got {type(config).__name__}")
    for key in ("profile", "runs"):
        if key not in config:
            raise StudyConfigError(f"{path}: missing key {key!r}")
    unknown = sorted(set(config) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise StudyConfigError(f"{path}: unknown key(s) {unknown}; accepted: {', '.join(TOP_LEVEL_KEYS)}")
    if not isinstance(config["runs"], list):
        raise StudyConfigError(f"{path}: 'runs' must be a list of runs, got {_short(config['runs'])}")
    if not config["runs"]:
        raise StudyConfigError(f"{path}: 'runs' is empty: nothing to run")
    defaults = config.get("defaults", {})
    if not isinstance(defaults, dict):
        raise StudyConfigError(
            f"{path}: 'defaults' must be a mapping of notebook to parameters, got {_short(defaults)}"
        )
    for notebook, params in defaults.items():
        if not (NOTEBOOKS / f"{notebook}.ipynb").exists():
            raise StudyConfigError(
                f"{path}: defaults name notebook {notebook!r}, but notebooks/{notebook}.ipynb does not exist"
            )
        if not isinstance(params, dict):
            raise StudyConfigError(
                f"{path}: defaults of {notebook!r} must be a mapping of parameters, got {_short(params)}"
            )
        _check_parameters(path, "defaults", notebook, params)
    compare = config.get("compare", [])
    tables = isinstance(compare, list) and all(
        isinstance(e, str) or (isinstance(e, dict) and isinstance(e.get("path"), str)) for e in compare
    )
    if not tables:
        raise StudyConfigError(f"{path}: 'compare' must be a list of table paths (or of {{path, keys}} mappings)")


def _results_folder(path: Path, config: dict, given: str | Path | None) -> Path:
    """The study's results folder, absolute: ``given`` (relative to the working directory) or the YAML's
    ``results_dir`` (relative to the repository root); refused if it is a file or the repository's root."""
    if given:
        folder = Path(given).expanduser()
    else:
        folder = config.get("results_dir", "results")
        if not isinstance(folder, str) or not folder.strip():
            raise StudyConfigError(
                f"{path}: 'results_dir' must be a folder (relative to the repository root), got {folder!r}"
            )
        folder = ROOT / folder
    folder = Path(os.path.abspath(folder))
    if folder == ROOT:
        raise StudyConfigError(
            f"{path}: the results folder {folder} is the repository's root: executed notebooks would overwrite "
            "its notebooks/"
        )
    if folder.exists() and not folder.is_dir():
        raise StudyConfigError(f"{path}: the results folder {folder} is a file")
    return folder


def _expand(path: Path, i: int, spec: Any, config: dict, context: dict[str, str]) -> list[Run]:
    """Run ``i`` of a config (``spec``), checked and expanded over its grid: one ``Run`` per combination."""
    if not isinstance(spec, dict):
        raise StudyConfigError(f"{path}: run {i} must be a mapping with a 'notebook', got {_short(spec)}")
    unknown = set(spec) - {"notebook", "name", "parameters", "grid"}
    if unknown or "notebook" not in spec:
        raise StudyConfigError(
            f"{path}: run {i} needs 'notebook' and may have name/parameters/grid; got {sorted(map(str, spec))}"
        )
    notebook = spec["notebook"]
    if not isinstance(notebook, str) or not (NOTEBOOKS / f"{notebook}.ipynb").exists():
        raise StudyConfigError(
            f"{path}: run {i} names notebook {notebook!r}, but notebooks/{notebook}.ipynb does not exist"
        )
    prefix = spec.get("name", notebook)
    if not isinstance(prefix, str):
        raise StudyConfigError(f"{path}: run {i}: 'name' must be a string, got {_short(prefix)}")
    where = f"{path}: run {i} ({prefix!r})"
    parameters, grid = spec.get("parameters", {}), _grid(where, spec.get("grid", {}))
    if not isinstance(parameters, dict):
        raise StudyConfigError(f"{where}: 'parameters' must be a mapping, got {_short(parameters)}")
    base = {**config.get("defaults", {}).get(notebook, {}), **parameters}
    runs = []
    for combo in itertools.product(*grid.values()):  # no grid: one empty combination
        params, suffix = dict(base), ""
        for key, value in zip(grid, combo, strict=True):
            if isinstance(value, dict):  # a bundle of parameters, e.g. a method and its knobs
                if "name" not in value:
                    raise StudyConfigError(f"{where}: grid {key!r} entries that are mappings need a 'name'")
                params.update({k: v for k, v in value.items() if k != "name"})
                value = value["name"]
            else:
                params[key] = value
            suffix += f"-{key}={_slug(value)}"
        name = f"{prefix}{suffix}"
        if not plain_name(name):
            raise StudyConfigError(
                f"{where}: the run's name {name!r} must be one plain file name inside the notebooks folder (no '/', "
                "'\\', '..' or absolute path): its executed notebook and stamp are named by it"
            )
        _check_parameters(path, f"run {name!r}", notebook, params)
        params = {k: _fill(v, context, f"{path}: run {name!r}: parameter {k!r}") for k, v in params.items()}
        _check_types(path, f"run {name!r}", notebook, params)
        runs.append(Run(notebook, name, params))
    return runs


def _grid(where: str, grid: Any) -> dict[str, list]:
    """A run's grid, checked: a mapping of parameter to a non-empty list of values (an empty one expands to nothing,
    a scalar is not a grid, and a string would be iterated letter by letter)."""
    if not isinstance(grid, dict):
        raise StudyConfigError(f"{where}: grid must be a mapping of parameter to a list of values, got {_short(grid)}")
    for key, values in grid.items():
        if not isinstance(values, list):
            raise StudyConfigError(f"{where}: grid {key!r} must be a list of values, got {_short(values)}")
        if not values:
            raise StudyConfigError(f"{where}: grid {key!r} is an empty list: the run would expand to no notebook")
    return grid


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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


KERNEL_QUIET = ["--IPKernelApp.log_level=CRITICAL"]
"""The kernel's own log stays out of the study's output: its warning that it talks to papermill over plain TCP (on
this machine's loopback), once per notebook, and the error it logs for the interrupt papermill sends it at shutdown
say nothing about the notebook. A cell's error and a kernel that dies still reach the runner through papermill."""


def execute_run(run: Run, out_dir: Path, kernel_name: str = "python3") -> Path:
    """Execute one run with papermill into ``out_dir`` (the kernel's own log silenced: ``KERNEL_QUIET``); a failure
    leaves ``<name>.failed.ipynb`` and raises."""
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
            extra_arguments=KERNEL_QUIET,
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
    """A run is complete when this machine ran it with these parameters, every file it wrote is still there, and
    none of its sources (the code, data and tables it read: ``studylib.provenance``) has changed since.

    The stamp (``<run>.done``, never committed) records the parameters, the outputs and the sources, as the run's
    entry in ``study-<profile>.json`` does, and is judged the same way (``is_current``); a deleted output or an
    edited source makes its run stale, so it is rebuilt.
    """
    if not stamp.is_file():
        return False
    record = json.loads(stamp.read_text())
    if "outputs" not in record or "parameters" not in record:  # a stamp of the old kind: run again
        return False
    return is_current(run, record | {"status": "executed"}, out_dir)


def _record(path: str) -> bool:
    """Whether ``path`` is a study runner's record (``study-<profile>.json``): never a run's source, since the
    runner rewrites it as each run ends (the report's own entry included); the run folders it names are read, and
    those files are the report's sources."""
    name = Path(path).name
    return name.startswith("study-") and name.endswith(".json")


def is_current(run: Run, entry: Mapping[str, Any] | None, out_dir: Path) -> bool:
    """A run whose recorded result (its ``entry`` in ``study-<profile>.json``, committed) is up to date: made with
    these parameters from sources that have not changed since (``provenance.stale_reasons``), its executed notebook
    and every output still there and reading back. ``make study`` on a fresh clone skips such runs, as make skips
    a target newer than its sources; ``--force`` runs them anyway."""
    if not entry or provenance.stale_reasons(run.parameters, entry, ROOT):
        return False
    outputs = [ROOT / o for o in entry.get("outputs", [])]
    return (out_dir / f"{run.name}.ipynb").is_file() and all(readable(o) for o in outputs)


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
    """``study-<profile>.json``: one entry per run of the profile, in its order (status, seconds, commit, the one
    machine its seconds were measured on, its parameters, outputs and sources, and the run folders it wrote), and
    ``seconds_by_machine``: the seconds of the recorded runs summed per machine, naming the runs each sum holds
    (never one total over machines)."""
    ordered = {name: runs[name] for name in names if name in runs}
    by_machine: dict[str, dict[str, Any]] = {}
    for name, entry in ordered.items():
        if entry.get("seconds") is not None:
            total = by_machine.setdefault(machine_label(entry.get("machine")), {"seconds": 0.0, "runs": []})
            total["seconds"] = round(total["seconds"] + entry["seconds"], 1)
            total["runs"].append(name)
    summary = {"profile": profile, "seconds_by_machine": by_machine, "runs": ordered}
    write_atomic(path, json.dumps(summary, indent=2))


def machine_label(recorded: Mapping[str, Any] | None) -> str:
    """One line naming a recorded ``machine()``: processor, cores and native bf16 (``unrecorded`` if none)."""
    if not recorded:
        return "unrecorded machine"
    bf16 = "native bf16" if recorded.get("native_bf16") else "no native bf16"
    return f"{recorded.get('processor')}, {recorded.get('cores')} cores, {bf16}"


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
        if not force and (is_complete(run, stamp, out_dir) or is_current(run, previous.get(run.name), out_dir)):
            entry = previous.setdefault(run.name, {"notebook": run.notebook})
            entry["status"] = "complete, skipped"
            outputs = json.loads(stamp.read_text())["outputs"] if stamp.is_file() else entry.get("outputs", [])
            entry.setdefault("run_folders", run_folders_written(outputs, results))
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
        sources = {p: h for p, h in provenance.run_sources(run.notebook, outputs, ROOT).items() if not _record(p)}
        record = {"parameters": run.parameters, "seconds": seconds, "commit": commit, "outputs": outputs}
        write_atomic(stamp, json.dumps(record | {"sources": sources}, indent=2))
        previous[run.name] = {"notebook": run.notebook, "status": "executed", "seconds": seconds, "commit": commit}
        previous[run.name]["machine"] = here  # what these seconds were measured on
        previous[run.name]["run_folders"] = run_folders_written(outputs, results)  # what the report reads
        previous[run.name] |= {"parameters": run.parameters, "outputs": outputs, "sources": sources}
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


def recorded_runs(profile: str, results_dir: str | Path | None = None) -> tuple[list[Run], dict[str, dict]]:
    """A profile's runs as its config lists them now, and their entries in its ``study-<profile>.json`` (empty
    where none is recorded)."""
    header, runs = load_study(profile, results_dir)
    path = Path(header["results_dir"]) / f"study-{profile}.json"
    return runs, json.loads(path.read_text()).get("runs", {}) if path.is_file() else {}


def stale_runs(runs: list[Run], recorded: Mapping[str, dict]) -> dict[str, list[str]]:
    """Every run of ``runs`` whose recorded result (``recorded``, from ``recorded_runs``) no longer matches what
    would make it now, with the reasons (``provenance.stale_reasons``: never run, sources not recorded, parameters,
    a changed or missing source or output); runs that are current are left out."""
    stale = {}
    for run in runs:
        reasons = provenance.stale_reasons(run.parameters, recorded.get(run.name), ROOT)
        if reasons:
            stale[run.name] = reasons
    return stale


def elsewhere(runs: list[Run], recorded: Mapping[str, dict]) -> dict[str, str]:
    """The runs of ``runs`` whose recorded time (``recorded``, from ``recorded_runs``) was measured on another kind
    of machine than this one, by run: the machine's label (``machine_label``). A result's numbers do not depend on
    the processor, except through ``bf16: auto``'s choice of precision, which the label names."""
    here = machine_label(machine())
    labels = {run.name: machine_label(recorded[run.name].get("machine")) for run in runs if run.name in recorded}
    return {name: label for name, label in labels.items() if label != here}
