"""The loss families: every registered loss has exactly one; a new family is one class, which the offline trainer
trains without a change anywhere else; and nothing outside ``studylib/losses`` and ``studylib/families`` branches
on a loss's family declaration."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from studylib import families
from studylib.families import FAMILIES, Family, family_of
from studylib.families.base import Inputs, LogpsFn
from studylib.lm.batching import gather_rows, pad_sequences
from studylib.lm.config import TrainConfig
from studylib.lm.tiny import tiny_model, tiny_tokenizer
from studylib.lm.trainer import train
from studylib.losses import LOSSES, Loss, get_loss
from studylib.losses.base import check_tensors

ROOT = Path(__file__).resolve().parent.parent


def test_every_registered_loss_has_exactly_one_family():
    expected = {
        "dpo": "paired", "simpo": "paired", "pmle": "paired", "distill": "paired",
        "kto": "unpaired_mismatched", "bco": "unpaired", "ddro": "unpaired", "rdro": "unpaired",
        "reverse_kl": "on_policy", "rlhf": "on_policy",
    }  # fmt: skip
    assert {name: family_of(cls).name for name, cls in LOSSES.items()} == expected
    for cls in LOSSES.values():
        assert sum(f.serves(cls) for f in FAMILIES) == 1


def test_a_declaration_no_family_serves_is_named():
    class Listwise(Loss):
        name, kind = "listwise", "listwise"

    with pytest.raises(ValueError, match="kind='listwise'.*no family serves it"):
        family_of(Listwise())


def test_the_paired_and_unpaired_families_give_the_loss_the_same_rows_as_a_hand_built_call():
    """A table row's inputs, then the loss on them, equal the loss called by hand with the same log-probs."""
    u, ref = torch.tensor([0.3, -0.2], dtype=torch.float64), torch.tensor([0.1, 0.4], dtype=torch.float64)
    dpo, rdro = get_loss("dpo", beta=0.5), get_loss("rdro", alpha=0.3, reduction="flat")
    zero = torch.zeros_like(u)
    assert dpo(**family_of(dpo).table_inputs(u, ref))[0] == dpo(u, zero, ref, zero)[0]
    labels = torch.tensor([True, False])
    assert rdro(**family_of(rdro).table_inputs(u, ref, labels))[0] == rdro(u, ref, labels)[0]
    with pytest.raises(NotImplementedError, match="the on_policy family has no offline rows"):
        family_of(get_loss("reverse_kl")).collate([], 0)


class ChosenOnly(Loss):
    """Supervised fine-tuning on the chosen completions, ``-mean log pi(y_w | x)``: a loss of a family the library
    does not have (rows of a prompt and one completion, no label, no reference)."""

    name, kind, uses_reference = "sft_chosen", "chosen_only", False

    def __call__(self, policy_logps: torch.Tensor, **unused) -> tuple[torch.Tensor, dict]:
        check_tensors(policy_logps=policy_logps)
        return -policy_logps.mean(), {"logps/chosen": policy_logps.detach().mean()}


class ChosenOnlyFamily(Family):
    """The new family, in one class: its rows, their batch, the forward pass and the loss's input."""

    name = kind = "chosen_only"
    row_keys = ("prompt_ids", "chosen_ids")
    policy_keys = ("policy_logps",)

    def collate(self, rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        return pad_sequences([r["prompt_ids"] for r in rows], [r["chosen_ids"] for r in rows], pad_id)

    def loss_inputs(self, loss: Loss, batch: dict, policy: LogpsFn, reference: LogpsFn) -> Inputs:
        (logps,) = gather_rows(policy(""))
        return {"policy_logps": logps}


def test_a_new_family_is_one_class_that_the_offline_trainer_trains(tmp_path, monkeypatch):
    """Registered beside the others (``FAMILIES``, and its loss in ``LOSSES``), the new family trains on a tiny
    model with no other change: the trainer asks the family for its batches and the loss's inputs."""
    monkeypatch.setattr(families, "FAMILIES", (*FAMILIES, ChosenOnlyFamily()))
    monkeypatch.setitem(LOSSES, ChosenOnly.name, ChosenOnly)
    tokenizer = tiny_tokenizer()

    def ids(text: str, end: bool = False) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False) + ([tokenizer.eos_token_id] if end else [])

    rows = [{"prompt_ids": ids(p), "chosen_ids": ids(c, True)} for p, c in [("Hi.", "Hello!"), ("Tea?", "Yes.")] * 2]
    knobs = {"max_steps": 6, "batch_size": 4, "learning_rate": 3e-2, "use_lora": False, "warmup_ratio": 0.0}
    config = TrainConfig(**knobs, lr_scheduler_type="constant", save_steps=100)
    trainer = train(tiny_model(tokenizer, seed=0), tokenizer, rows, ChosenOnly(), config, tmp_path)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 6 and losses[-1] < losses[0]  # it learns its chosen completions
    assert "logps/chosen" in trainer.state.log_history[0]


FAMILY_TEST = re.compile(r"(loss\w*|cls|LOSSES\[[^\]]*\])\.(kind|mismatched_pairs)\b")


def test_no_module_outside_the_losses_and_the_families_reads_a_family_declaration():
    """``family_of`` reads ``kind`` and ``mismatched_pairs``; every other module asks the family object."""
    offenders = []
    for path in sorted((ROOT / "studylib").rglob("*.py")):
        relative = path.relative_to(ROOT / "studylib").parts
        if relative[0] in ("losses", "families"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if FAMILY_TEST.search(line.split("#")[0]) and not line.strip().startswith(("-", '"', "``")):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    # the one read left records the declaration in notebook 06's table of methods; no branch on it
    assert [o for o in offenders if '"kind": cls.kind' not in o] == []
