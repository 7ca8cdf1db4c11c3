"""The trainer on a tiny Llama built from a config: every loss trains, references are right, runs resume."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import TrainerCallback

from studylib.families import family_of
from studylib.lm.batching import score_sequences
from studylib.lm.config import TrainConfig
from studylib.lm.tiny import tiny_model, tiny_tokenizer
from studylib.lm.trainer import (
    AlignmentCollator,
    build_trainer,
    preferred_fraction,
    train,
)
from studylib.losses import LOSSES, build_loss, get_loss

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
    return paired_rows(tokenizer) if LOSSES[loss].kind == "paired" else unpaired_rows(tokenizer)


def config(**overrides) -> TrainConfig:
    knobs = {"max_steps": 3, "batch_size": 4, "learning_rate": 1e-2, "use_lora": False, "warmup_ratio": 0.0}
    knobs.update({"save_steps": 100, "lr_scheduler_type": "constant"})
    knobs.update(overrides)
    return TrainConfig(**knobs)


def loss_for(loss: str, rows: list[dict], **knobs):
    """The loss built once for ``rows``, as a run builds it."""
    fraction = preferred_fraction(rows) if LOSSES[loss].kind == "unpaired" else None
    return build_loss(loss, knobs, fraction)


def run(tmp_path, tokenizer, loss: str, rows=None, knobs=None, model=None, build=False, **overrides):
    """Train (or, with ``build``, only build the trainer for) ``loss`` on a tiny model in ``tmp_path / loss``."""
    rows = rows_for(loss, tokenizer) if rows is None else rows
    model = tiny_model(tokenizer, seed=0) if model is None else model
    args = (model, tokenizer, rows, loss_for(loss, rows, **(knobs or {})), config(**overrides), tmp_path / loss)
    return build_trainer(*args) if build else train(*args)


LOSS_KNOBS = {"dpo": {}, "kto": {}, "bco": {}, "ddro": {}, "rdro": {"alpha": "auto"}, "pmle": {"gamma": 0.5}}
LOSS_KNOBS |= {"distill": {"beta": 0.0}, "simpo": {}}


def test_every_offline_loss_is_covered():
    offline = {n for n, c in LOSSES.items() if c.kind != "on_policy"}
    assert offline == set(LOSS_KNOBS)


@pytest.mark.parametrize("loss", sorted(LOSS_KNOBS))
def test_every_loss_trains_every_parameter(tmp_path, tokenizer, loss):
    model = tiny_model(tokenizer, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = run(tmp_path, tokenizer, loss, knobs=LOSS_KNOBS[loss], model=model)
    unchanged = [n for n, p in trainer.model.named_parameters() if torch.equal(p.detach(), before[n])]
    assert not unchanged, f"{loss}: parameters did not change: {unchanged}"
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all(math.isfinite(entry["loss"]) for entry in logged)
    assert {"rewards/chosen", "rewards/margins", "logps/chosen", "grad_norm"} <= set(logged[0])
    if loss == "ddro":
        assert "guard/activations" in logged[0]
    if LOSSES[loss].kind == "unpaired" and loss != "bco":
        assert "ratio/max" in logged[0]


def test_lora_trains_only_adapters(tmp_path, tokenizer):
    trainer = run(tmp_path, tokenizer, "rdro", use_lora=True, lora_r=4)
    trained = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert any(p.abs().sum() > 0 for n, p in trained.items() if "lora_B" in n)  # B starts at zero


@pytest.mark.parametrize("use_lora", [False, True])
def test_step_zero_policy_equals_reference_and_dpo_is_log2(tmp_path, tokenizer, use_lora):
    trainer = run(tmp_path, tokenizer, "dpo", model=tiny_model(tokenizer, seed=1), build=True, use_lora=use_lora)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    loss = trainer.compute_loss(trainer.model, batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    assert trainer._window["rewards/margins"][-1] == pytest.approx(0.0, abs=1e-5)


def test_cached_reference_logps_equal_recomputed(tmp_path, tokenizer):
    model = tiny_model(tokenizer, seed=2)
    rows = unpaired_rows(tokenizer)
    first = run(tmp_path, tokenizer, "rdro", model=model, build=True).train_dataset.rows
    cached_files = list((tmp_path / "rdro").glob("reference_logps-*.pt"))
    assert len(cached_files) == 1
    fresh = score_sequences(
        model, [r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows], tokenizer.pad_token_id, 3
    )
    torch.testing.assert_close(torch.tensor([r["ref_logps"] for r in first]), fresh, atol=1e-5, rtol=1e-6)
    again = run(tmp_path, tokenizer, "rdro", model=tiny_model(tokenizer, seed=99), build=True).train_dataset.rows
    assert [r["ref_logps"] for r in again] == [r["ref_logps"] for r in first]


def test_class_fraction_comes_from_whole_training_set(tmp_path, tokenizer):
    rows = unpaired_rows(tokenizer)[:7]  # 4 preferred, 3 not
    trainer = run(tmp_path, tokenizer, "rdro", rows=rows, knobs={"alpha": "auto"}, build=True)
    assert trainer.loss_fn.preferred_fraction == pytest.approx(4 / 7)
    assert trainer.loss_fn.alpha == pytest.approx(4 / 7)
    with pytest.raises(ValueError, match="every one of the 2 rows is preferred"):
        preferred_fraction([r for r in rows if r["label"]][:2])


def test_kto_mismatched_pairs_are_a_seeded_cycle_of_other_rows_completions(tokenizer):
    rows = [{"prompt_ids": [5, 6], "completion_ids": [10 + i, 2], "label": i % 2 == 0} for i in range(5)]
    kto_rows = family_of(get_loss("kto"))
    paired = kto_rows.prepare_rows(rows, seed=0)
    partners = [r["kl_completion_ids"][0] - 10 for r in paired]
    assert sorted(partners) == list(range(5)) and all(p != i for i, p in enumerate(partners))  # a derangement
    i, seen = 0, set()
    while i not in seen:  # one cycle through every row
        seen.add(i)
        i = partners[i]
    assert seen == set(range(5))
    assert [r["kl_completion_ids"] for r in kto_rows.prepare_rows(rows, seed=0)] == [
        r["kl_completion_ids"] for r in paired
    ]
    batch = AlignmentCollator(pad_id=0, family=kto_rows)(paired[:3])
    assert batch["kl_input_ids"][:, 2].tolist() == [10 + p for p in partners[:3]]
    assert batch["kl_completion_mask"][0].tolist() == [0, 0, 1, 1]


class Interrupted(Exception):
    pass


class InterruptAfterSave(TrainerCallback):
    """Stops training right after the checkpoint of ``step`` is written, as a killed run would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupted


