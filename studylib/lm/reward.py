"""A Bradley-Terry reward model on the reference backbone: train, score, attach margins to pairs.

``R(x, y)`` is a linear head on the last hidden state of the reference model's base transformer at the
last token of ``x + y`` (the completion's EOS). It is fit on pairs ``(x, y_w, y_l)`` by the Bradley-Terry
log-loss (standard; paper 3 uses it for preference distillation)::

    loss = -log sigmoid(R(x, y_w) - R(x, y_l))

The reward model is built on a **copy** of the backbone, so the policy model passed in is never modified.
With ``use_lora=True`` the copy gets LoRA adapters (plus the trainable head) and they are merged after
training, so the returned model is always a plain backbone with a head.

>>> rm, history = train_reward_model(model, tokenizer, train_pairs, epochs=2)
>>> reward_accuracy(rm, test_pairs)
>>> rows = attach_reward_margins(rm, train_pairs)   # 'reward_margin' for the offline distill trainer
>>> rewards = rm.score(prompt_ids, completion_ids)   # a reward_fn for studylib.lm.online
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from studylib.lm.batching import last_token_index, pad_sequences, pad_token_id
from studylib.lm.lora import add_lora
from studylib.lm.models import cache_root
from studylib.results import write_atomic

if TYPE_CHECKING:
    from studylib.lm.config import RunConfig
    from studylib.lm.runtime import Runtime


class RewardModel(nn.Module):
    """Scalar reward ``R(x, y)``: ``backbone`` (a base transformer, e.g. ``LlamaModel``) then ``Linear(hidden, 1)``.

    The reward of a row is the head applied to the final hidden state of its last non-pad token.
    """

    def __init__(
        self, backbone: nn.Module, hidden_size: int, pad_id: int, seed: int = 0, device: torch.device | str = "cpu"
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, 1)
        self.pad_id = pad_id
        self.device = torch.device(device)  # where it lives and builds its batches: the run's Runtime.device
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(1, hidden_size, generator=generator) / math.sqrt(hidden_size))
            self.head.bias.zero_()
        self.to(self.device)

    @classmethod
    def from_causal_lm(
        cls, model: PreTrainedModel, pad_id: int, seed: int = 0, device: torch.device | str = "cpu"
    ) -> RewardModel:
        """A reward model on a deep copy of ``model.base_model`` (the base transformer), placed on ``device``;
        ``model`` is untouched."""
        if getattr(model, "peft_config", None):
            raise ValueError("pass the plain reference model, not a PEFT-wrapped policy")
        backbone = copy.deepcopy(model.base_model)
        return cls(backbone, model.config.hidden_size, pad_id, seed, device)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """Rewards (float32, one per row) of a padded batch: the head on each row's last real token."""
        last = last_token_index(attention_mask)
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        final = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.head(final.to(self.head.weight.dtype)).squeeze(-1).float()

    def rewards(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]) -> Tensor:
        """Rewards of (prompt, completion) token rows, as one padded batch (gradients flow if enabled)."""
        batch = pad_sequences(prompts, completions, self.pad_id)
        return self(*(batch[k].to(self.device) for k in ("input_ids", "attention_mask", "position_ids")))

    @torch.no_grad()
    def score(
        self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], batch_size: int = 16
    ) -> Tensor:
        """Rewards of many rows, returned on the CPU, in eval mode and batches: a ``reward_fn`` for
        ``studylib.lm.online``."""
        was_training = self.training
        self.eval()
        out = [
            self.rewards(prompts[i : i + batch_size], completions[i : i + batch_size]).cpu()
            for i in range(0, len(prompts), batch_size)
        ]
        self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)


def score(
    reward_model: RewardModel,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    batch_size: int = 16,
) -> Tensor:
    """``R(x, y)`` for each (prompt, completion) row (no gradients): ``reward_model.score``."""
    return reward_model.score(prompt_ids, completion_ids, batch_size)


def _pair_margins(reward_model: RewardModel, rows: Sequence[dict], batch_size: int) -> Tensor:
    prompts = [r["prompt_ids"] for r in rows]
    chosen = reward_model.score(prompts, [r["chosen_ids"] for r in rows], batch_size)
    rejected = reward_model.score(prompts, [r["rejected_ids"] for r in rows], batch_size)
    return chosen - rejected


