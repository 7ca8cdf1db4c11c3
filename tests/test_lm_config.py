"""One run configuration, and one routing function that reads what a loss declares."""

from __future__ import annotations

import dataclasses

import pytest

from studylib.lm.config import DataConfig, EvalConfig, RunConfig, TrainConfig
from studylib.lm.experiment import TrainingPlan, plan_training
from studylib.losses import get_loss
from studylib.study import NOTEBOOKS, notebook_parameters, parameter_defaults


def test_flat_names_are_unique_and_cover_every_part():
    names = RunConfig.flat_names()
    assert len(names) == len(set(names))
    for part in (DataConfig, TrainConfig, EvalConfig):
        assert {f.name for f in dataclasses.fields(part)} <= set(names)


def test_notebook_04_exposes_exactly_the_run_knobs():
    """Every knob a study YAML can set reaches the run, and the notebook has no knob the run ignores."""
    assert list(notebook_parameters(NOTEBOOKS / "04_lm_alignment.ipynb")) == RunConfig.flat_names()


def test_notebook_04_defaults_are_the_config_defaults():
    values = parameter_defaults(NOTEBOOKS / "04_lm_alignment.ipynb")
    defaults = RunConfig().to_flat()
    differ = {k: (values[k], defaults[k]) for k in values if values[k] != defaults[k] and k != "loss_kwargs"}
    assert not differ


def test_from_flat_places_knobs_and_round_trips():
    config = RunConfig.from_flat({"loss": "dpo", "learning_rate": 1e-3, "dataset": "ufb", "eval_prompts": 4})
    assert config.train.learning_rate == 1e-3 and config.data.dataset == "ufb" and config.eval.eval_prompts == 4
    assert RunConfig.from_flat(config.to_flat()) == config
    assert config.name() == f"ufb-dpo-seed=0-{config.identity_hash()}"
    assert (
        RunConfig.from_flat(config.to_flat() | {"results_dir": "elsewhere", "logging_steps": 5}).name() == config.name()
    )
    assert RunConfig.from_flat(config.to_flat() | {"seed": 1}).identity_hash() != config.identity_hash()


def test_unknown_knob_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"unknown run knob\(s\) \['learning_rte'\]; accepted: .*learning_rate"):
        RunConfig.from_flat({"learning_rte": 1e-3})


def test_lora_alpha_defaults_to_twice_the_rank(tmp_path):
    from studylib.lm.lora import add_lora
    from studylib.lm.tiny import tiny_model, tiny_tokenizer

    model = add_lora(tiny_model(tiny_tokenizer()), r=4)
    assert model.peft_config["default"].lora_alpha == 8


@pytest.mark.parametrize(
    ("loss", "knobs", "online", "plan"),
    [
        ("dpo", {}, False, TrainingPlan("offline", "paired", False, False)),
        ("simpo", {}, False, TrainingPlan("offline", "paired", False, False)),
        ("kto", {}, False, TrainingPlan("offline", "unpaired", False, False)),
        ("rdro", {"alpha": 0.3}, False, TrainingPlan("offline", "unpaired", False, False)),
        ("pmle", {"beta": 0.0}, False, TrainingPlan("offline", "paired", False, False)),
        ("pmle", {"beta": 0.1}, False, TrainingPlan("online", "paired", False, True)),
        ("distill", {"beta": 0.0}, False, TrainingPlan("offline", "paired", True, False)),
        ("distill", {"beta": 0.05}, False, TrainingPlan("online", "paired", True, True)),
        ("distill", {"beta": 0.05}, True, TrainingPlan("online", "prompts", True, False)),
        ("reverse_kl", {}, False, TrainingPlan("online", "prompts", True, False)),
        ("rlhf", {}, False, TrainingPlan("online", "prompts", True, False)),
    ],
)
def test_plan_training_reads_the_declarations(loss, knobs, online, plan):
    assert plan_training(get_loss(loss, **knobs), online) == plan


def test_online_needs_a_reward_model():
    with pytest.raises(ValueError, match="dpo uses no reward model"):
        plan_training(get_loss("dpo"), online=True)


def test_null_only_where_the_default_is_null_and_ints_for_floats_are_one_run():
    with pytest.raises(ValueError, match="use_lora must be true or false"):
        RunConfig.from_flat({"use_lora": None})
    with pytest.raises(ValueError, match="loss_kwargs must be a mapping"):
        RunConfig.from_flat({"loss_kwargs": None})
    assert RunConfig.from_flat({"dataset_path": None, "lora_alpha": 8}).train.lora_alpha == 8  # default None
    assert RunConfig.from_flat({"learning_rate": 1}).name() == RunConfig.from_flat({"learning_rate": 1.0}).name()
