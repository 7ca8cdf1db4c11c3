"""Nothing lost, nothing silent, round three (issue 23): data used as given, nothing written or deleted outside a
run's own folder, resumes refused only for knobs that change a result, caches keyed by every input."""

from __future__ import annotations

import pytest

from studylib.lm.config import RunConfig, TrainConfig
from studylib.lm.experiment import reward_model_for, run_experiment
from studylib.lm.runtime import make_runtime
from studylib.lm.tiny import tiny_model, tiny_tokenizer
from studylib.lm.trainer import train
from studylib.losses import build_loss


@pytest.mark.parametrize("run_name", ["../victim", "/tmp/victim-abs", "a/../../victim", "..", "nested/name"])
def test_a_hostile_run_name_is_refused_and_nothing_outside_is_touched(tiny_run, tmp_path, run_name):
    victim = tmp_path / "victim"
    for folder in ("checkpoints", "model"):
        (victim / folder).mkdir(parents=True)
        (victim / folder / "keep.txt").write_text("mine")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match="run_name must be one plain folder name inside results_dir"):
        run_experiment(tiny_run(run_name=run_name))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (victim / "checkpoints" / "keep.txt").read_text() == "mine"


def test_a_plain_run_name_stays_inside_results_dir(tiny_run, tmp_path):
    config = tiny_run(run_name="mine")
    assert config.run_dir().parent == tmp_path / "lm" and config.checkpoint_dir().parent == config.run_dir()


def test_a_data_file_with_the_offline_data_set_is_refused_not_ignored(tiny_knobs):
    knobs = tiny_knobs | {"dataset": "offline"}  # dataset_path stays: the user believes it is used
    with pytest.raises(ValueError, match="dataset_path is given but dataset is 'offline'.*set dataset to"):
        RunConfig.from_flat(knobs)
    with pytest.raises(ValueError, match="eval_dataset_path is given but dataset is 'offline'"):
        RunConfig.from_flat(knobs | {"dataset_path": None, "eval_dataset_path": "tests/fixtures/ufg.jsonl"})
    RunConfig.from_flat(knobs | {"dataset_path": None})  # the synthetic set, asked for


def test_a_resume_is_not_refused_for_a_knob_that_changes_no_result(tmp_path):
    """``report_to`` (or another knob outside the run's identity) added to an interrupted run: it resumes; a knob
    that changes the result is still refused, by name."""
    tokenizer = tiny_tokenizer()
    rows = [
        {"prompt_ids": [5, 6], "chosen_ids": [7, 8, 2], "rejected_ids": [9, 2]},
        {"prompt_ids": [6, 5], "chosen_ids": [8, 8, 2], "rejected_ids": [7, 2]},
    ]

    def config(**knobs) -> TrainConfig:
        return TrainConfig(max_steps=2, batch_size=2, save_steps=1, use_lora=False, **knobs)

    train(tiny_model(tokenizer), tokenizer, rows, build_loss("dpo"), config(), tmp_path)
    train(tiny_model(tokenizer), tokenizer, rows, build_loss("dpo"), config(training_args={"report_to": "none"}),
          tmp_path)  # fmt: skip
    with pytest.raises(ValueError, match=r"training_args: saved \{\}, now \{'weight_decay': 0.1\}"):
        train(tiny_model(tokenizer), tokenizer, rows, build_loss("dpo"), config(training_args={"weight_decay": 0.1}),
              tmp_path)  # fmt: skip


REWARD_KNOBS = {"batch_size": 4, "lora_r": 8, "lora_alpha": 4, "use_lora": False, "reward_epochs": 2.0}


