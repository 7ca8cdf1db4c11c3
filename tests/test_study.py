"""The study runner: configs validate, runs expand, completed runs skip, failures are kept and named."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from studylib import study
from studylib.__main__ import main


@pytest.mark.parametrize("profile", ["smoke", "cpu", "paper"])
def test_shipped_profiles_load_and_validate(profile):
    header, runs = study.load_study(profile)
    assert header["profile"] == profile
    names = {r.notebook for r in runs}
    assert {"01_density_ratio", "02_consistency", "03_stability", "04_lm_alignment", "05_report"} <= names
    assert runs[-1].notebook == "05_report"  # the report gathers everything, so it runs last
    lm = [r for r in runs if r.notebook == "04_lm_alignment"]
    assert len({r.name for r in lm}) == len(lm)
    assert all("{results_dir}" not in json.dumps(r.parameters) for r in runs)  # placeholders filled


def test_paper_profile_uses_hub_models_and_paper_settings():
    _, runs = study.load_study("paper")
    lm = [r.parameters for r in runs if r.notebook == "04_lm_alignment"]
    assert {p["model"] for p in lm} >= {"Qwen/Qwen2.5-1.5B-Instruct"}
    assert {p["dataset"] for p in lm} >= {"ufg", "mix14k"}
    rdro_ufg = [p for p in lm if p["loss"] == "rdro" and p["dataset"] == "ufg" and not p.get("sweep")]
    assert rdro_ufg and all(p["learning_rate"] == 5e-7 and p["loss_kwargs"]["alpha"] == 0.39 for p in rdro_ufg)


def write_notebook(path, source):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("fail = False\nout = ''\nseed = 0")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(source)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    notebooks, studies = tmp_path / "notebooks", tmp_path / "studies"
    notebooks.mkdir()
    studies.mkdir()
    write_notebook(
        notebooks / "job.ipynb",
        "import pathlib\nif fail:\n    raise RuntimeError('boom on purpose')\npathlib.Path(out).write_text('ran')",
    )
    monkeypatch.setattr(study, "NOTEBOOKS", notebooks)
    monkeypatch.setattr(study, "STUDIES", studies)
    return tmp_path


def write_profile(sandbox, runs, **top):
    (sandbox / "studies" / "t.yaml").write_text(json.dumps({"profile": "t", "runs": runs, **top}))


def test_runs_skip_when_done_and_rerun_with_force(sandbox):
    out = sandbox / "marker.txt"
    write_profile(sandbox, [{"notebook": "job", "grid": {"out": [str(out)]}}])
    results = sandbox / "results"
    executed = study.run_study("t", results_dir=results, html=False)
    assert executed == [f"job-out={str(out).replace('/', '-')}"]
    assert out.read_text() == "ran"
    executed_nb = nbformat.read(results / "notebooks" / f"{executed[0]}.ipynb", as_version=4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed_nb.cells)
    out.unlink()
    assert study.run_study("t", results_dir=results, html=False) == []  # skipped
    assert not out.exists()
    assert study.run_study("t", results_dir=results, html=False, force=True) == executed
    assert out.exists()


def test_failing_notebook_is_kept_and_named(sandbox):
    ok = sandbox / "ok.txt"
    write_profile(
        sandbox,
        [
            {"notebook": "job", "name": "bad", "parameters": {"fail": True}},
            {"notebook": "job", "name": "good", "parameters": {"out": str(ok)}},
        ],
    )
    with pytest.raises(
        study.StudyError, match=r"(?s)1 notebook\(s\) failed.*bad \(job.ipynb\): RuntimeError: boom on purpose"
    ):
        study.run_study("t", results_dir=sandbox / "results", html=False)
    assert ok.read_text() == "ran"  # the other run still ran
    failed = sandbox / "results" / "notebooks" / "bad.failed.ipynb"
    assert "boom on purpose" in failed.read_text()
    assert not (sandbox / "results" / "notebooks" / "bad.done").exists()
    assert main(["study", "--profile", "t", "--results-dir", str(sandbox / "results"), "--no-html"]) == 1


@pytest.mark.parametrize(
    ("text", "portable"),
    [
        ("/tmp/fresh/.venv/lib/tqdm/auto.py:21: TqdmWarning", ".venv/lib/tqdm/auto.py:21: TqdmWarning"),
        ("saved to /tmp/fresh/results/lm/dpo-seed=0\n", "saved to results/lm/dpo-seed=0\n"),
        ('cwd "/tmp/fresh", or /tmp/fresh\n', 'cwd ".", or .\n'),
        ("\x1b[0;32m/tmp/fresh/studylib/a.py\x1b[0m", "\x1b[0;32mstudylib/a.py\x1b[0m"),  # a traceback's colours
        ("/home/me/.cache/hub and /home/me", "~/.cache/hub and ~"),
        ("/tmp/freshness/x /mnt/tmp/fresh/x /home/meg https://h/tmp/fresh/x", None),  # other paths: kept
    ],
    ids=["warning", "printed", "root alone", "traceback colours", "home", "other paths"],
)
def test_portable_text_drops_the_machines_paths(monkeypatch, text, portable):
    monkeypatch.setenv("HOME", "/home/me")
    assert study.portable_text(text, Path("/tmp/fresh")) == (text if portable is None else portable)


def test_portable_notebook_rewrites_papermills_paths_and_printed_ones():
    root = Path("/tmp/fresh")
    nb = {
        "metadata": {
            "papermill": {
                "input_path": "/tmp/fresh/notebooks/04_lm_alignment.ipynb",
                "output_path": "/tmp/fresh/results/notebooks/lm.running.ipynb",
                "parameters": {"results_dir": "results/lm"},
            }
        },
        "cells": [
            {"cell_type": "markdown", "metadata": {}, "source": "# Title"},
            {
                "cell_type": "code",
                "metadata": {},
                "source": "train()",
                "outputs": [
                    {"output_type": "stream", "name": "stderr", "text": ["/tmp/fresh/.venv/w.py:1: UserWarning\n"]},
                    {
                        "output_type": "display_data",
                        "metadata": {},
                        "data": {"text/plain": ["saved to /tmp/fresh/results/x"], "image/png": "iVBOR+/tmp/fresh/A="},
                    },
                    {
                        "output_type": "error",
                        "ename": "OSError",
                        "evalue": "no /tmp/fresh/data/y",
                        "traceback": ["\x1b[0;32m/tmp/fresh/studylib/a.py\x1b[0m"],
                    },
                ],
            },
        ],
    }
    assert study.portable_notebook(nb, root / "results" / "notebooks" / "lm.ipynb", root) is nb
    assert nb["metadata"]["papermill"] == {
        "input_path": "notebooks/04_lm_alignment.ipynb",
        "output_path": "results/notebooks/lm.ipynb",  # where the runner keeps it, not papermill's partial file
        "parameters": {"results_dir": "results/lm"},
    }
    stream, display, error = nb["cells"][1]["outputs"]
    assert stream["text"] == [".venv/w.py:1: UserWarning\n"]
    assert display["data"] == {"text/plain": ["saved to results/x"], "image/png": "iVBOR+/tmp/fresh/A="}  # base64 kept
    assert error["evalue"] == "no data/y" and error["traceback"] == ["\x1b[0;32mstudylib/a.py\x1b[0m"]


def test_kept_notebooks_and_html_name_no_path_of_the_machine(sandbox, monkeypatch):
    """A real run: the kept notebook (and its HTML), a failed one too, hold repository-relative paths only."""
    monkeypatch.setattr(study, "ROOT", sandbox)  # the sandbox is the repository: notebooks/, studies/, results/
    write_notebook(
        sandbox / "notebooks" / "where.ipynb",
        "import os\nprint('working in', os.getcwd(), 'writing', os.path.abspath('made.txt'))\n"
        "if fail:\n    raise RuntimeError('cannot read ' + os.path.abspath('missing.txt'))",
    )
    runs = [{"notebook": "where", "name": "good"}, {"notebook": "where", "name": "bad", "parameters": {"fail": True}}]
    write_profile(sandbox, runs)
    with pytest.raises(study.StudyError, match=r"1 notebook\(s\) failed:\nbad \(where.ipynb\): RuntimeError"):
        study.run_study("t", results_dir=sandbox / "results")
    executed = sandbox / "results" / "notebooks"
    for name in ("good.ipynb", "good.html", "bad.failed.ipynb"):
        assert str(sandbox) not in (executed / name).read_text(), name
    good = nbformat.read(executed / "good.ipynb", as_version=4)
    assert good.metadata.papermill.input_path == "notebooks/where.ipynb"
    assert good.metadata.papermill.output_path == "results/notebooks/good.ipynb"
    assert "working in . writing made.txt" in "".join(o.get("text", "") for o in good.cells[-1].outputs)
    bad = nbformat.read(executed / "bad.failed.ipynb", as_version=4)
    assert bad.metadata.papermill.output_path == "results/notebooks/bad.failed.ipynb"
    assert "cannot read missing.txt" in bad.cells[-1].outputs[-1].evalue
    assert not list(executed.glob("*.running.ipynb"))


@pytest.mark.parametrize(
    ("runs", "message"),
    [
        ([{"notebook": "missing"}], "notebooks/missing.ipynb does not exist"),
        ([{"name": "x"}], "needs 'notebook'"),
        ([{"notebook": "job", "grid": {"method": [{"loss": "dpo"}]}}], "need a 'name'"),
        ([{"notebook": "job"}, {"notebook": "job"}], "run names repeat"),
    ],
)
def test_bad_configs_fail_clearly(sandbox, runs, message):
    write_profile(sandbox, runs)
    with pytest.raises(study.StudyError, match=message):
        study.load_study("t")


@pytest.mark.parametrize(
    ("runs", "top", "message"),
    [
        ([{"notebook": "job"}], {"resutls_dir": "x"}, r"unknown key\(s\) \['resutls_dir'\]; accepted: profile"),
        ([{"notebook": "job"}], {"defaults": {"jbo": {"out": "x"}}}, "defaults name notebook 'jbo'"),
        ([{"notebook": "job"}], {"defaults": {"job": {"otu": "x"}}}, r"defaults: notebook 'job' has no param.*'otu'"),
        ([{"notebook": "job", "parameters": {"fial": True}}], {}, r"run 'job': .*no parameter\(s\) \['fial'\]"),
        ([{"notebook": "job", "grid": {"sed": [0]}}], {}, r"no parameter\(s\) \['sed'\].*defines: fail, out"),
    ],
)
def test_typos_fail_when_the_config_loads(sandbox, runs, top, message):
    write_profile(sandbox, runs, **top)
    with pytest.raises(study.StudyError, match=message):
        study.load_study("t")
    assert main(["study", "--profile", "t", "--list"]) == 2  # --list catches them too, executing nothing


def test_yaml_numbers_types_and_syntax(sandbox):
    (sandbox / "studies" / "t.yaml").write_text("profile: t\nruns:\n  - notebook: job\n    parameters: {seed: 1e3}\n")
    with pytest.raises(
        study.StudyError, match=r"parameter 'seed' of job must be an integer \(its default is 0\), got 1000.0"
    ):
        study.load_study("t")  # 1e3 is a number (YAML 1.2), but not the integer the notebook expects
    (sandbox / "studies" / "t.yaml").write_text("profile: t\nruns:\n  - notebook: job\n    parameters: {seed: 'x'}\n")
    with pytest.raises(study.StudyError, match="must be an integer"):
        study.load_study("t")
    (sandbox / "studies" / "t.yaml").write_text("profile: t\nruns:\n  - notebook: job\n   parameters: [\n")
    with pytest.raises(study.StudyError, match=r"(?s)t.yaml: not valid YAML: .*in \".*t.yaml\", line 4"):
        study.load_study("t")


def test_lm_knobs_are_checked_when_the_config_loads():
    header, runs = study.load_study("smoke")
    lm = next(r for r in runs if r.notebook == "04_lm_alignment")
    assert isinstance(lm.parameters["learning_rate"], float)  # "0.001" in the YAML, a number here
    smoke = study.STUDIES / "smoke.yaml"
    with pytest.raises(study.StudyError, match="eval_prompts must be >= 1"):
        study._check_lm_runs(smoke, [study.Run(lm.notebook, "x", {**lm.parameters, "eval_prompts": 0})])
    # the notebook's own defaults fill in what a run leaves out (its loss_kwargs default is alpha "auto")
    bare = {k: v for k, v in lm.parameters.items() if k != "loss_kwargs"} | {"loss": "dpo"}
    with pytest.raises(study.StudyError, match="bad knobs for loss 'dpo'"):
        study._check_lm_runs(smoke, [study.Run(lm.notebook, "x", bare)])
    with pytest.raises(study.StudyError, match="are the same run"):  # e.g. a sweep point equal to a main run
        study._check_lm_runs(smoke, [lm, study.Run(lm.notebook, "y", {**lm.parameters, "sweep": True})])


def test_a_failure_before_any_notebook_is_written_says_so(sandbox, monkeypatch):
    import papermill

    def refuse(*args, **kwargs):
        raise RuntimeError("no kernel")

    monkeypatch.setattr(papermill, "execute_notebook", refuse)
    write_profile(sandbox, [{"notebook": "job"}])
    with pytest.raises(
        study.StudyError, match=r"job \(job.ipynb\): RuntimeError: no kernel \[no notebook was written\]"
    ):
        study.run_study("t", results_dir=sandbox / "results", html=False)
    summary = json.loads((sandbox / "results" / "study-t.json").read_text())
    assert summary["runs"]["job"]["status"] == "failed"


def test_completion_is_judged_by_outputs_not_by_a_committed_stamp(sandbox):
    results = sandbox / "results"
    output = results / "made.txt"
    write_profile(sandbox, [{"notebook": "job", "parameters": {"out": str(output)}}])
    assert study.run_study("t", results_dir=results, html=False) == ["job"]
    stamp = json.loads((results / "notebooks" / "job.done").read_text())
    assert (
        stamp["outputs"] == [str(output.relative_to(study.ROOT)) if output.is_relative_to(study.ROOT) else str(output)]
        or stamp["outputs"]
    )
    assert study.run_study("t", results_dir=results, html=False) == []  # complete: skipped
    output.unlink()
    assert study.run_study("t", results_dir=results, html=False) == ["job"]  # an output went missing: rebuilt
    summary = json.loads((results / "study-t.json").read_text())
    assert summary["runs"]["job"]["status"] == "executed" and summary["runs"]["job"]["seconds"] > 0


def test_unknown_profile_lists_known_ones(sandbox):
    write_profile(sandbox, [{"notebook": "job"}])
    with pytest.raises(study.StudyError, match="no study profile 'nope'.*known profiles: t"):
        study.load_study("nope")


def test_method_bundles_set_parameters_together(sandbox):
    write_profile(
        sandbox,
        [{"notebook": "job", "grid": {"method": [{"name": "a", "out": "x", "fail": False}], "seed": [0, 1]}}],
    )
    _, runs = study.load_study("t")
    assert [r.name for r in runs] == ["job-method=a-seed=0", "job-method=a-seed=1"]
    assert runs[0].parameters == {"out": "x", "fail": False, "seed": 0}


def test_train_command_runs_one_experiment(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDYLIB_CACHE", str(tmp_path / "cache"))
    params = {
        "model": "tiny",
        "dataset": "ufb",
        "dataset_path": "tests/fixtures/ufb_small",
        "loss": "rdro",
        "loss_kwargs": {"alpha": "auto"},
        "max_steps": 2,
        "batch_size": 2,
        "eval_prompts": 2,
        "eval_max_new_tokens": 6,
        "results_dir": str(tmp_path / "lm"),
    }
    (tmp_path / "run.json").write_text(json.dumps(params))
    monkeypatch.chdir(study.ROOT)
    assert main(["train", "--params", str(tmp_path / "run.json")]) == 0
    (run_dir,) = (tmp_path / "lm").glob("ufb-rdro-alpha=auto-seed=0-*")  # named by its knobs and their hash
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["training"]["trainer"] == "offline"
    outputs = json.loads((run_dir / "model_outputs.json").read_text())  # AlpacaEval format for hub-schema runs
    assert len(outputs) == 2 and set(outputs[0]) == {"instruction", "output", "generator", "dataset"}
    assert not (run_dir / "checkpoints").exists()  # deleted once the run is saved
    stamped = [
        "metrics.stamp.json",
        "curves.json",
        "samples.json",
        "training_curves.png.json",
        "model_outputs.stamp.json",
    ]
    for name in stamped:  # every file of the run is stamped with the run's parameters
        stamp = json.loads((run_dir / name).read_text())
        assert stamp["params"]["loss"] == "rdro" and stamp["params"]["max_steps"] == 2 and stamp["seed"] == 0
    (tmp_path / "bad.json").write_text(json.dumps({"modle": "tiny"}))
    assert main(["train", "--params", str(tmp_path / "bad.json")]) == 2


def test_full_fine_tuning_run_completes_evaluation(tmp_path, monkeypatch):
    """Without LoRA the reference is a frozen copy made before training, used by training and evaluation."""
    from studylib.lm.config import RunConfig
    from studylib.lm.experiment import run_experiment

    monkeypatch.setenv("STUDYLIB_CACHE", str(tmp_path / "cache"))
    knobs = {"model": "tiny", "dataset": "ufb", "dataset_path": "tests/fixtures/ufb_small", "loss": "dpo"}
    knobs |= {"max_steps": 2, "batch_size": 2, "learning_rate": 1e-2, "use_lora": False, "eval_prompts": 2}
    record = run_experiment(RunConfig.from_flat(knobs | {"eval_max_new_tokens": 6, "results_dir": str(tmp_path)}))
    assert record["steps"] == 2 and record["n_prompts"] == 2
    assert record["kl"] != 0.0  # evaluated against the frozen start, not against the trained policy itself


def test_offline_distillation_without_kl_trains_on_reward_model_labels(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDYLIB_CACHE", str(tmp_path / "cache"))
    params = {
        "model": "tiny",
        "dataset": "ufb",
        "dataset_path": "tests/fixtures/ufb_small",
        "loss": "distill",
        "loss_kwargs": {"beta": 0.0},
        "max_steps": 2,
        "batch_size": 2,
        "eval_prompts": 2,
        "eval_max_new_tokens": 6,
        "results_dir": str(tmp_path / "lm"),
    }
    (tmp_path / "run.json").write_text(json.dumps(params))
    monkeypatch.chdir(study.ROOT)
    assert main(["train", "--params", str(tmp_path / "run.json")]) == 0
    (run_dir,) = (tmp_path / "lm").glob("ufb-distill-beta=0.0-seed=0-*")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["training"]["trainer"] == "offline" and metrics["steps"] == 2
    assert "reward_accuracy_held_out" in metrics["training"]


def test_a_result_file_that_does_not_read_back_makes_its_run_stale(sandbox, tmp_path):
    """A truncated ``metrics.json`` (or any JSON or CSV output that does not parse) is not a complete run."""
    results = sandbox / "results"
    output = results / "made.json"
    write_profile(sandbox, [{"notebook": "job", "parameters": {"out": str(output)}}])
    assert study.run_study("t", results_dir=results, html=False) == ["job"]  # the job writes 'ran': not JSON
    assert study.run_study("t", results_dir=results, html=False) == ["job"]  # so it is not complete: run again
    good, cut, table, ragged = (tmp_path / name for name in ("a.json", "b.json", "c.csv", "d.csv"))
    good.write_text('{"win_rate": 0.5}')
    cut.write_text('{"win_rate": 0.')
    table.write_text('a,b\n1,"two\rlines"\n')  # a completion with a lone carriage return is whole
    ragged.write_text("a,b\n1,2\n3")  # cut mid-row
    assert [study.readable(p) for p in (good, cut, table, ragged)] == [True, False, True, False]


def test_the_report_names_a_truncated_metrics_file(tmp_path):
    from studylib.report import collect_runs

    (tmp_path / "run-a").mkdir()
    (tmp_path / "run-a" / "metrics.json").write_text('{"win_rate": 0.')
    with pytest.raises(ValueError, match=r"run-a/metrics.json is not readable JSON \(truncated\? rerun its run\)"):
        collect_runs(tmp_path)


def test_the_time_left_adds_the_last_recorded_times_and_counts_the_untimed():
    from studylib.study import time_left

    recorded = {"a": 120.0, "b": 600.0, "c": None}
    assert time_left(recorded, ["a", "b"]) == "about 12 min left by the last recorded times"
    expected = "about 10 min left by the last recorded times (+2 run(s) never timed)"
    assert time_left(recorded, ["b", "c", "d"]) == expected
    assert time_left(recorded, ["c"]) == "no recorded times"
