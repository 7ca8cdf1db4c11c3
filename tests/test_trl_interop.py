"""``studylib.trl``: DDRO, RDRO and PMLE through TRL's trainers equal our trainer on the same batch (trl==1.16.0).

One training step (``Trainer.training_step``: forward, registry loss, backward) through the TRL adapter and through
``studylib.lm.trainer.AlignmentTrainer``, on the same tiny model, reference and token ids (TRL tokenizes TRL-format
rows; our trainer gets the ids TRL made), must give the same loss, metrics and gradients. The two trainers pad
differently (TRL: right, no position ids; ours: prompts left, explicit position ids) and compute log-probs with
different kernels (TRL's fused LM head; ``studylib.logprobs``), so the match is to float32 round-off.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402

from studylib.lm.config import TrainConfig  # noqa: E402
from studylib.lm.tiny import tiny_model, tiny_tokenizer  # noqa: E402
from studylib.lm.trainer import build_trainer, preferred_fraction  # noqa: E402
from studylib.losses import LOSSES, build_loss  # noqa: E402
from studylib.trl import DDROConfig, DDROTrainer, PMLEConfig, PMLETrainer, RDROConfig, RDROTrainer  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


def mix14k_rows() -> Dataset:
    """TRL's unpaired conversational format (trl-lib/kto-mix-14k): 3 rows, 2 preferred."""
    lines = (FIXTURES / "mix14k.jsonl").read_text().splitlines()[:3]
    return Dataset.from_list([json.loads(line) for line in lines])


def standard_unpaired_rows() -> Dataset:
    """TRL's unpaired standard format: 5 rows, 2 preferred."""
    return Dataset.from_dict(
        {
            "prompt": ["Say hi.", "Say hi.", "Name a colour.", "Count to three.", "What is tea?"],
            "completion": ["Hi there, friend!", "No.", "I hate colours.", "One, two, three.", "Awful stuff."],
            "label": [True, False, False, True, False],
        }
    )


def standard_paired_rows() -> Dataset:
    """TRL's paired standard format: 3 pairs."""
    return Dataset.from_dict(
        {
            "prompt": ["Say hi.", "Name a colour.", "Give a fruit."],
            "chosen": ["Hi there, friend!", "Blue, like the sky.", "An apple."],
            "rejected": ["No.", "I hate colours.", "Bad."],
        }
    )


# loss: (TRL adapter, its config, the loss's knobs, TRL-format rows)
CASES = {
    "rdro": (RDROTrainer, RDROConfig, {"alpha": "auto"}, mix14k_rows),
    "ddro": (DDROTrainer, DDROConfig, {}, standard_unpaired_rows),
    "pmle": (PMLETrainer, PMLEConfig, {"gamma": 0.5}, standard_paired_rows),
}
TOKEN_KEYS = {"paired": ("prompt_ids", "chosen_ids", "rejected_ids"), "unpaired": ("prompt_ids", "completion_ids")}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def trl_args(config_class, output_dir: Path, batch_size: int, **knobs):
    return config_class(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size,
        max_steps=1,
        learning_rate=1e-2,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=1,
        dataloader_pin_memory=False,
        **knobs,
    )


