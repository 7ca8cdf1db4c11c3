"""On-policy training of paper 3's objectives on a causal LM: reverse KL, RLHF, online distillation, PMLE + KL.

Every step samples completions from the **current** policy (``studylib.lm.sampling``: temperature 1, no
top-k/top-p, so the samples are exact draws from ``pi``, truncated at ``max_new_tokens``). The loss, built
once by the caller, and its family (``studylib.families``) say what a step is; this class keeps the loop, the
optimiser, the checkpoints and the pieces a step is made of (``sample``, ``logps``, ``rewards``, ``step_prompts``):

- on-policy family (reverse KL, RLHF; ``OnPolicyFamily.sampled_inputs``): ``k = samples_per_prompt`` completions
  per prompt, rewards ``reward_fn(prompts, completions)``, and the registry's RLOO surrogate of
  ``-E_pi[R] - gamma H(pi) + beta KL(pi || pi_0)`` (``rlhf``: gamma = 0). Paper 3 uses PPO; leave-one-out
  REINFORCE is unbiased and needs no value model.
- paired family, sampled pairs (online distillation, as paper 3 does; ``PairedFamily.sampled_inputs``): 2
  completions per prompt ``(y1, y2)``, reward margins ``R(y1) - R(y2)`` (soft labels), plus
  ``kl_coefficient * KL(pi || pi_0)`` estimated on the same samples.
- paired family with ``pair_rows`` (PMLE, offline distillation with a KL term; ``PairedFamily.pair_inputs``):
  data-set pairs (carrying ``reward_margin`` where the loss ``needs_reward_model``, see ``studylib.lm.reward``),
  plus the KL term estimated on ``samples_per_prompt`` policy samples for each pair's prompt.

**KL estimator.** For ``y ~ pi``: ``KL(pi || pi_0) = E_pi[l(y)]``, ``l = log pi(y) - log pi_0(y)``, and
``grad KL = E_pi[l grad log pi] + E_pi[grad log pi] = E_pi[l grad log pi]`` (the score has mean 0). The penalty
``kl_estimate`` returns has the value ``mean(l)`` (unbiased for KL; logged as ``kl``) and the gradient
``mean((l_i - b_i) grad log pi(y_i))``, with ``b_i`` the mean of ``l`` over the other samples of the same
prompt (leave-one-out; ``b_i = 0`` with one sample per prompt). ``b_i`` does not depend on ``y_i``, so the
gradient stays unbiased; ``tests/test_lm_online.py`` checks it by enumeration.

Reference log-probs: ``studylib.lm.reference`` (the policy with its LoRA adapters disabled, or a frozen copy
under full fine-tuning). Optimiser: AdamW (weight decay 0), the offline trainer's learning-rate schedule
(``lr_scheduler_type`` after ``warmup_ratio`` of the steps), gradient clipping. Knobs: ``TrainConfig``
(``max_steps`` steps of ``prompts_per_step`` prompts). A run with ``output_dir`` saves a
checkpoint (trainable parameters, optimiser, schedule, step, RNG state, history) every ``checkpoint_every()`` steps and
resumes from the latest one; prompts and sampling seeds depend only on ``(seed, step)``, so a resumed run
repeats the uninterrupted one.

**Device, precision, processes**: the run's ``Runtime`` (``studylib.lm.runtime``, made from ``config.bf16`` when
none is given): the policy, its reference and every batch live on ``runtime.device``; bf16 is its decision.

**Several processes** (``accelerate launch``; the process group is the runtime's). Every process draws the whole
step's samples (the same weights and seeds: the one-process draws), scores its contiguous share of the rows
(rewards, policy and reference log-probs), and gathers the whole step's per-row values (``batching.gather_rows``):
each computes the one-process loss of the whole step, so RLOO's group means, the KL estimate and every metric are
those of one process. The gradients through each process's rows add up to the whole step's
(``batching.sum_gradients``), and every process takes the same optimiser step. Sampling is repeated on every
process; the forward and backward passes are split. The main process writes the checkpoints.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, get_scheduler

from studylib.families import family_of
from studylib.lm.batching import (
    gather_rows,
    model_logps,
    pad_sequences,
    pad_token_id,
    process_group,
    process_share,
    sum_gradients,
)
from studylib.lm.checkpoints import disk_full_guard, latest_complete, numbered
from studylib.lm.config import TrainConfig, record_training_config
from studylib.lm.curves import CurveProbe
from studylib.lm.reference import autocast_context, policy_and_reference
from studylib.lm.runtime import Runtime, make_runtime
from studylib.lm.sampling import sample_completions
from studylib.losses import Loss
from studylib.losses.on_policy import leave_one_out_advantages
from studylib.results import atomic_directory, write_atomic

RewardFn = Callable[[Sequence[Sequence[int]], Sequence[Sequence[int]]], Tensor]


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
        loss_fn: Loss,
        config: TrainConfig,
        *,
        prompt_ids: Sequence[Sequence[int]] | None = None,
        reward_fn: RewardFn | None = None,
        pair_rows: Sequence[dict] | None = None,
        output_dir: str | Path | None = None,
        reference_model: nn.Module | None = None,
        runtime: Runtime | None = None,
        curve: CurveProbe | None = None,
    ) -> None:
        self.curve = curve
        self.runtime = runtime if runtime is not None else make_runtime(config.bf16)
        self.device = self.runtime.device
        config = self.runtime.resolve(config)
        self.config, self.tokenizer, self.loss_fn, self.reward_fn = config, tokenizer, loss_fn, reward_fn
        self.pair_rows = list(pair_rows) if pair_rows else None
        self.prompt_ids = [list(p) for p in prompt_ids] if prompt_ids else None
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.rank, self.processes = process_group()
        self.family = family_of(loss_fn)
        self._check_inputs()
        if config.training_args:
            warnings.warn(
                f"training_args {sorted(config.training_args)} configure transformers' Trainer (the offline "
                "trainer); the on-policy trainer does not read them",
                stacklevel=2,
            )
        self.pad_id = pad_token_id(tokenizer)
        self.policy, self.reference = policy_and_reference(
            model, config, loss_fn.needs_reference, reference_model, self.device
        )
        self.policy.train()
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=0.0)
        # the offline trainer's schedule (transformers' own): lr_scheduler_type with ceil(warmup_ratio * steps) warm-up
        self.scheduler = get_scheduler(
            config.lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=math.ceil(config.warmup_ratio * config.max_steps),
            num_training_steps=config.max_steps,
        )
        self.step, self.history = 0, []

    def _check_inputs(self) -> None:
        cfg, loss_fn, name = self.config, self.loss_fn, self.loss_fn.name
        if min(cfg.max_steps, cfg.prompts_per_step, cfg.samples_per_prompt, cfg.max_new_tokens) < 1:
            raise ValueError("max_steps, prompts_per_step, samples_per_prompt and max_new_tokens must be >= 1")
        family = self.family
        if not (family.samples_prompts or family.uses_pairs):
            raise ValueError(f"{name} trains on labelled rows: use studylib.lm.trainer")
        if cfg.prompts_per_step < self.processes:
            raise ValueError(
                f"prompts_per_step ({cfg.prompts_per_step}) must be >= the number of processes ({self.processes})"
            )
        if family.samples_prompts and cfg.samples_per_prompt < family.min_samples_per_prompt:
            raise ValueError(
                f"{name} needs samples_per_prompt >= {family.min_samples_per_prompt} (leave-one-out), "
                f"got {cfg.samples_per_prompt}"
            )
        if self.pair_rows is not None:
            if not family.uses_pairs:
                raise ValueError(f"{name} samples its own completions: pass prompt_ids, not pair_rows")
            family.check_rows(self.pair_rows, loss_fn)
            return
        if not loss_fn.needs_reward_model:
            raise ValueError(f"{name} trains on data-set pairs: pass pair_rows")
        if not self.prompt_ids:
            raise ValueError(f"{name} samples from the policy: pass prompt_ids")
        if self.reward_fn is None:
            raise ValueError(f"{name} needs reward_fn(prompt_ids, completion_ids) -> Tensor")

    # --- pieces of a step, for the family (``Family.sampled_inputs``, ``Family.pair_inputs``) ------------------------
    kl_estimate = staticmethod(kl_estimate)

    def sample(self, prompts: list[list[int]], seed: int) -> list[list[int]]:
        """Completions of ``prompts`` sampled from the current policy (one seed for the whole step)."""
        cfg = self.config
        return sample_completions(
            self.policy,
            self.tokenizer,
            prompts,
            max_new_tokens=cfg.max_new_tokens,
            seed=seed,
            batch_size=cfg.generation_batch_size,
            device=self.device,
        )

    def logps(self, prompts: list[list[int]], completions: list[list[int]]) -> tuple[Tensor, Tensor | None]:
        """Policy log-probs (with gradients) and reference log-probs (without; None for a reference-free loss)."""
        batch = {k: v.to(self.device) for k, v in pad_sequences(prompts, completions, self.pad_id).items()}
        return model_logps(self.policy, batch), None if self.reference is None else self.reference.logps(batch)

    def rewards(self, prompts: list[list[int]], completions: list[list[int]]) -> Tensor:
        """``reward_fn``'s rewards, one per completion."""
        rewards = torch.as_tensor(self.reward_fn(prompts, completions), dtype=torch.float32).flatten()
        if rewards.numel() != len(completions):
            raise ValueError(f"reward_fn returned {rewards.numel()} rewards for {len(completions)} completions")
        return rewards

    def step_prompts(self, k: int) -> list[list[int]]:
        """The step's prompts (a seeded permutation per epoch), each repeated ``k`` times."""
        order = _batch_order(len(self.prompt_ids), self.config.prompts_per_step, self.step, self.config.seed)
        return [self.prompt_ids[i] for i in order for _ in range(k)]

    def sampled_rows(self, k: int, seed: int) -> tuple[Tensor, Tensor | None, Tensor, list[list[int]]]:
        """The step's prompts, ``k`` samples of each from the current policy, and the whole step's per-sample policy
        log-probs (with gradients), reference log-probs and rewards, each process scoring its share then gathering
        (``batching.gather_rows``); and the samples."""
        prompts = self.step_prompts(k)
        completions = self.sample(prompts, seed)
        mine = process_share(len(prompts))
        rewards = self.rewards(prompts[mine], completions[mine])
        policy, reference = self.logps(prompts[mine], completions[mine])
        policy, reference, rewards = gather_rows(policy, reference, rewards.to(self.device))
        return policy, reference, rewards, completions

    def step_pair_rows(self) -> list[dict]:
        """The step's data-set pairs (a seeded permutation per epoch)."""
        cfg = self.config
        return [self.pair_rows[i] for i in _batch_order(len(self.pair_rows), cfg.prompts_per_step, self.step, cfg.seed)]

    def _step_loss(self, seed: int) -> tuple[Tensor, dict[str, Tensor], list[list[int]]]:
        """Loss, metrics and sampled completions of step ``self.step`` (0-based): the family says what a step is."""
        if self.pair_rows is not None:
            inputs, extra, completions = self.family.pair_inputs(self, seed)
        else:
            inputs, extra, completions = self.family.sampled_inputs(self, seed)
        loss, metrics = self.loss_fn(**inputs)
        return loss, metrics | extra, completions

    # --- the loop -----------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """One optimiser step; returns (and records) its log entry."""
        start = time.perf_counter()
        seed = self.config.seed * 1_000_003 + self.step
        try:
            with autocast_context(self.policy, self.config, self.device):
                loss, metrics, completions = self._step_loss(seed)
        except (ValueError, RuntimeError) as err:  # divergence if the weights say so, never read from the message
            bad = [name for name, p in self.policy.named_parameters() if p.requires_grad and not p.isfinite().all()]
            if not bad:
                raise
            raise FloatingPointError(
                f"on-policy training diverged at step {self.step + 1}: {len(bad)} trained weight tensor(s) are not "
                f"finite (first: {bad[0]}), so the policy's log-probs and samples are not ({type(err).__name__}: {err})"
            ) from err
        self._stop_if_not_finite("the loss", loss)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sum_gradients(self.params)  # several processes: each gradient flows through that process's rows only
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self._stop_if_not_finite("the gradient norm", grad_norm)  # before the step: the weights stay good
        learning_rate = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        entry = {"step": self.step, "loss": loss.item(), "grad_norm": grad_norm.item()}
        entry["learning_rate"] = learning_rate
        entry |= {name: float(value) for name, value in metrics.items()}
        if completions:
            entry["completions/mean_length"] = sum(map(len, completions)) / len(completions)
        entry["step_seconds"] = time.perf_counter() - start
        self.history.append(entry)
        return entry

    def _stop_if_not_finite(self, what: str, value: Tensor) -> None:
        if not torch.isfinite(value).all():
            kept = f"; the last good checkpoint stays in {self.output_dir}" if self.output_dir else ""
            raise FloatingPointError(
                f"on-policy training diverged at step {self.step + 1}: {what} is {value.item()}{kept}"
            )

    def train(self) -> list[dict]:
        """Resume from the latest checkpoint in ``output_dir`` if any, then train up to ``config.max_steps``."""
        out, steps, every = self.output_dir, self.config.max_steps, self.config.checkpoint_every()
        if out is not None:
            record_training_config(out, self.loss_fn, self.config)
            self.resume(out)
        for _ in tqdm(range(self.step, steps), desc=f"{self.loss_fn.name} (on-policy)", leave=False):
            entry = self.train_step()
            if self.curve is not None and self.rank == 0 and self.curve.due(self.step):
                entry |= self.curve.measure(self.policy, self.step)  # before the save: a resumed run keeps it
            if out is not None and self.rank == 0 and (self.step % every == 0 or self.step == steps):
                self.save(out)
        return self.history

    def save(self, out: Path, keep: int = 2) -> Path:
        """Write ``checkpoint-<step>/state.pt`` atomically, and ``history.jsonl``; keep the last ``keep``."""
        trainable = {n: p.detach().cpu() for n, p in self.policy.named_parameters() if p.requires_grad}
        state = {
            "step": self.step,
            "trainable": trainable,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "history": json.dumps(self.history),
            "loss_state": self.loss_fn.state_dict(),  # BCO's running mean; {} for a loss without state
        }
        target = out / f"checkpoint-{self.step}"
        with disk_full_guard(out), atomic_directory(target) as tmp:
            torch.save(state, tmp / "state.pt")
        write_atomic(out / "history.jsonl", "".join(json.dumps(e) + "\n" for e in self.history))
        for old in numbered(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return target

    def resume(self, out: Path) -> bool:
        """Load the latest complete ``checkpoint-<step>`` in ``out`` (one whose state reads back; a later unreadable
        one is set aside: ``checkpoints.latest_complete``); False if there is none."""
        states: dict[Path, dict] = {}

        def readable(folder: Path) -> bool:
            try:
                states[folder] = torch.load(folder / "state.pt", map_location=self.device, weights_only=True)
            except Exception:  # noqa: BLE001 (truncated or corrupt: torch raises IndexError, EOFError, ...; all unreadable)
                return False
            return True

        last = latest_complete(out, readable)
        if last is None:
            return False
        state = states[last]
        named = dict(self.policy.named_parameters())
        with torch.no_grad():
            for name, value in state["trainable"].items():
                named[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"].cpu())
        self.loss_fn.load_state_dict(state["loss_state"])
        self.step, self.history = state["step"], json.loads(state["history"])
        return True


def train_online(
    model: PreTrainedModel, tokenizer, loss_fn: Loss, config: TrainConfig, **options: Any
) -> tuple[PreTrainedModel, list[dict]]:
    """Train ``model`` on-policy with ``loss_fn``; returns the policy (PEFT-wrapped under LoRA) and its history.

    ``options``, as ``OnlineTrainer`` takes them: ``prompt_ids``: chat-templated prompt tokens
    (``studylib.lm.data.encode_prompt``), for losses that sample groups or pairs. ``reward_fn(prompt_ids,
    completion_ids) -> Tensor``: one reward per row (e.g. ``RewardModel.score``). ``pair_rows``: data-set pairs for
    ``pmle`` and offline ``distill``. ``output_dir``: checkpoints and ``history.jsonl`` (resumed from if present).
    ``reference_model``: the frozen reference under full fine-tuning (a copy of ``model`` if None). ``runtime``: the
    run's device, processes and precision (made from ``config.bf16`` if None). ``curve``: a
    ``studylib.lm.curves.CurveProbe`` measured every ``curve.every`` steps into that step's entry, or None.
    Each history entry has ``step``,
    ``loss``, ``grad_norm``, ``learning_rate``, the loss's metrics (TRL names; ``kl`` is the sample estimate of
    ``KL(pi || pi_0)``), ``completions/mean_length`` and ``step_seconds``.
    """
    trainer = OnlineTrainer(model, tokenizer, loss_fn, config, **options)
    history = trainer.train()
    return trainer.policy, history
