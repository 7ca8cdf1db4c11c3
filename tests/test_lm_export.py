"""A run leaves a model that transformers / peft load back (same logits), with a Hub model card; the Trainer's own
knobs pass through ``training_args``."""

from __future__ import annotations

import json
import math

import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from studylib.lm import experiment
from studylib.lm.annotators import AnnotatorPool
from studylib.lm.config import TrainConfig
from studylib.lm.experiment import run_experiment
from studylib.lm.export import save_trained_model
from studylib.lm.runtime import make_runtime
from studylib.lm.tiny import tiny_model, tiny_tokenizer
from studylib.lm.trainer import training_arguments

IDS = torch.tensor([[1, 80, 81, 82, 83, 84]])


@pytest.mark.parametrize("use_lora", [True, False])
def test_a_run_saves_a_model_that_loads_back_with_its_card(tiny_run, use_lora):
    config = tiny_run(use_lora=use_lora, training_args={"report_to": "none"})
    record = run_experiment(config)  # full fine-tuning: evaluation against the separate reference completes
    assert record["params"]["use_lora"] == use_lora and math.isfinite(record["kl"])
    folder = config.run_dir() / "model"
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == ("peft" if use_lora else "transformers")
    assert "rdro" in card.data.tags and card.data.base_model == "tiny"
    assert "Relative Density Ratio Optimization" in card.text and f"Seed {config.train.seed}" in card.text
    assert json.loads((folder / "run_config.json").read_text())["run"] == config.name()
    assert AutoTokenizer.from_pretrained(folder).eos_token == tiny_tokenizer().eos_token


@pytest.mark.parametrize("use_lora", [True, False])
def test_the_saved_model_has_the_trained_policys_logits(tiny_run, use_lora):
    config = tiny_run(use_lora=use_lora)
    runtime = make_runtime(config.train.bf16)
    model, tokenizer = experiment.load_policy(config, runtime)
    data = experiment.load_preferences(config, model, tokenizer, AnnotatorPool(0), runtime)
    loss_fn = experiment.build_run_loss(config, data)
    reference = experiment.separate_reference(config, model)
    plan = experiment.plan_training(loss_fn)
    policy, _, _ = experiment.train_policy(config, loss_fn, plan, model, tokenizer, data, reference, runtime)
    record = {"params": {**config.to_flat(), "run": config.name()}, "steps": 2}
    folder = save_trained_model(policy, tokenizer, record, config.run_dir() / "model")
    start = tiny_model(tokenizer, seed=config.train.seed)
    if use_lora:
        loaded = PeftModel.from_pretrained(start, folder)
    else:
        loaded = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        trained = policy.eval()(IDS).logits
        torch.testing.assert_close(loaded.eval()(IDS).logits, trained, atol=1e-6, rtol=1e-6)
        assert not torch.allclose(tiny_model(tokenizer, seed=config.train.seed)(IDS).logits, trained)


def test_training_args_reach_the_trainer_and_report_to_defaults_to_none(tmp_path):
    runtime = make_runtime(False)
    default = training_arguments(TrainConfig(), tmp_path, runtime)
    assert default.report_to in ([], "none", ["none"])
    args = training_arguments(
        TrainConfig(training_args={"report_to": ["tensorboard"], "weight_decay": 0.1, "logging_first_step": True}),
        tmp_path,
        runtime,
    )
    assert args.report_to == ["tensorboard"] and args.weight_decay == 0.1 and args.logging_first_step