def test_the_reward_models_cache_misses_when_any_input_of_its_fit_changes(tiny_run, monkeypatch):
    """Each knob of the fit, the data seed, the model and the pairs: a change is a new fit, never a stale hit."""
    import studylib.lm.reward as reward

    fits = []
    original = reward.train_reward_model

    def counted(*args, **kwargs):
        fits.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(reward, "train_reward_model", counted)
    tokenizer = tiny_tokenizer()
    pairs = [{"prompt_ids": [5 + i, 6], "chosen_ids": [7, i + 8, 2], "rejected_ids": [9, 2]} for i in range(6)]
    runtime = make_runtime(False)

    def fit(pair_rows=pairs, **knobs) -> None:
        config = tiny_run(**({"reward_epochs": 1.0, "batch_size": 2} | knobs))
        reward_model_for(config, tiny_model(tokenizer), tokenizer, pair_rows, runtime)

    fit()
    fit()
    assert len(fits) == 1  # the same inputs: a cache hit
    for knob, value in REWARD_KNOBS.items():
        fit(**{knob: value})
    fit(data_seed=3)
    fit(pair_rows=pairs[:-1])
    assert len(fits) == 1 + len(REWARD_KNOBS) + 2, "some input of the fit is missing from the cache key"


PAIRS = [
    {"prompt_ids": [5, 6], "chosen_ids": [7, 8, 2], "rejected_ids": [9, 2]},
    {"prompt_ids": [6, 5], "chosen_ids": [8, 8, 2], "rejected_ids": [7, 2]},
]


def offline(tmp_path, max_steps: int):
    tokenizer = tiny_tokenizer()
    config = TrainConfig(max_steps=max_steps, batch_size=2, save_steps=1, use_lora=False, learning_rate=1e-2)
    return train(tiny_model(tokenizer), tokenizer, PAIRS, build_loss("dpo"), config, tmp_path)


@pytest.mark.parametrize("damage", ["missing state", "truncated state"])
def test_a_half_written_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(tmp_path, damage):
    straight = offline(tmp_path / "straight", 3)
    offline(tmp_path / "run", 3)
    state = tmp_path / "run" / "checkpoint-3" / "trainer_state.json"  # written last: a kill before it
    if damage == "missing state":
        state.unlink()
    else:
        state.write_text(state.read_text()[:40])
    with pytest.warns(UserWarning, match="checkpoint-3 is incomplete.*set aside as incomplete-checkpoint-3"):
        resumed = offline(tmp_path / "run", 3)
    assert (tmp_path / "run" / "incomplete-checkpoint-3").is_dir()  # kept for inspection, not deleted
    losses = [e["loss"] for e in resumed.state.log_history if "loss" in e]
    assert losses == pytest.approx([e["loss"] for e in straight.state.log_history if "loss" in e], rel=1e-5)


def test_a_full_disk_is_reported_as_a_full_disk(tmp_path, monkeypatch):
    import errno

    from transformers import Trainer

    def no_space(self, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 123 vs 456")

    monkeypatch.setattr(Trainer, "_save_checkpoint", no_space)
    monkeypatch.setattr("studylib.lm.checkpoints.shutil.disk_usage", lambda path: type("U", (), {"free": 1024})())
    with pytest.raises(OSError, match=r"the disk is full: training could not write into .*resumes from the last") as e:
        offline(tmp_path, 2)
    assert e.value.errno == errno.ENOSPC


def test_an_unreadable_on_policy_checkpoint_is_skipped_for_the_one_before(tmp_path):
    from studylib.lm.online import train_online
    from studylib.losses import get_loss

    tokenizer = tiny_tokenizer()
    config = TrainConfig(max_steps=2, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=3, save_steps=1)
    prompts = [[5, 6, 7], [8, 9]]

    def reward(prompt_ids, completion_ids):
        import torch

        return torch.tensor([float(len(c)) for c in completion_ids])

    def run():
        return train_online(tiny_model(tokenizer), tokenizer, get_loss("reverse_kl"), config, prompt_ids=prompts,
                            reward_fn=reward, output_dir=tmp_path)  # fmt: skip

    _, straight = run()
    (tmp_path / "checkpoint-2" / "state.pt").write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="checkpoint-2 is incomplete"):
        _, resumed = run()
    assert [e["loss"] for e in resumed] == pytest.approx([e["loss"] for e in straight], rel=1e-5)


