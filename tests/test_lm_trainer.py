"""The trainer on a tiny Llama built from a config: every loss trains, references are right, runs resume."""

from __future__ import annotations

import math

import pytest
import torch

from studylib.lm.batching import score_sequences
from studylib.lm.tiny import tiny_model, tiny_tokenizer
from studylib.lm.trainer import AlignmentCollator, TrainConfig, build_trainer, train

PROMPTS = ["Say hi.", "Name a colour.", "Count to three.", "What is tea?", "Give a fruit.", "Describe rain."]
GOOD = ["Hi there, friend!", "Blue, like the sky.", "One, two, three.", "A warm drink.", "An apple.", "Soft water."]
BAD = ["No.", "I hate colours.", "Never.", "Awful stuff.", "Bad.", "Terrible weather."]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def encode(tokenizer, text: str, completion: bool = False) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids + [tokenizer.eos_token_id] if completion else ids


def paired_rows(tokenizer):
    return [
        {
            "prompt_ids": encode(tokenizer, p),
            "chosen_ids": encode(tokenizer, g, True),
            "rejected_ids": encode(tokenizer, b, True),
            "reward_margin": 1.0,
        }
        for p, g, b in zip(PROMPTS, GOOD, BAD, strict=True)
    ]


def unpaired_rows(tokenizer):
    rows = []
    for p, g, b in zip(PROMPTS, GOOD, BAD, strict=True):
        rows.append({"prompt_ids": encode(tokenizer, p), "completion_ids": encode(tokenizer, g, True), "label": True})
        rows.append({"prompt_ids": encode(tokenizer, p), "completion_ids": encode(tokenizer, b, True), "label": False})
    return rows  # balanced; imbalance is covered by test_class_fraction_comes_from_whole_training_set


def rows_for(loss: str, tokenizer):
    return paired_rows(tokenizer) if loss in ("dpo", "pmle", "distill") else unpaired_rows(tokenizer)


def config(tmp_path, loss: str, **overrides) -> TrainConfig:
    knobs = {"output_dir": str(tmp_path / loss), "loss": loss, "max_steps": 3, "batch_size": 4, "learning_rate": 1e-2}
    knobs.update({"use_lora": False, "warmup_ratio": 0.0, "save_steps": 100, "lr_scheduler_type": "constant"})
    knobs.update(overrides)
    return TrainConfig(**knobs)


LOSS_KNOBS = {"dpo": {}, "kto": {}, "bco": {}, "ddro": {}, "rdro": {"alpha": "auto"}, "pmle": {"gamma": 0.5}}
LOSS_KNOBS["distill"] = {"beta": 0.0}


