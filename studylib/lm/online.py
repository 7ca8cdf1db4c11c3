"""On-policy training of paper 3's objectives on a causal LM: reverse KL, RLHF, online distillation, PMLE + KL.

Every step samples completions from the **current** policy (temperature 1, no top-k/top-p, so the samples
are exact draws from ``pi``, truncated at ``max_new_tokens``) and then, by ``config.loss``:

- ``reverse_kl`` / ``rlhf``: ``k = samples_per_prompt`` completions per prompt, rewards
  ``reward_fn(prompts, completions)``, and the registry's RLOO surrogate of
  ``-E_pi[R] - gamma H(pi) + beta KL(pi || pi_0)`` (``rlhf``: gamma = 0). Paper 3 uses PPO; leave-one-out
  REINFORCE is unbiased and needs no value model.
- ``distill`` (online, as paper 3 does): 2 completions per prompt ``(y1, y2)``, soft label
  ``sigmoid(R(y1) - R(y2))``, the registry's distill loss plus ``beta KL(pi || pi_0)`` estimated on the
  same samples. With ``pair_rows`` (carrying ``reward_margin``, see ``studylib.lm.reward``) it trains on
  data-set pairs instead and samples only for the KL term.
- ``pmle``: data-set pairs (``pair_rows``), plus, if ``beta > 0``, the KL term estimated on
  ``samples_per_prompt`` policy samples for each pair's prompt (``beta = 0``, the chat setting, samples nothing).

**KL estimator.** For ``y ~ pi``: ``KL(pi || pi_0) = E_pi[l(y)]``, ``l = log pi(y) - log pi_0(y)``, and
``grad KL = E_pi[l grad log pi] + E_pi[grad log pi] = E_pi[l grad log pi]`` (the score has mean 0). The penalty
``kl_estimate`` returns has the value ``mean(l)`` (unbiased for KL; logged as ``kl``) and the gradient
``mean((l_i - b_i) grad log pi(y_i))``, with ``b_i`` the mean of ``l`` over the other samples of the same
prompt (leave-one-out; ``b_i = 0`` with one sample per prompt). ``b_i`` does not depend on ``y_i``, so the
gradient stays unbiased; ``tests/test_lm_online.py`` checks it by enumeration.

Reference log-probs: the policy with its LoRA adapters disabled, or a frozen copy of the model under
full fine-tuning. Optimiser: AdamW (weight decay 0), constant learning rate, gradient clipping. A run with
``output_dir`` saves a checkpoint (trainable parameters, optimiser, step, RNG state, history) every
``save_steps`` and resumes from the latest one; prompts and sampling seeds depend only on ``(seed, step)``,
so a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from studylib.lm.batching import model_logps, pad_sequences, reference_context
from studylib.lm.evaluate import generate
from studylib.lm.trainer import LORA_TARGETS, wrap_lora
from studylib.losses import get_loss
from studylib.losses.on_policy import leave_one_out_advantages

RewardFn = Callable[[Sequence[Sequence[int]], Sequence[Sequence[int]]], Tensor]
ONLINE_LOSSES = ("reverse_kl", "rlhf", "distill", "pmle")


@dataclass
class OnlineConfig:
    """An on-policy run. ``prompts_per_step``: prompts (or data-set pairs, for pmle / offline distill) per step.
    ``samples_per_prompt``: k for reverse_kl/rlhf (>= 2), KL samples per pair's prompt for data-set pairs;
    online distill always samples 2. ``steps`` is the total (a resumed run continues up to it)."""

    loss: str = "reverse_kl"
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    steps: int = 100
    prompts_per_step: int = 4
    samples_per_prompt: int = 2
    max_new_tokens: int = 32
    learning_rate: float = 1e-5
    max_grad_norm: float = 10.0
    use_lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    generation_batch_size: int = 16
    seed: int = 0
    output_dir: str | None = None
    save_steps: int = 50

    def __post_init__(self) -> None:
        if self.loss not in ONLINE_LOSSES:
            raise ValueError(f"online loss must be one of {ONLINE_LOSSES}, got {self.loss!r}")
        if self.loss in ("reverse_kl", "rlhf") and self.samples_per_prompt < 2:
            raise ValueError(
                f"{self.loss} needs samples_per_prompt >= 2 (leave-one-out), got {self.samples_per_prompt}"
            )
        if min(self.steps, self.prompts_per_step, self.samples_per_prompt, self.max_new_tokens) < 1:
            raise ValueError("steps, prompts_per_step, samples_per_prompt and max_new_tokens must be >= 1")


def kl_estimate(policy_logps: Tensor, reference_logps: Tensor, samples_per_prompt: int = 1) -> Tensor:
    """Differentiable estimate of ``KL(pi || pi_0)`` from samples ``y ~ pi`` (see the module docstring).

    Value ``mean(l)``, gradient ``mean((l_i - b_i) grad log pi(y_i))``, ``l = log pi - log pi_0`` detached,
    ``b_i`` the leave-one-out mean of ``l`` within each group of ``samples_per_prompt`` consecutive rows.
    """
    logratios = (policy_logps - reference_logps).detach()
    if samples_per_prompt >= 2:
        weights = leave_one_out_advantages(logratios, samples_per_prompt)
    else:
        weights = logratios
    return logratios.mean() + (weights * (policy_logps - policy_logps.detach())).mean()


def _batch_order(n: int, per_step: int, step: int, seed: int) -> list[int]:
    """Indices of the items for 0-based ``step``: consecutive slices of a per-epoch seeded permutation."""
    out: list[int] = []
    position = step * per_step
    while len(out) < per_step:
        epoch, offset = divmod(position, n)
        permutation = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(permutation)
        take = min(per_step - len(out), n - offset)
        out.extend(permutation[offset : offset + take])
        position += take
    return out


class OnlineTrainer:
    """The state of an on-policy run; ``train_online`` is the usual entry point."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer,
        prompt_ids: Sequence[Sequence[int]] | None,
        reward_fn: RewardFn | None,
        config: OnlineConfig,
        pair_rows: Sequence[dict] | None = None,
    ) -> None:
        self.config, self.tokenizer, self.reward_fn = config, tokenizer, reward_fn
        self.loss_fn = get_loss(config.loss, **config.loss_kwargs)
        self.pair_rows = list(pair_rows) if pair_rows else None
        self.prompt_ids = [list(p) for p in prompt_ids] if prompt_ids else None
        self._check_inputs()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        torch.manual_seed(config.seed)
        self.reference = None if config.use_lora else copy.deepcopy(model).eval().requires_grad_(False)
        # wrap_lora reads only the lora_* fields, which OnlineConfig shares with TrainConfig
        self.policy = wrap_lora(model, config) if config.use_lora else model
        self.policy.train()
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=0.0)
        self.step, self.history = 0, []

    def _check_inputs(self) -> None:
        loss, kl_beta = self.config.loss, getattr(self.loss_fn, "beta", 0.0)
        if loss == "pmle" or (loss == "distill" and self.pair_rows):
            if not self.pair_rows:
                raise ValueError("pmle trains on data-set pairs: pass pair_rows")
            needed = ["prompt_ids", "chosen_ids", "rejected_ids"] + (["reward_margin"] if loss == "distill" else [])
            missing = [k for k in needed if k not in self.pair_rows[0]]
            if missing:
                hint = " (reward margins: studylib.lm.reward.attach_reward_margins)" if loss == "distill" else ""
                raise ValueError(f"{loss} pair_rows lack {missing}{hint}")
        else:
            if not self.prompt_ids:
                raise ValueError(f"{loss} samples from the policy: pass prompt_ids")
            if self.reward_fn is None:
                raise ValueError(f"{loss} needs reward_fn(prompt_ids, completion_ids) -> Tensor")
        self._kl_beta = kl_beta

    # --- pieces of a step -------------------------------------------------------------------------------
    def _sample(self, prompts: list[list[int]], seed: int) -> list[list[int]]:
        cfg = self.config
        return generate(
            self.policy,
            self.tokenizer,
            prompts,
            max_new_tokens=cfg.max_new_tokens,
            temperature=1.0,
            seed=seed,
            batch_size=cfg.generation_batch_size,
            desc=None,
        )

    def _logps(self, prompts: list[list[int]], completions: list[list[int]]) -> tuple[Tensor, Tensor]:
        """Policy log-probs (with gradients) and reference log-probs (without) of the rows."""
        device = next(self.policy.parameters()).device
        batch = {k: v.to(device) for k, v in pad_sequences(prompts, completions, self.pad_id).items()}
        policy = model_logps(self.policy, batch)
        with torch.no_grad():
            if self.reference is not None:
                reference = model_logps(self.reference, batch)
            else:
                with reference_context(self.policy):
                    reference = model_logps(self.policy, batch)
        return policy, reference

    def _rewards(self, prompts: list[list[int]], completions: list[list[int]]) -> Tensor:
        rewards = torch.as_tensor(self.reward_fn(prompts, completions), dtype=torch.float32).flatten()
        if rewards.numel() != len(completions):
            raise ValueError(f"reward_fn returned {rewards.numel()} rewards for {len(completions)} completions")
        return rewards

    def _step_loss(self, seed: int) -> tuple[Tensor, dict[str, Tensor], list[list[int]]]:
        """Loss, metrics and sampled completions of step ``self.step`` (0-based)."""
        if self.pair_rows is None:
            return self._sampled_loss(seed)
        return self._dataset_pairs_loss(seed)

    def _sampled_loss(self, seed: int) -> tuple[Tensor, dict[str, Tensor], list[list[int]]]:
        """reverse_kl, rlhf (groups of k samples) and online distill (pairs of samples): all from the policy."""
        cfg, loss_fn = self.config, self.loss_fn
        k = 2 if cfg.loss == "distill" else cfg.samples_per_prompt
        order = _batch_order(len(self.prompt_ids), cfg.prompts_per_step, self.step, cfg.seed)
        prompts = [self.prompt_ids[i] for i in order for _ in range(k)]
        completions = self._sample(prompts, seed)
        rewards = self._rewards(prompts, completions)
        policy, reference = self._logps(prompts, completions)
        rewards = rewards.to(policy.device)
        if cfg.loss != "distill":
            loss, metrics = loss_fn(policy, reference, rewards, samples_per_prompt=k)
            return loss, metrics, completions
        loss, metrics = loss_fn(
            policy[0::2],
            policy[1::2],
            reward_margins=rewards[0::2] - rewards[1::2],
            kl_penalty=kl_estimate(policy, reference, 2),
        )
        metrics["rewards/mean"] = rewards.mean()
        return loss, metrics, completions

    def _dataset_pairs_loss(self, seed: int) -> tuple[Tensor, dict[str, Tensor], list[list[int]]]:
        """pmle and offline distill on data-set pairs; policy samples only for the KL term (if beta > 0)."""
        cfg = self.config
        rows = [self.pair_rows[i] for i in _batch_order(len(self.pair_rows), cfg.prompts_per_step, self.step, cfg.seed)]
        prompts = [r["prompt_ids"] for r in rows]
        device = next(self.policy.parameters()).device
        completions = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
        batch = {k: v.to(device) for k, v in pad_sequences(prompts + prompts, completions, self.pad_id).items()}
        chosen_logps, rejected_logps = model_logps(self.policy, batch).chunk(2)
        extra: dict[str, Tensor] = {}
        samples: list[list[int]] = []
        if self._kl_beta > 0:
            k = cfg.samples_per_prompt
            sample_prompts = [p for p in prompts for _ in range(k)]
            samples = self._sample(sample_prompts, seed)
            policy, reference = self._logps(sample_prompts, samples)
            extra["kl_penalty"] = kl_estimate(policy, reference, k)
        if cfg.loss == "distill":
            extra["reward_margins"] = torch.tensor([float(r["reward_margin"]) for r in rows], device=device)
        loss, metrics = self.loss_fn(chosen_logps, rejected_logps, **extra)
        return loss, metrics, samples

    # --- the loop -----------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """One optimiser step; returns (and records) its log entry."""
        start = time.perf_counter()
        seed = self.config.seed * 1_000_003 + self.step
        loss, metrics, completions = self._step_loss(seed)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.step += 1
        entry = {"step": self.step, "loss": loss.item(), "grad_norm": grad_norm.item()}
        entry["learning_rate"] = self.config.learning_rate
        entry |= {name: float(value) for name, value in metrics.items()}
        if completions:
            entry["completions/mean_length"] = sum(map(len, completions)) / len(completions)
        entry["step_seconds"] = time.perf_counter() - start
        self.history.append(entry)
        return entry

    def train(self) -> list[dict]:
        """Resume from the latest checkpoint in ``output_dir`` if any, then train up to ``config.steps``."""
        out = Path(self.config.output_dir) if self.config.output_dir else None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "online_config.json").write_text(json.dumps(asdict(self.config), indent=2))
            self.resume(out)
        for _ in tqdm(range(self.step, self.config.steps), desc=f"{self.config.loss} (on-policy)", leave=False):
            self.train_step()
            if out is not None and (self.step % self.config.save_steps == 0 or self.step == self.config.steps):
                self.save(out)
        return self.history

    def save(self, out: Path, keep: int = 2) -> Path:
        """Write ``checkpoint-<step>/state.pt`` atomically, and ``history.jsonl``; keep the last ``keep``."""
        trainable = {n: p.detach().cpu() for n, p in self.policy.named_parameters() if p.requires_grad}
        state = {
            "step": self.step,
            "trainable": trainable,
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "history": self.history,
        }
        target = out / f"checkpoint-{self.step}"
        tmp = out / f".checkpoint-{self.step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        torch.save(state, tmp / "state.pt")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        (out / "history.jsonl").write_text("".join(json.dumps(e) + "\n" for e in self.history))
        for old in sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return target

    def resume(self, out: Path) -> bool:
        """Load the latest ``checkpoint-<step>`` in ``out``; False if there is none."""
        checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        if not checkpoints:
            return False
        state = torch.load(checkpoints[-1] / "state.pt", weights_only=False)
        named = dict(self.policy.named_parameters())
        with torch.no_grad():
            for name, value in state["trainable"].items():
                named[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.history = state["step"], state["history"]
        return True


def train_online(
    model: PreTrainedModel,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]] | None,
    reward_fn: RewardFn | None,
    config: OnlineConfig,
    pair_rows: Sequence[dict] | None = None,
) -> tuple[PreTrainedModel, list[dict]]:
    """Train ``model`` on-policy with ``config.loss``; returns the policy (PEFT-wrapped under LoRA) and its history.

    ``prompt_ids``: chat-templated prompt tokens (``studylib.lm.data.encode_prompt``), for the objectives that
    sample pairs or groups. ``reward_fn(prompt_ids, completion_ids) -> Tensor``: one reward per row (e.g.
    ``RewardModel.score``). ``pair_rows``: data-set pairs for ``pmle`` and offline ``distill``. Each history
    entry has ``step``, ``loss``, ``grad_norm``, ``learning_rate``, the loss's metrics (TRL names; ``kl`` is
    the sample estimate of ``KL(pi || pi_0)``), ``completions/mean_length`` and ``step_seconds``.
    """
    trainer = OnlineTrainer(model, tokenizer, prompt_ids, reward_fn, config, pair_rows)
    history = trainer.train()
    return trainer.policy, history
