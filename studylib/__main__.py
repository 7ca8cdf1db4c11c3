"""Command line: ``python -m studylib study --profile cpu`` (see ``studies/`` for the profiles)."""

from __future__ import annotations

import argparse
import sys
import time

from studylib.checks import UserError
from studylib.study import StudyError, load_study, run_study

USER_MISTAKES = (UserError, FileNotFoundError)
"""Raised for what the user gave (a knob, a file, a row): printed as one line, exit status 2 (``--debug``: the
traceback). Anything else is a bug and keeps its traceback."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="studylib", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user mistake too")
    commands = parser.add_subparsers(dest="command", required=True)
    study = commands.add_parser("study", help="execute every notebook of a study profile with papermill")
    study.add_argument("--profile", default="cpu", help="studies/<profile>.yaml: smoke, cpu (default) or paper")
    study.add_argument("--results-dir", default=None, help="where results go (default: the profile's)")
    study.add_argument("--force", action="store_true", help="re-run notebooks that already completed")
    study.add_argument("--only", default=None, help="run only the runs whose name contains this text")
    study.add_argument("--no-html", action="store_true", help="skip the HTML export of executed notebooks")
    study.add_argument("--list", action="store_true", help="validate the config and list its runs; execute nothing")
    train = commands.add_parser("train", help="one language-model run (notebook 04's steps), e.g. under accelerate")
    train.add_argument("--params", required=True, help="JSON file of flat RunConfig knobs (notebook 04's parameters)")
    args = parser.parse_args(argv)
    if args.command == "train":
        try:
            return run_training(args.params)
        except USER_MISTAKES as err:
            if args.debug:
                raise
            print(f"error: {one_line(err)}", file=sys.stderr)
            return 2
    try:
        if args.list:
            header, runs = load_study(args.profile, args.results_dir)
            print(f"profile {header['profile']}: {len(runs)} runs -> {header['results_dir']}")
            for run in runs:
                print(f"  {run.name}: {run.parameters}")
            return 0
        start = time.time()
        executed = run_study(
            args.profile, results_dir=args.results_dir, force=args.force, only=args.only, html=not args.no_html
        )
        print(f"study {args.profile}: executed {len(executed)} notebook(s) in {time.time() - start:.0f} s")
        return 0
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except USER_MISTAKES as err:
        if args.debug:
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2


def one_line(err: BaseException) -> str:
    """The error's message on one line (a ``FileNotFoundError`` of the OS names its file)."""
    text = str(err) if not isinstance(err, FileNotFoundError) or not err.filename else f"{err.strerror}: {err.filename}"
    return " ".join(text.split())


def run_training(params_path: str) -> int:
    """``python -m studylib train --params run.json``: a RunConfig from flat JSON knobs, run whole."""
    import json

    from studylib.lm.config import RunConfig
    from studylib.lm.experiment import run_experiment

    try:
        config = RunConfig.from_flat(json.loads(open(params_path).read()))
    except (ValueError, TypeError) as err:
        raise UserError(f"{params_path}: {err}") from err
    metrics = run_experiment(config)
    if metrics:
        print(json.dumps({k: metrics[k] for k in ("win_rate", "approval", "kl", "length", "steps")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