def reward_accuracy(reward_model: RewardModel, pair_rows: Sequence[dict], batch_size: int = 16) -> float:
    """Fraction of pairs with ``R(x, y_w) > R(x, y_l)`` (ties count as wrong)."""
    if not pair_rows:
        raise ValueError("no pairs to score")
    return float((_pair_margins(reward_model, pair_rows, batch_size) > 0).float().mean())


def attach_reward_margins(reward_model: RewardModel, pair_rows: Sequence[dict], batch_size: int = 16) -> list[dict]:
    """Copies of the pairs with ``reward_margin = R(x, y_w) - R(x, y_l)``: the soft labels of offline distill."""
    margins = _pair_margins(reward_model, pair_rows, batch_size)
    return [{**r, "reward_margin": float(m)} for r, m in zip(pair_rows, margins, strict=True)]


def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """``mean -log sigmoid(R(x, y_w) - R(x, y_l))``."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards).mean()


def train_reward_model(
    model: PreTrainedModel,
    tokenizer,
    pair_rows: Sequence[dict],
    *,
    eval_rows: Sequence[dict] | None = None,
    epochs: int = 1,
    lr: float = 1e-4,
    batch_size: int = 8,
    use_lora: bool = False,
    lora_r: int = 16,
    lora_alpha: int | None = None,
    max_grad_norm: float = 10.0,
    seed: int = 0,
    output_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
) -> tuple[RewardModel, list[dict]]:
    """Fit a Bradley-Terry reward model on a copy of ``model``'s backbone; ``model`` is not modified.

    ``pair_rows``: dicts with ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (completions end with EOS).
    AdamW (no weight decay), constant ``lr``, shuffled minibatches (seeded). History: one entry per step
    (``step``, ``epoch``, ``loss``, ``accuracy``, ``grad_norm``) and, with ``eval_rows``, one per epoch with
    ``eval_accuracy``. With ``output_dir``, writes ``reward_model.pt`` (state dict) and ``reward_history.json``.
    Returns the reward model in eval mode with frozen parameters (LoRA merged), on ``device`` (the run's).
    """
    if not pair_rows:
        raise ValueError("no training pairs")
    missing = [k for k in ("prompt_ids", "chosen_ids", "rejected_ids") if k not in pair_rows[0]]
    if missing:
        raise ValueError(f"reward model training needs paired rows; the rows lack {missing}")
    reward_model = RewardModel.from_causal_lm(model, pad_token_id(tokenizer), seed, device)
    reward_model.backbone.requires_grad_(True)
    if use_lora:  # seeded adapter init, global RNG untouched
        reward_model.backbone = add_lora(reward_model.backbone, r=lora_r, alpha=lora_alpha, task_type=None, seed=seed)
    reward_model.train()
    params = [p for p in reward_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = random.Random(seed)
    history: list[dict] = []
    step = 0
    for epoch in range(epochs):
        indices = list(range(len(pair_rows)))
        order.shuffle(indices)
        for start in tqdm(range(0, len(indices), batch_size), desc=f"reward model epoch {epoch + 1}", leave=False):
            rows = [pair_rows[i] for i in indices[start : start + batch_size]]
            prompts = [r["prompt_ids"] for r in rows]
            rewards = reward_model.rewards(
                prompts + prompts, [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
            )
            chosen, rejected = rewards.chunk(2)
            loss = bradley_terry_loss(chosen, rejected)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            step += 1
            history.append(
                {
                    "step": step,
                    "epoch": epoch + (start + len(rows)) / len(indices),
                    "loss": loss.item(),
                    "accuracy": (chosen > rejected).float().mean().item(),
                    "grad_norm": grad_norm.item(),
                }
            )
        if eval_rows:
            history.append(
                {"step": step, "epoch": epoch + 1, "eval_accuracy": reward_accuracy(reward_model, eval_rows)}
            )
    if use_lora:
        reward_model.backbone = reward_model.backbone.merge_and_unload()
    reward_model.eval().requires_grad_(False)
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(reward_model.state_dict(), buffer)
        write_atomic(out / "reward_history.json", json.dumps(history, indent=2))
        write_atomic(out / "reward_model.pt", buffer.getvalue())  # last: its presence marks a complete fit
    return reward_model, history


def load_reward_model(
    model: PreTrainedModel, tokenizer, path: str | Path, device: torch.device | str = "cpu"
) -> RewardModel:
    """A reward model saved by ``train_reward_model(output_dir=...)``, rebuilt on a copy of ``model``'s backbone,
    on ``device``."""
    reward_model = RewardModel.from_causal_lm(model, pad_token_id(tokenizer), device=device)
    path = Path(path)
    state = torch.load(path / "reward_model.pt" if path.is_dir() else path, map_location=device, weights_only=True)
    reward_model.load_state_dict(state)
    return reward_model.eval().requires_grad_(False)


def held_out_by_prompt(pair_rows: Sequence[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """``(train, held_out)``: a shuffled ``fraction`` (at least one) of the pairs' distinct prompts, drawn with
    ``seed``, held out with all their pairs (pairs of one prompt share completions, so a split by pair would score
    completions the model was fit on)."""
    prompts = list(dict.fromkeys(tuple(r["prompt_ids"]) for r in pair_rows))
    random.Random(seed).shuffle(prompts)
    held = set(prompts[: max(1, round(fraction * len(prompts)))])
    return [r for r in pair_rows if tuple(r["prompt_ids"]) not in held], [
        r for r in pair_rows if tuple(r["prompt_ids"]) in held
    ]


def held_out_accuracy(reward_model: RewardModel, held_out: Sequence[dict], seed: int = 0) -> dict[str, float]:
    """``reward_accuracy_held_out`` with its 95% bootstrap interval over the held-out prompts (each prompt's
    accuracy over its pairs), and the counts it rests on."""
    from studylib.lm.stats import bootstrap_interval

    correct = (_pair_margins(reward_model, held_out, 16) > 0).double().numpy()
    keys = [tuple(r["prompt_ids"]) for r in held_out]
    per_prompt = {}
    for key, value in zip(keys, correct, strict=True):
        per_prompt.setdefault(key, []).append(value)
    estimate, low, high = bootstrap_interval([sum(v) / len(v) for v in per_prompt.values()], seed=seed)
    return {
        "reward_accuracy_held_out": float(correct.mean()),
        "reward_accuracy_held_out_prompt_mean": estimate,
        "reward_accuracy_held_out_low": low,
        "reward_accuracy_held_out_high": high,
        "reward_held_out_pairs": len(held_out),
        "reward_held_out_prompts": len(per_prompt),
    }


def reward_model_for(config: RunConfig, model, tokenizer, pair_rows: list[dict], runtime: Runtime):
    """A Bradley-Terry reward model fit on the pairs of 80% of their prompts (the other 20% held out, with all their
    pairs) on the run's device, cached on disk. It belongs to the data, not to the run: it is keyed by the model,
    the pairs and every knob of its fit (and a device other than the CPU), and fit with ``data_seed``, so every
    method and seed of a study shares one reward model. Several processes: the main process fits it first, the
    others load it. Reported: its held-out accuracy with an interval over the held-out prompts.
    """
    train_cfg, data_seed = config.train, config.data.data_seed
    train_pairs, held_out = held_out_by_prompt(pair_rows, 0.2, data_seed)
    if not train_pairs:
        raise ValueError(f"a reward model needs pairs of at least two prompts; got {len(pair_rows)} pairs of one")
    fit = {
        "epochs": max(1, round(train_cfg.reward_epochs)),
        "lr": 1e-4 if train_cfg.use_lora else 2e-5,
        "batch_size": train_cfg.batch_size,
        "use_lora": train_cfg.use_lora,
        "lora_r": train_cfg.lora_r,
        "lora_alpha": train_cfg.lora_alpha,
        "seed": data_seed,
    }
    device = runtime.device
    inputs = [config.model, fit, str(train_pairs)] + ([device.type] if device.type != "cpu" else [])
    key = hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:16]
    cache = cache_root() / "reward_models" / f"{config.model.replace('/', '--')}-{key}"
    with runtime.main_process_first():
        if (cache / "reward_model.pt").is_file():
            reward_model = load_reward_model(model, tokenizer, cache, device=device)
        else:
            reward_model, _ = train_reward_model(model, tokenizer, train_pairs, output_dir=cache, device=device, **fit)
    return reward_model, {**held_out_accuracy(reward_model, held_out, data_seed), "reward_pairs": len(train_pairs)}