@pytest.mark.parametrize("loss", ["rdro", "bco"])  # BCO: its running mean (delta) is checkpointed too
def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, tokenizer, loss):
    knobs = {"max_steps": 4, "save_steps": 2, "lr_scheduler_type": "cosine", "warmup_ratio": 0.25}
    straight = run(tmp_path / "straight", tokenizer, loss, model=tiny_model(tokenizer), **knobs)
    interrupted = run(tmp_path, tokenizer, loss, model=tiny_model(tokenizer), build=True, **knobs)
    interrupted.add_callback(InterruptAfterSave(2))
    with pytest.raises(Interrupted):
        interrupted.train()
    assert (tmp_path / loss / "checkpoint-2").is_dir()
    resumed = run(tmp_path, tokenizer, loss, model=tiny_model(tokenizer), **knobs)
    logged = [e for e in resumed.state.log_history if "loss" in e]
    assert [e["step"] for e in logged] == [1, 2, 3, 4]  # history carried over, steps 3-4 trained anew
    expected = [e for e in straight.state.log_history if "loss" in e]
    assert [e["loss"] for e in logged] == pytest.approx([e["loss"] for e in expected], rel=1e-5)
    if loss == "bco":
        assert [e["delta"] for e in logged] == pytest.approx([e["delta"] for e in expected], rel=1e-5, abs=1e-9)
        assert abs(logged[-1]["delta"]) > 1e-4  # a mean that moved, so a lost one would show
    for (name, p), q in zip(resumed.model.named_parameters(), straight.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)


def test_resume_with_other_knobs_is_refused(tmp_path, tokenizer):
    run(tmp_path, tokenizer, "rdro", model=tiny_model(tokenizer), max_steps=2, save_steps=2)
    with pytest.raises(ValueError, match=r"holds a run with other knobs \(learning_rate: saved 0.01, now 0.001"):
        run(tmp_path, tokenizer, "rdro", model=tiny_model(tokenizer), max_steps=2, save_steps=2, learning_rate=1e-3)
    with pytest.raises(ValueError, match=r"other knobs \(loss: saved .*alpha=0.5.*now .*alpha=0.3"):
        run(tmp_path, tokenizer, "rdro", knobs={"alpha": 0.3}, max_steps=2, save_steps=2)


@pytest.mark.parametrize("where", ["logps", "loss", "grad"])
def test_divergence_stops_with_the_step_and_quantity_named(tmp_path, tokenizer, monkeypatch, where):
    trainer = run(tmp_path, tokenizer, "dpo", build=True, max_steps=3, save_steps=1)
    if where == "logps":  # a non-finite weight makes the policy's log-probs non-finite
        with torch.no_grad():
            next(p for p in trainer.model.parameters() if p.requires_grad).fill_(float("inf"))
        message = "step 1: the policy's log-probs is not finite"
    elif where == "loss":
        original = trainer.loss_fn.__call__
        monkeypatch.setattr(
            type(trainer.loss_fn), "__call__", lambda self, *a, **k: (original(*a, **k)[0] * float("nan"), {})
        )
        message = "step 1: the loss is not finite"
    else:
        trainer.args.max_grad_norm = 0.0  # no clipping: the gradient norm is reported as computed

        def nan_grad(grad):
            return grad * float("nan")

        next(p for p in trainer.model.parameters() if p.requires_grad).register_hook(nan_grad)
        message = "step 1: the gradient norm is not finite"
    with pytest.raises(FloatingPointError, match=message):
        trainer.train()
    assert not list((tmp_path / "dpo").glob("checkpoint-*"))  # the bad step saved nothing