def test_a_users_mistake_is_one_line_and_exit_status_2(tmp_path, capsys, monkeypatch):
    """An all-empty data file: one line naming the file and what is wrong, no traceback, nothing written; with
    ``--debug`` the error itself (its traceback)."""
    import json as json_module

    from studylib.__main__ import main
    from studylib.checks import UserError

    monkeypatch.setenv("STUDYLIB_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "blank.jsonl"
    rows = [{"prompt": p, "completion": c, "label": True} for p, c in (("Say hi.", " "), ("Tea?", ""), ("Go.", "\n"))]
    data.write_text("".join(json_module.dumps(r) + "\n" for r in rows))
    params = tmp_path / "run.json"
    knobs = {"model": "tiny", "dataset": "ufg", "dataset_path": str(data), "results_dir": str(tmp_path / "lm")}
    params.write_text(json_module.dumps(knobs))
    assert main(["train", "--params", str(params)]) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]  # and datasets' bar
    assert error == [f"error: file {data}: every one of its 3 rows has an empty completion: nothing to train on"]
    assert not (tmp_path / "lm").exists()
    with pytest.raises(UserError, match="every one of its 3 rows has an empty completion"):
        main(["--debug", "train", "--params", str(params)])
    params.write_text(json_module.dumps(knobs | {"run_name": "../escape"}))
    assert main(["train", "--params", str(params)]) == 2
    shown = capsys.readouterr().err
    assert shown.startswith(f"error: {params}: run_name must be one plain folder name inside results_dir")
    assert shown.count("\n") == 1 and "Traceback" not in shown


def test_the_watchdog_fails_a_hung_command_not_a_slow_one():
    import sys

    from watchdog import run_until_stalled

    slow = "import time\nfor i in range(4):\n    print(i, flush=True)\n    time.sleep(0.5)"
    assert run_until_stalled([sys.executable, "-c", slow], stall_seconds=3) == (0, "0\n1\n2\n3\n")
    hung = "import time; print('started', flush=True); time.sleep(60)"
    with pytest.raises(TimeoutError, match="printed nothing for 2 s: hung"):
        run_until_stalled([sys.executable, "-c", hung], stall_seconds=2)


