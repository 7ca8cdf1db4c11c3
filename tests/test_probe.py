"""The probe of issue 35 ("what still slips through"), kept as tests: each case a new user can hit through the study
runner, the command line or the trainers is refused with one line (``error: ...``, exit status 2) before anything is
written, or recovered. docs/RELIABILITY.md counts them."""

from __future__ import annotations

import errno
import json
import re
import shutil
import uuid
import warnings
from pathlib import Path

import nbformat
import pytest
from test_nothing_lost import offline  # the tiny offline run its checkpoint tests resume

from studylib import study
from studylib.__main__ import main
from studylib.lm.config import RunConfig
from studylib.lm.experiment import run_experiment
from studylib.lm.tiny import tiny_model, tiny_tokenizer

ROOT = study.ROOT
UFB_SMALL = ROOT / "tests" / "fixtures" / "ufb_small"


def one_error(stderr: str) -> str:
    """The one ``error:`` line a refused command prints (libraries' progress bars may print beside it)."""
    errors = [line for line in stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


def files_under(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*"))


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A study folder with one notebook, ``job`` (parameters ``fail``, ``out``, ``seed``), and ``studies/t.yaml``."""
    notebooks, studies = tmp_path / "notebooks", tmp_path / "studies"
    notebooks.mkdir()
    studies.mkdir()
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("fail = False\nout = ''\nseed = 0")
    params.metadata["tags"] = ["parameters"]
    code = "import pathlib\nif fail:\n    raise RuntimeError('boom')\nif out:\n    pathlib.Path(out).write_text('ran')"
    nb.cells = [params, nbformat.v4.new_code_cell(code)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, notebooks / "job.ipynb")
    monkeypatch.setattr(study, "NOTEBOOKS", notebooks)
    monkeypatch.setattr(study, "STUDIES", studies)
    return tmp_path


def listed(sandbox: Path, yaml_text: str, capsys) -> tuple[int, str]:
    """``python -m studylib study --profile t --list`` on ``yaml_text``: exit status and stderr."""
    (sandbox / "studies" / "t.yaml").write_text(yaml_text)
    capsys.readouterr()
    code = main(["study", "--profile", "t", "--list"])
    return code, capsys.readouterr().err


def trained(tmp_path: Path, text: str, capsys) -> tuple[int, str]:
    """``python -m studylib train --params run.json`` with ``text`` as the JSON: exit status and stderr."""
    params = tmp_path / "run.json"
    params.write_text(text)
    capsys.readouterr()
    code = main(["train", "--params", str(params)])
    return code, capsys.readouterr().err


def tiny_knobs_json(tmp_path: Path, **knobs) -> str:
    base = {"model": "tiny", "dataset": "ufb", "dataset_path": str(UFB_SMALL), "loss": "dpo", "max_steps": 2}
    base |= {"batch_size": 2, "eval_prompts": 2, "eval_max_new_tokens": 4, "results_dir": str(tmp_path / "lm")}
    return json.dumps(base | knobs)


# -- a key given twice ---------------------------------------------------------------------------------------------

TWICE_YAML = [
    ("profile: t\nruns:\n  - notebook: job\nprofile: u\n", r"line 4: key 'profile' is given twice \(first on line 1\)"),
    (
        "profile: t\nruns:\n  - notebook: job\n    parameters:\n      seed: 1\n      seed: 2\n",
        r"line 6: key 'seed' is given twice \(first on line 5\)",
    ),
    (
        "profile: t\nruns:\n  - notebook: job\n    grid:\n      method:\n        - {name: a, seed: 1, seed: 2}\n",
        r"line 6: key 'seed' is given twice",
    ),
]


@pytest.mark.parametrize(("text", "message"), TWICE_YAML, ids=["top level", "parameters", "grid bundle"])
def test_a_key_given_twice_in_a_study_yaml_is_refused(sandbox, capsys, text, message):
    code, err = listed(sandbox, text, capsys)
    assert code == 2
    assert one_error(err).startswith(f"error: {sandbox / 'studies' / 't.yaml'}: ") and re.search(message, err)


@pytest.mark.parametrize(
    ("twice", "key"),
    [('"loss": "dpo", "loss": "rdro"', "loss"), ('"loss": "dpo", "loss_kwargs": {"beta": 0.1, "beta": 0.5}', "beta")],
    ids=["top level", "nested"],
)
def test_a_key_given_twice_in_a_run_json_is_refused(tmp_path, capsys, twice, key):
    text = tiny_knobs_json(tmp_path).replace('"loss": "dpo"', twice)
    code, err = trained(tmp_path, text, capsys)
    assert code == 2
    assert one_error(err) == f"error: {tmp_path / 'run.json'}: key {key!r} is given twice (a later value would win)"
    assert not (tmp_path / "lm").exists()


# -- a grid that runs nothing, a run name that leaves the results folder ------------------------------------------


def test_an_empty_grid_is_refused_naming_the_key_and_the_run(sandbox, capsys):
    code, err = listed(sandbox, "profile: t\nruns:\n  - notebook: job\n    name: sweep\n    grid: {seed: []}\n", capsys)
    assert code == 2
    assert "run 0 ('sweep'): grid 'seed' is an empty list: the run would expand to no notebook" in one_error(err)


@pytest.mark.parametrize("name", ["../escape", "<sandbox>/escape", "a/b", ".."])
def test_a_study_run_name_that_would_leave_the_results_folder_is_refused(sandbox, capsys, name):
    name = name.replace("<sandbox>", str(sandbox))  # absolute
    runs = [{"notebook": "job", "name": name}]
    (sandbox / "studies" / "t.yaml").write_text(json.dumps({"profile": "t", "runs": runs}))
    before = files_under(sandbox)
    assert main(["study", "--profile", "t", "--results-dir", str(sandbox / "results" / "deep"), "--no-html"]) == 2
    assert "must be one plain file name inside the notebooks folder" in one_error(capsys.readouterr().err)
    assert files_under(sandbox) == before  # the old code wrote <name>.ipynb and <name>.done outside results/


# -- relative paths: one rule ----------------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_working_directory(tmp_path, monkeypatch, tiny_knobs):
    """A run's knobs and ``--results-dir`` from another folder: relative to it, never to the library's checkout; a
    study YAML's paths (read by notebooks, which run at the repository root) relative to the root."""
    monkeypatch.chdir(tmp_path)
    config = RunConfig.from_flat(tiny_knobs | {"results_dir": "out"})
    assert config.run_dir() == tmp_path / "out" / config.name()
    header, runs = study.load_study("smoke", "mine")
    assert header["results_dir"] == str(tmp_path / "mine")
    lm = next(r for r in runs if r.notebook == "04_lm_alignment")
    assert lm.parameters["results_dir"] == str(tmp_path / "mine" / "lm")  # outside the root: absolute
    header, runs = study.load_study("smoke")
    assert header["results_dir"] == str(ROOT / "results" / "smoke")
    assert next(r for r in runs if r.notebook == "04_lm_alignment").parameters["results_dir"] == "results/smoke/lm"
    _, runs = study.load_study("smoke", ROOT / "scratch" / "probe")  # inside the root: relative to it
    assert next(r for r in runs if r.notebook == "04_lm_alignment").parameters["results_dir"] == "scratch/probe/lm"


def test_a_run_started_from_another_folder_writes_there_and_not_into_the_checkout(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STUDYLIB_CACHE", str(tmp_path / "cache"))
    shutil.copytree(UFB_SMALL, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    folder = f"probe-lm-{uuid.uuid4().hex[:8]}"
    knobs = json.loads(tiny_knobs_json(tmp_path)) | {"dataset_path": "data", "results_dir": folder}
    try:
        assert trained(tmp_path, json.dumps(knobs), capsys)[0] == 0
        assert len(list((tmp_path / folder).glob("*/metrics.json"))) == 1
        assert not (ROOT / folder).exists()
    finally:
        shutil.rmtree(ROOT / folder, ignore_errors=True)  # what the old code wrote into the checkout


# -- a knob the model cannot hold -------------------------------------------------------------------------------------

BEYOND_THE_MODEL = [
    ({"lora_r": 128}, r"lora_r 128 is larger than the hidden size of model 'tiny' \(64\)"),
    ({"max_length": 2048}, r"max_length 2048 is more than the 1024 positions of model 'tiny'"),
    ({"eval_max_new_tokens": 1000}, r"eval_max_new_tokens 1000 and max_prompt_length 96 are more than the 1024 "),
    ({"lora_target_modules": ["c_attn"]}, r"lora_target_modules: none of \['c_attn'\] is a module of model 'tiny'"),
    ({"lora_target_modules": ["q_proj", "norm"]}, r"lora_target_modules: 'norm' is a LlamaRMSNorm in model 'tiny'"),
]


@pytest.mark.parametrize(("knobs", "message"), BEYOND_THE_MODEL, ids=[str(k) for k, _ in BEYOND_THE_MODEL])
def test_a_knob_the_model_cannot_hold_is_refused_before_the_run_folder_is_written(tiny_run, knobs, message):
    from studylib.checks import UserError

    config = tiny_run(**knobs)
    with pytest.raises(UserError, match=message):
        run_experiment(config)
    assert not config.run_dir().exists()


# -- a checkpoint whose weights do not read back -------------------------------------------------------------------


@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.pt"])
def test_a_checkpoint_with_a_truncated_weights_file_is_set_aside_and_the_run_resumes(tmp_path, damaged):
    straight = offline(tmp_path / "straight", 3)
    offline(tmp_path / "run", 3)
    weights = tmp_path / "run" / "checkpoint-3" / damaged
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a kill or a full disk mid-write
    with pytest.warns(UserWarning, match="checkpoint-3 is incomplete.*set aside as incomplete-checkpoint-3"):
        resumed = offline(tmp_path / "run", 3)
    assert (tmp_path / "run" / "incomplete-checkpoint-3" / damaged).is_file()
    losses = [e["loss"] for e in resumed.state.log_history if "loss" in e]
    assert losses == pytest.approx([e["loss"] for e in straight.state.log_history if "loss" in e], rel=1e-5)


# -- tracebacks where one line belongs ---------------------------------------------------------------------------

RUN = "  - notebook: job\n"
WRONG_SHAPE = [
    ("profile: t\nruns:\n  - notebook: job\n    grid: 5\n", "run 0 ('job'): grid must be a mapping"),
    ("profile: t\nruns:\n  - notebook: job\n    grid: {seed: 0}\n", "grid 'seed' must be a list of values"),
    ("profile: t\nruns:\n  - notebook: job\n    grid: {seed: abc}\n", "grid 'seed' must be a list of values"),
    ("profile: t\nruns:\n", "'runs' must be a list of runs, got None"),
    ("profile: t\nruns: []\n", "'runs' is empty: nothing to run"),
    ("profile: t\nruns: {notebook: job}\n", "'runs' must be a list of runs"),
    ("profile: t\nruns: [5]\n", "run 0 must be a mapping"),
    ("profile: t\nruns:\n  - notebook: job\n    parameters: [1]\n", "run 0 ('job'): 'parameters' must be a mapping"),
    ("profile: t\nruns:\n  - notebook: job\n    name: [a]\n", "run 0: 'name' must be a string"),
    ("profile: t\ndefaults: [job]\nruns:\n" + RUN, "'defaults' must be a mapping of notebook to parameters"),
    ("profile: t\ndefaults: {job: 5}\nruns:\n" + RUN, "defaults of 'job' must be a mapping of parameters"),
    ("profile: t\nresults_dir:\nruns:\n" + RUN, "'results_dir' must be a folder"),
    ("profile: t\nresults_dir: .\nruns:\n" + RUN, "is the repository's root"),
    ("profile: t\nruns:\n  - notebook: job\n    parameters: {out: 'a{b'}\n", "parameter 'out': 'a{b' holds a brace"),
    ("profile: t\nruns:\n  - notebook: job\n    parameters: {out: '{resutls_dir}'}\n", "'{resutls_dir}' holds"),
    ("profile: t\ncompare: ['{x}']\nruns:\n" + RUN, "compare: '{x}' holds a brace"),
    ("profile: t\nruns:\n  - notebook: job\n   parameters: [\n", "not valid YAML"),
]


@pytest.mark.parametrize(("text", "message"), WRONG_SHAPE, ids=[m[:40] for _, m in WRONG_SHAPE])
def test_a_study_yaml_of_the_wrong_shape_is_one_line_and_exit_status_2(sandbox, capsys, text, message):
    code, err = listed(sandbox, text, capsys)
    assert code == 2
    line = one_error(err)
    assert line.startswith(f"error: {sandbox / 'studies' / 't.yaml'}") and message in line, line


def test_a_results_dir_that_is_a_file_is_refused_when_the_config_loads(sandbox, capsys):
    (sandbox / "taken").write_text("mine")
    (sandbox / "studies" / "t.yaml").write_text("profile: t\nruns:\n" + RUN)
    assert main(["study", "--profile", "t", "--results-dir", str(sandbox / "taken"), "--no-html"]) == 2
    assert f"results folder {sandbox / 'taken'} is a file" in one_error(capsys.readouterr().err)
    assert (sandbox / "taken").read_text() == "mine"


def test_a_failed_notebook_is_not_a_users_mistake(sandbox, capsys):
    """A bad config exits 2; a notebook that fails exits 1 (``StudyConfigError`` is a ``UserError``, the failure of a
    notebook a ``StudyError`` only)."""
    assert issubclass(study.StudyConfigError, study.StudyError)
    (sandbox / "studies" / "t.yaml").write_text("profile: t\nruns:\n  - notebook: job\n    parameters: {fail: true}\n")
    assert main(["study", "--profile", "t", "--results-dir", str(sandbox / "results"), "--no-html"]) == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"prompt": "Hi", "chosen": "a", "rejected": "b"}\n{"prompt": "Yo", "chosen": "c" "rejected": "d"}\n',
         r"line 2 is not valid JSON \(Expecting ',' delimiter, column 32\)"),
        (b'{"prompt": "Hi", "chosen": "a", "rejected": "b"}\n{"prompt": "Yo", "chosen": "caf\xe9"}\n',
         r"line 2 is not UTF-8 text \(byte 0xe9\)"),
    ],
    ids=["malformed line", "not UTF-8"],
)  # fmt: skip
def test_a_data_file_that_does_not_read_names_the_file_and_the_line(tmp_path, capsys, monkeypatch, content, message):
    monkeypatch.setenv("STUDYLIB_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "prefs.jsonl"
    data.write_bytes(content)
    code, err = trained(tmp_path, tiny_knobs_json(tmp_path, dataset_path=str(data)), capsys)
    assert code == 2
    line = one_error(err)
    assert line.startswith(f"error: file {data}: ") and re.search(message, line), line
    assert not (tmp_path / "lm").exists()


def test_a_results_folder_that_cannot_be_written_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("STUDYLIB_CACHE", str(tmp_path / "cache"))
    locked = tmp_path / "read-only"
    locked.mkdir()
    original = Path.mkdir

    def refuse(self, *args, **kwargs):  # as a folder without write permission (tests may run as root)
        if self.is_relative_to(locked):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    code, err = trained(tmp_path, tiny_knobs_json(tmp_path, results_dir=str(locked / "lm")), capsys)
    assert code == 2
    assert one_error(err).startswith(f"error: Permission denied: {locked / 'lm'}")


def test_a_run_whose_results_dir_is_a_file_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("STUDYLIB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "taken").write_text("mine")
    code, err = trained(tmp_path, tiny_knobs_json(tmp_path, results_dir=str(tmp_path / "taken")), capsys)
    assert code == 2
    assert one_error(err).startswith(f"error: Not a directory: {tmp_path / 'taken'}")
    assert (tmp_path / "taken").read_text() == "mine"


def test_a_run_whose_lock_is_held_is_one_line(tmp_path, capsys, monkeypatch):
    from filelock import FileLock

    from studylib.lm.runs import LOCK_NAME

    monkeypatch.setenv("STUDYLIB_CACHE", str(tmp_path / "cache"))
    text = tiny_knobs_json(tmp_path)
    run_dir = RunConfig.from_flat(json.loads(text)).run_dir()
    run_dir.mkdir(parents=True)
    held = FileLock(run_dir / LOCK_NAME, timeout=0)
    held.acquire()  # another process's run, as far as this one can tell: its own lock object
    try:
        code, err = trained(tmp_path, text, capsys)
    finally:
        held.release()
    assert code == 2
    assert "is in progress in another process" in one_error(err)
    assert files_under(run_dir) == [Path(LOCK_NAME)]


def test_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    from transformers import Trainer

    def no_space(self, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 123 vs 456")

    monkeypatch.setenv("STUDYLIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(Trainer, "_save_checkpoint", no_space)
    monkeypatch.setattr("studylib.lm.checkpoints.shutil.disk_usage", lambda path: type("U", (), {"free": 1024})())
    code, err = trained(tmp_path, tiny_knobs_json(tmp_path, save_steps=1), capsys)
    assert code == 2
    assert one_error(err).startswith("error: the disk is full: training could not write into ")


# -- noise -------------------------------------------------------------------------------------------------------


def test_the_kernels_own_log_stays_out_of_the_study_output(sandbox, capfd):
    """The kernel's plain-TCP warning (and the interrupt papermill sends it at shutdown) are not printed."""
    run = study.Run("job", "quiet", {"out": str(sandbox / "made.txt")})
    study.execute_run(run, sandbox / "results")
    assert (sandbox / "made.txt").read_text() == "ran"
    err = capfd.readouterr().err
    assert "without encryption" not in err and "KeyboardInterrupt" not in err, err


def test_saving_an_adapter_never_looks_for_its_base_model_on_the_hub(tmp_path, monkeypatch):
    import peft.utils.save_and_load

    from studylib.lm.lora import add_lora

    def no_network(*args, **kwargs):
        raise AssertionError("peft looked up the hub")

    monkeypatch.setattr(peft.utils.save_and_load, "check_file_exists_on_hf_hub", no_network)
    model = add_lora(tiny_model(tiny_tokenizer()), r=4, seed=0)
    model.peft_config["default"].base_model_name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"  # as export does
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert not [w for w in caught if "config file" in str(w.message) or "remote file" in str(w.message)]