def one_step(trainer, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss and gradients of one ``training_step`` on ``batch``."""
    trainer.model.zero_grad(set_to_none=True)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train
    loss = trainer.training_step(trainer.model, batch)
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    return loss, grads


@pytest.mark.parametrize("loss", sorted(CASES))
def test_one_step_through_trl_equals_our_trainer(tmp_path, tokenizer, loss):
    trainer_class, config_class, knobs, rows = CASES[loss]
    kind, reference_free = LOSSES[loss].kind, not LOSSES[loss].uses_reference
    reference = (lambda: None) if reference_free else (lambda: tiny_model(tokenizer, seed=1))  # T != 0
    dataset = rows()
    trl_trainer = trainer_class(
        model=tiny_model(tokenizer, seed=0),
        ref_model=reference(),
        args=trl_args(config_class, tmp_path / "trl", len(dataset), **knobs),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    if reference_free:
        assert trl_trainer.ref_model is None
        trl_trainer.compute_ref_log_probs = None  # a reference forward would fail here
    keys = TOKEN_KEYS[kind] + (("label",) if kind == "unpaired" else ())
    token_rows = [{k: row[k] for k in keys} for row in trl_trainer.train_dataset]  # the ids TRL made
    fraction = preferred_fraction(token_rows) if kind == "unpaired" else None
    ours = build_trainer(
        tiny_model(tokenizer, seed=0),
        tokenizer,
        token_rows,
        build_loss(loss, knobs, fraction),
        TrainConfig(max_steps=1, batch_size=len(token_rows), use_lora=False, save_steps=100),
        tmp_path / "ours",
        reference_model=reference(),
    )
    assert trl_trainer.loss_fn.hparams() == ours.loss_fn.hparams()

    trl_loss, trl_grads = one_step(trl_trainer, trl_trainer.data_collator(list(trl_trainer.train_dataset)))
    our_loss, our_grads = one_step(ours, ours.data_collator([ours.train_dataset[i] for i in range(len(token_rows))]))

    # Measured (2 CPU threads): loss within 2.5e-5 relative (DDRO; one float32 ulp, 7.6e-6, of a log-prob sum near
    # -100), each gradient tensor within 1e-5 of its largest entry, metrics within 1e-5 absolute.
    torch.testing.assert_close(trl_loss, our_loss, rtol=1e-4, atol=1e-5)
    assert trl_grads.keys() == our_grads.keys()
    for name, grad in trl_grads.items():
        scale = our_grads[name].abs().max().item()
        torch.testing.assert_close(
            grad, our_grads[name], rtol=1e-4, atol=1e-4 * scale, msg=lambda m, n=name: f"{n}: {m}"
        )
    trl_metrics = {k: v[-1] for k, v in trl_trainer._metrics["train"].items()}
    our_metrics = {k: v[-1] for k, v in ours._window.items()}
    assert trl_metrics.keys() == our_metrics.keys() >= {"rewards/chosen", "rewards/margins", "logps/chosen"}
    for name, value in trl_metrics.items():
        assert value == pytest.approx(our_metrics[name], rel=1e-4, abs=1e-4), name


def test_rdro_trains_on_precomputed_reference_and_logs_trl_names(tmp_path, tokenizer):
    """``precompute_ref_log_probs`` holds the reference's log-probs; ``alpha="auto"`` is the preferred fraction."""
    trainer = RDROTrainer(
        model=tiny_model(tokenizer, seed=0),
        ref_model=tiny_model(tokenizer, seed=1),
        args=trl_args(RDROConfig, tmp_path, 3, precompute_ref_log_probs=True),
        train_dataset=mix14k_rows(),
        processing_class=tokenizer,
    )
    assert trainer.loss_fn.alpha == pytest.approx(2 / 3) == trainer.loss_fn.preferred_fraction
    batch = trainer.data_collator(list(trainer.train_dataset))
    torch.testing.assert_close(batch["ref_logps"], trainer._reference(batch)[0])  # as computed on the fly
    trainer.train()
    logged = trainer.state.log_history[0]
    assert {"loss", "grad_norm", "rewards/chosen", "rewards/margins", "logps/chosen", "ratio/max"} <= set(logged)


def test_lora_reference_is_the_policy_without_its_adapter(tmp_path, tokenizer):
    from peft import LoraConfig

    trainer = DDROTrainer(
        model=tiny_model(tokenizer, seed=0),
        args=trl_args(DDROConfig, tmp_path, 5),
        train_dataset=standard_unpaired_rows(),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    assert trainer.ref_model is None
    with torch.no_grad():
        trainer.compute_loss(trainer.model, trainer.data_collator(list(trainer.train_dataset)))
    assert trainer._metrics["train"]["ratio/max"] == [1.0]  # lora_B starts at zero: T = 0 on every row


@pytest.mark.parametrize(
    ("config_class", "knobs", "match"),
    [
        (RDROConfig, {"beta": 0.5}, "beta"),
        (DDROConfig, {"desirable_weight": 2.0}, "desirable_weight"),
        (PMLEConfig, {"loss_type": "ipo"}, "loss_type"),
        (RDROConfig, {"alpha": 1.5}, "alpha"),
        (DDROConfig, {"reduction": "mean"}, "reduction"),
        (PMLEConfig, {"gamma": -1.0}, "gamma"),
        (PMLEConfig, {"sync_ref_model": True}, "reference-free"),
    ],
)
def test_configs_reject_knobs_the_loss_does_not_read_or_accept(tmp_path, config_class, knobs, match):
    with pytest.raises(ValueError, match=match):
        config_class(output_dir=str(tmp_path), report_to="none", bf16=False, **knobs)


def test_pmle_takes_no_reference_model(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="reference-free"):
        PMLETrainer(
            model=tiny_model(tokenizer, seed=0),
            ref_model=tiny_model(tokenizer, seed=1),
            args=trl_args(PMLEConfig, tmp_path, 3),
            train_dataset=standard_paired_rows(),
            processing_class=tokenizer,
        )


def test_studylib_does_not_need_trl(monkeypatch):
    """Only ``studylib.trl`` imports TRL, and without TRL it names the extra to install."""
    root = Path(__file__).parents[1] / "studylib"
    importing = re.compile(r"^\s*(import trl\b|from trl\b|import studylib\.trl|from studylib(\.trl)? import trl)", re.M)
    offenders = [p for p in root.rglob("*.py") if p.name != "trl.py" and importing.search(p.read_text())]
    assert not offenders
    monkeypatch.setitem(sys.modules, "trl", None)
    monkeypatch.delitem(sys.modules, "studylib.trl")
    with pytest.raises(ImportError, match=r"pip install studylib\[trl\]"):
        importlib.import_module("studylib.trl")