class RunsCode:
    """A pickle that would create a file when unpickled without ``weights_only``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_that_would_run_code_is_never_unpickled(tmp_path):
    """The on-policy trainer reads its state with ``weights_only=True``: a crafted ``state.pt`` is unreadable (set
    aside), never executed."""
    import torch

    from studylib.lm.online import OnlineTrainer
    from studylib.losses import get_loss

    tokenizer = tiny_tokenizer()
    config = TrainConfig(max_steps=1, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=3)
    marker = tmp_path / "code-ran"
    (tmp_path / "run" / "checkpoint-1").mkdir(parents=True)
    torch.save({"step": RunsCode(str(marker))}, tmp_path / "run" / "checkpoint-1" / "state.pt")
    trainer = OnlineTrainer(tiny_model(tokenizer), tokenizer, get_loss("reverse_kl"), config, prompt_ids=[[5, 6]],
                            reward_fn=lambda p, c: torch.ones(len(c)))  # fmt: skip
    with pytest.warns(UserWarning, match="checkpoint-1 is incomplete"):
        assert trainer.resume(tmp_path / "run") is False
    assert not marker.exists() and (tmp_path / "run" / "incomplete-checkpoint-1").is_dir()


REFUSED_UP_FRONT = [  # knob values that passed the check once and failed inside training, or meant nothing
    ({"lr_scheduler_type": "bogus"}, "lr_scheduler_type must be one of"),
    ({"lr_scheduler_type": "reduce_lr_on_plateau"}, "lr_scheduler_type must be one of"),
    ({"lr_scheduler_type": "cosine_with_min_lr"}, "lr_scheduler_kwargs"),
    ({"loss": "dpo", "dataset": "ufg", "dataset_path": "tests/fixtures/ufg.jsonl"}, "needs pairs"),
    ({"loss": "distill", "dataset": "mix14k", "dataset_path": "tests/fixtures/mix14k.jsonl"}, "needs pairs"),
    ({"lora_target_modules": []}, "lora_target_modules must be a non-empty list"),
    ({"lora_dropout": 1.0}, "lora_dropout must be in"),
    ({"lora_dropout": -0.1}, "lora_dropout must be in"),
    ({"lora_alpha": 0}, "lora_alpha must be > 0"),
    ({"logging_steps": 0}, "logging_steps must be >= 1"),
    ({"logging_steps": 100}, "at most max_steps"),
    ({"save_steps": 0}, "save_steps must be >= 1"),
    ({"reference_batch_size": 0}, "reference_batch_size must be >= 1"),
    ({"generation_batch_size": 0}, "generation_batch_size must be >= 1"),
    ({"reward_epochs": float("nan")}, "reward_epochs must be a finite number"),
    ({"seed": -1}, "seed must be in"),
    ({"data_seed": 2**40}, "data_seed must be in"),
    ({"max_steps": -1, "num_train_epochs": float("inf")}, "num_train_epochs must be finite"),
    ({"max_train_rows": 0}, "max_train_rows must be >= 1"),
    ({"results_dir": ""}, "results_dir must be a folder"),
    ({"max_steps": 1}, "warmup_ratio must be small enough"),
    ({"training_args": {"optim": "bogus"}}, "training_args: .*bogus"),
    ({"training_args": {"eval_strategy": "steps"}}, "eval_strategy / do_eval need an evaluation set"),
    ({"training_args": {"report_to": "no-such-tracker"}}, r"report_to \['no-such-tracker'\] is not installed"),
    ({"loss": "reverse_kl", "loss_kwargs": {}, "training_args": {"weight_decay": 0.1}}, "does not use"),
    ({"loss": "reverse_kl", "loss_kwargs": {}, "online": True}, "online applies to distillation"),
    ({"loss": "kto", "loss_kwargs": {"desirable_weight": 0, "undesirable_weight": 0}}, "both 0"),
    ({"loss": "dpo", "loss_kwargs": {"beta": True}}, "beta must be a finite number"),
]


@pytest.mark.parametrize("knobs, message", REFUSED_UP_FRONT, ids=[str(k) for k, _ in REFUSED_UP_FRONT])
def test_a_knob_that_would_fail_late_or_mean_nothing_is_refused_up_front(tiny_knobs, knobs, message):
    from studylib.checks import UserError

    with pytest.raises((UserError, ValueError), match=message):
        RunConfig.from_flat(tiny_knobs | knobs)


def test_a_single_data_file_may_hold_out_most_of_its_prompts(tiny_knobs):
    """The offline set's validation rule does not apply to a hub file (it once refused eval_fraction 0.9)."""
    RunConfig.from_flat(tiny_knobs | {"dataset_path": "tests/fixtures/ufb.jsonl", "eval_fraction": 0.9})


def test_a_step_larger_than_the_data_and_a_max_length_that_cuts_everything_are_refused(tiny_run):
    with pytest.raises(ValueError, match=r"batch_size x gradient_accumulation_steps = 200 rows a step, but the "):
        run_experiment(tiny_run(batch_size=2, gradient_accumulation_steps=100))
    assert not tiny_run().run_dir().exists()
    with pytest.raises(ValueError, match="max_length 3 cuts every one of the"):
        run_experiment(tiny_run(max_length=3, max_prompt_length=2))


@pytest.mark.parametrize(
    "knobs, message",
    [
        ({"training_args": {"logging_strategy": "no"}}, "logging_strategy must stay 'steps'"),
        ({"validation_fraction": 0.2}, "validation_fraction applies to the offline set only"),
    ],
)
def test_a_knob_a_run_would_ignore_is_refused(tiny_knobs, knobs, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_flat(tiny_knobs | knobs)