@pytest.mark.parametrize("loss", sorted(LOSS_KNOBS))
def test_every_loss_trains_every_parameter(tmp_path, tokenizer, loss):
    model = tiny_model(tokenizer, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = train(model, tokenizer, rows_for(loss, tokenizer), config(tmp_path, loss, loss_kwargs=LOSS_KNOBS[loss]))
    unchanged = [n for n, p in trainer.model.named_parameters() if torch.equal(p.detach(), before[n])]
    assert not unchanged, f"{loss}: parameters did not change: {unchanged}"
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all(math.isfinite(entry["loss"]) for entry in logged)
    assert {"rewards/chosen", "rewards/margins", "logps/chosen", "grad_norm"} <= set(logged[0])
    if loss == "ddro":
        assert "guard/activations" in logged[0]
    if loss in ("kto", "rdro", "ddro"):
        assert "ratio/max" in logged[0]


def test_lora_trains_only_adapters(tmp_path, tokenizer):
    model = tiny_model(tokenizer, seed=0)
    trainer = train(model, tokenizer, unpaired_rows(tokenizer), config(tmp_path, "rdro", use_lora=True, lora_r=4))
    trained = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert any(p.abs().sum() > 0 for n, p in trained.items() if "lora_B" in n)  # B starts at zero


@pytest.mark.parametrize("use_lora", [False, True])
def test_step_zero_policy_equals_reference_and_dpo_is_log2(tmp_path, tokenizer, use_lora):
    model = tiny_model(tokenizer, seed=1)
    rows = paired_rows(tokenizer)
    trainer = build_trainer(model, tokenizer, rows, config(tmp_path, "dpo", use_lora=use_lora))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    loss = trainer.compute_loss(trainer.model, batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    assert trainer._window["rewards/margins"][-1] == pytest.approx(0.0, abs=1e-5)


def test_cached_reference_logps_equal_recomputed(tmp_path, tokenizer):
    model = tiny_model(tokenizer, seed=2)
    rows = unpaired_rows(tokenizer)
    cfg = config(tmp_path, "rdro")
    first = build_trainer(model, tokenizer, rows, cfg).train_dataset.rows
    cached_files = list((tmp_path / "rdro").glob("reference_logps-*.pt"))
    assert len(cached_files) == 1
    fresh = score_sequences(
        model, [r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows], tokenizer.pad_token_id, 3
    )
    torch.testing.assert_close(torch.tensor([r["ref_logps"] for r in first]), fresh, atol=1e-5, rtol=1e-6)
    again = build_trainer(tiny_model(tokenizer, seed=99), tokenizer, rows, cfg).train_dataset.rows  # from cache
    assert [r["ref_logps"] for r in again] == [r["ref_logps"] for r in first]


def test_class_fraction_comes_from_whole_training_set(tmp_path, tokenizer):
    rows = unpaired_rows(tokenizer)[:7]  # 4 preferred, 3 not
    trainer = build_trainer(
        tiny_model(tokenizer), tokenizer, rows, config(tmp_path, "rdro", loss_kwargs={"alpha": "auto"})
    )
    assert trainer.loss_fn.preferred_fraction == pytest.approx(4 / 7)
    assert trainer.loss_fn.alpha == pytest.approx(4 / 7)


def test_kto_mismatched_pairs_shift_completions(tokenizer):
    rows = [
        {"prompt_ids": [5, 6], "completion_ids": [10 + i, 2], "label": i % 2 == 0, "ref_logps": 0.0} for i in range(3)
    ]
    batch = AlignmentCollator(pad_id=0, kind="unpaired", mismatched_pairs=True)(rows)
    assert batch["kl_input_ids"][:, 2].tolist() == [12, 10, 11]
    assert batch["kl_completion_mask"][0].tolist() == [0, 0, 1, 1]


def test_training_resumes_from_checkpoint(tmp_path, tokenizer):
    rows = unpaired_rows(tokenizer)
    cfg = config(tmp_path, "rdro", max_steps=2, save_steps=2)
    train(tiny_model(tokenizer), tokenizer, rows, cfg)
    assert (tmp_path / "rdro" / "checkpoint-2").is_dir()
    cfg.max_steps = 4
    trainer = train(tiny_model(tokenizer), tokenizer, rows, cfg)
    steps = [entry["step"] for entry in trainer.state.log_history if "loss" in entry]
    assert trainer.state.global_step == 4
    assert steps == [1, 2, 3, 4]  # history carried over from the checkpoint, steps 3-4 trained anew


def test_bad_rows_fail_clearly(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="needs paired rows; the rows lack"):
        build_trainer(tiny_model(tokenizer), tokenizer, unpaired_rows(tokenizer), config(tmp_path, "dpo"))
    rows = [dict(r) for r in paired_rows(tokenizer)]
    for r in rows:
        r.pop("reward_margin")
    with pytest.raises(ValueError, match="distill needs rows with reward_margin"):
        build_trainer(tiny_model(tokenizer), tokenizer, rows, config(tmp_path, "distill"))


@pytest.mark.parametrize(("loss", "use_lora"), [("dpo", False), ("rdro", True), ("kto", True)])
def test_on_the_fly_reference_equals_precomputed(tmp_path, tokenizer, loss, use_lora):
    rows = rows_for(loss, tokenizer)
    losses = {}
    for precompute in (True, False):
        cfg = config(tmp_path / str(precompute), loss, use_lora=use_lora, precompute_reference=precompute)
        trainer = build_trainer(tiny_model(tokenizer, seed=4), tokenizer, rows, cfg)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():  # move the policy (not the reference) so that the reference matters
            for p in trainer.model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        assert ("ref_logps" in batch or "ref_chosen_logps" in batch) == precompute
        losses[precompute] = trainer.compute_loss(trainer.model, batch).item()
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    if loss == "dpo":
        assert abs(losses[True] - math.log(2)) > 1e-3  # the policy differs from the reference


def test_reference_precompute_decision(tmp_path):
    from studylib.lm.trainer import uses_precomputed_reference

    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=10, batch_size=8)
    assert not uses_precomputed_reference(cfg, 100)  # 80 rows seen of 100
    assert uses_precomputed_reference(cfg, 80)
    cfg.max_steps = -1  # whole epochs
    assert uses_precomputed_reference(cfg, 10_000)
    cfg.precompute_reference = False
    assert not uses_precomputed_reference(cfg, 10)