def test_bad_rows_fail_clearly(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="needs paired rows; the rows lack"):
        run(tmp_path, tokenizer, "dpo", rows=unpaired_rows(tokenizer), build=True)
    rows = [{k: v for k, v in r.items() if k != "reward_margin"} for r in paired_rows(tokenizer)]
    with pytest.raises(ValueError, match="distill needs rows with reward_margin"):
        run(tmp_path, tokenizer, "distill", rows=rows, knobs={"beta": 0.0}, build=True)
    with pytest.raises(ValueError, match="samples from the policy"):  # a KL term needs the on-policy trainer
        run(tmp_path, tokenizer, "pmle", knobs={"beta": 0.1}, build=True)
    with pytest.raises(ValueError, match="no training rows"):
        build_trainer(tiny_model(tokenizer), tokenizer, [], build_loss("dpo"), config(), tmp_path)


@pytest.mark.parametrize(("loss", "use_lora"), [("dpo", False), ("rdro", True), ("kto", True)])
def test_on_the_fly_reference_equals_precomputed(tmp_path, tokenizer, loss, use_lora):
    losses = {}
    for precompute in (True, False):
        trainer = run(
            tmp_path / str(precompute),
            tokenizer,
            loss,
            model=tiny_model(tokenizer, seed=4),
            build=True,
            use_lora=use_lora,
            precompute_reference=precompute,
        )
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():  # move the policy (not the reference) so that the reference matters
            for p in trainer.model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        assert ("ref_logps" in batch) == precompute
        losses[precompute] = trainer.compute_loss(trainer.model, batch).item()
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    if loss == "dpo":
        assert abs(losses[True] - math.log(2)) > 1e-3  # the policy differs from the reference


def test_reference_precompute_decision(tmp_path):
    from studylib.lm.trainer import uses_precomputed_reference

    cfg = TrainConfig(max_steps=10, batch_size=8)
    assert not uses_precomputed_reference(cfg, 100)  # 80 rows seen of 100
    assert uses_precomputed_reference(cfg, 80)
    cfg.max_steps = -1  # whole epochs
    assert uses_precomputed_reference(cfg, 10_000)
    cfg.precompute_reference = False
    assert not uses_precomputed_reference(cfg, 10)


@pytest.mark.parametrize(("loss", "knobs"), [("simpo", {}), ("pmle", {"gamma": 0.5})])
def test_reference_free_loss_never_runs_a_reference_forward(tmp_path, tokenizer, loss, knobs, monkeypatch):
    from studylib.lm.reference import Reference

    calls = []

    def forbidden(self, *args):
        calls.append(args)
        raise AssertionError("a reference-free loss ran a reference forward")

    monkeypatch.setattr(Reference, "active", forbidden)
    monkeypatch.setattr(Reference, "logps", forbidden)
    for use_lora in (True, False):
        trainer = run(tmp_path / str(use_lora), tokenizer, loss, knobs=knobs, use_lora=use_lora, max_steps=2)
        assert trainer.reference is None and trainer.state.global_step == 2
    assert not calls


def test_simpo_uses_length_normalised_logps(tmp_path, tokenizer):
    """At step 0 SimPO's loss is -log sigmoid(beta (mean log pi(y_w) - mean log pi(y_l)) - gamma), by hand."""
    trainer = run(tmp_path, tokenizer, "simpo", knobs={"beta": 2.0, "gamma": 0.5}, build=True)
    rows = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator(rows)
    loss = trainer.compute_loss(trainer.model, batch).item()
    prompts = [r["prompt_ids"] for r in rows]
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        chosen = score_sequences(trainer.model, prompts, [r["chosen_ids"] for r in rows], pad, 4, average=True)
        rejected = score_sequences(trainer.model, prompts, [r["rejected_ids"] for r in rows], pad, 4, average=True)
    expected = -torch.nn.functional.logsigmoid(2.0 * (chosen - rejected) - 0.5).mean().item()
    assert loss == pytest.approx(expected, rel=1e-5)
    summed = score_sequences(trainer.model, prompts, [r["chosen_ids"] for r in rows], pad, 4)
    assert not torch.allclose(summed, chosen)  # the normalisation matters on these rows
