"""Command line: ``python -m studylib study --profile cpu`` (see ``studies/`` for the profiles)."""

from __future__ import annotations

import argparse
import errno
import sys
import time
from pathlib import Path

from tqdm import tqdm

from studylib.checks import UserError, unique_keys
from studylib.study import StudyError, load_study, run_study

USER_MISTAKES = (UserError, FileNotFoundError)
"""Raised for what the user gave (a knob, a file, a row; a study config: ``StudyConfigError``): printed as one
line, exit status 2 (``--debug``: the traceback). Anything else is a bug and keeps its traceback."""
MACHINE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR)
"""OS errors of the machine rather than the code (a full disk, a folder that cannot be written): one line naming
the file, exit status 2, as a user's mistake."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="studylib", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user mistake too")
    commands = parser.add_subparsers(dest="command", required=True)
    study = commands.add_parser("study", help="execute every notebook of a study profile with papermill")
    study.add_argument("--profile", default="cpu", help="studies/<profile>.yaml: smoke, cpu (default) or paper")
    study.add_argument(
        "--results-dir", default=None, help="where results go (default: the profile's); relative: to this folder"
    )
    study.add_argument("--force", action="store_true", help="re-run notebooks that already completed")
    study.add_argument("--only", default=None, help="run only the runs whose name contains this text")
    study.add_argument("--no-html", action="store_true", help="skip the HTML export of executed notebooks")
    study.add_argument("--list", action="store_true", help="validate the config and list its runs; execute nothing")
    study.add_argument(
        "--stale", action="store_true", help="list the runs whose results are older than their code, data or config"
    )
    docs = commands.add_parser("docs", help="render README.md and docs/ from their templates over the tables")
    docs.add_argument("--check", action="store_true", help="write nothing; exit 1 if a rendered file differs")
    train = commands.add_parser("train", help="one language-model run (notebook 04's steps), e.g. under accelerate")
    train.add_argument(
        "--params",
        required=True,
        help="JSON file of flat RunConfig knobs (notebook 04's parameters); relative paths in it: to this folder",
    )
    args = parser.parse_args(argv)
    try:
        return run_command(args)
    except Exception as err:
        status = exit_status(err)
        if status is None or (status == 2 and args.debug):
            raise
        # tqdm.write: on a line of its own, below a progress bar that the error left half drawn
        tqdm.write(f"error: {one_line(err) if status == 2 else err}", file=sys.stderr)
        return status


def exit_status(err: BaseException) -> int | None:
    """2 for a user's mistake or the machine's (``USER_MISTAKES``, ``MACHINE_ERRORS``: printed on one line); 1 for a
    study whose notebooks failed (a ``StudyError`` that is not a config's: each failure on a line of its own); None
    for anything else, a bug (its traceback)."""
    if isinstance(err, USER_MISTAKES) or (isinstance(err, OSError) and err.errno in MACHINE_ERRORS):
        return 2
    return 1 if isinstance(err, StudyError) else None


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command; errors go up to ``main``."""
    if args.command == "docs":
        return run_docs(check=args.check)
    if args.command == "train":
        return run_training(args.params)
    if args.list:
        header, runs = load_study(args.profile, args.results_dir)
        print(f"profile {header['profile']}: {len(runs)} runs -> {header['results_dir']}")
        for run in runs:
            print(f"  {run.name}: {run.parameters}")
        return 0
    if args.stale:
        return print_stale(args.profile, args.results_dir)
    start = time.time()
    executed = run_study(
        args.profile, results_dir=args.results_dir, force=args.force, only=args.only, html=not args.no_html
    )
    print(f"study {args.profile}: executed {len(executed)} notebook(s) in {time.time() - start:.0f} s")
    return 0


def run_docs(check: bool) -> int:
    """``docs``: render every template of ``docs/templates`` over the committed tables (``studylib.prose``);
    with ``check``, write nothing and exit 1 naming each file that differs, with its diff."""
    from studylib import prose

    if check:
        found = prose.differences()
        for path, diff in found.items():
            print(f"{path.name} differs from its template rendered over the tables:\n{diff}", file=sys.stderr)
        print(f"docs: {len(found)} file(s) differ from their templates" if found else "docs: all rendered files agree")
        return 1 if found else 0
    changed = prose.write_all()
    print(f"docs: {len(changed)} file(s) rewritten" + "".join(f"\n  {p}" for p in changed))
    return 0


def print_stale(profile: str, results_dir: str | None) -> int:
    """``--stale``: each run of the profile whose committed result no longer matches its sources, with why, and
    the runs whose time was measured on another machine; exit 0 either way (``make study`` reruns the stale)."""
    from studylib.study import elsewhere, recorded_runs, stale_runs

    runs, recorded = recorded_runs(profile, results_dir)
    stale = stale_runs(runs, recorded)
    print(f"profile {profile}: {len(stale)} of {len(runs)} runs stale")
    for name, reasons in stale.items():
        shown = reasons if len(reasons) <= 6 else [*reasons[:5], f"and {len(reasons) - 5} more"]
        print(f"  {name}: " + "; ".join(shown))
    other = elsewhere(runs, recorded)
    if other:
        print(f"{len(other)} run(s) were timed on another machine than this one:")
        for name, label in other.items():
            print(f"  {name}: {label}")
    return 0


def one_line(err: BaseException) -> str:
    """The error's message on one line (an OS error's names its file: ``Permission denied: <path>``)."""
    if isinstance(err, OSError) and err.strerror:
        text = f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    else:
        text = str(err)
    return " ".join(text.split())


def run_training(params_path: str) -> int:
    """``python -m studylib train --params run.json``: a RunConfig from flat JSON knobs (a key given once; relative
    paths among them relative to the working directory, ``studylib.lm.config``), run whole."""
    import json

    from studylib.lm.config import RunConfig
    from studylib.lm.experiment import run_experiment

    try:
        knobs = json.loads(Path(params_path).read_text(encoding="utf-8"), object_pairs_hook=unique_keys(params_path))
    except UserError:
        raise
    except ValueError as err:  # not JSON, or not UTF-8
        raise UserError(f"{params_path}: not a JSON file of run knobs ({err})") from err
    if not isinstance(knobs, dict):
        raise UserError(f"{params_path}: must hold one JSON object of run knobs, got {type(knobs).__name__}")
    try:
        config = RunConfig.from_flat(knobs)
    except (ValueError, TypeError) as err:
        raise UserError(f"{params_path}: {err}") from err
    metrics = run_experiment(config)
    if metrics:
        print(json.dumps({k: metrics[k] for k in ("win_rate", "approval", "kl", "length", "steps")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
