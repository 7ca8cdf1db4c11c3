"""One side of ``tests/test_lm_distributed.py``: tiny LoRA runs, written to a folder, in one process or several.

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 tests/distributed_worker.py OUT
    python tests/distributed_worker.py OUT      # 1 process, the same global batches

(On a machine without GPUs, ``--multi_gpu`` starts the processes with torchrun and ``ACCELERATE_USE_CPU`` makes
transformers' ``Trainer`` wrap the model in DDP over gloo; ``--cpu`` alone would start one process.) Each process
writes ``OUT/rank<r>.pt``: for each case, the per-step log (loss, grad_norm, the loss's metrics) and the LoRA
weights before and after training. The cases:

- ``dpo``, ``kto``: the offline trainer with the reference computed on the fly (the policy with its adapters
  disabled, through the distributed wrapper); ``rdro``: reference log-probs precomputed. 3 steps of a global
  micro-batch of 4 rows (4 rows in one process, 2 in each of two) over 8 rows: the third step starts a new epoch.
  ``dpo`` also records the reference's log-probs of every pair after training, asked of the wrapped model, and
  the base model's (no adapters).
- ``reverse_kl``: the on-policy trainer, 3 prompts x 2 samples a step (rows split 3 / 3, so one prompt's group
  is split between the processes), 2 steps. ``pmle``: the same trainer on data-set pairs with a KL term, 3 pairs
  a step (split 1 / 2) and 2 policy samples of each pair's prompt.
- ``bco`` (running mean), ``dpo-accumulate`` (gradient accumulation 2: 1 row a micro-batch in each of two
  processes, 2 in one), ``kto-full`` (full fine-tuning: every weight trained, a separate frozen reference).
- ``run``: a whole run (``run_experiment``, offline data, a reward model, precomputed reference log-probs), counting
  how often this process built each cache.
- ``uneven``: losses called directly on per-row values split unevenly between the processes (one process holds
  none, 2 or 3 of 6 rows): the loss and the gradient of every row, for KTO (``z0``), BCO (running mean), RDRO
  with the batch's own class fraction and reverse KL (RLOO groups across the split).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from accelerate import PartialState

from studylib.lm.batching import gather_rows, model_logps, pad_sequences, process_group
from studylib.lm.config import RunConfig, TrainConfig
from studylib.lm.online import train_online
from studylib.lm.reference import Reference, policy_and_reference
from studylib.lm.tiny import tiny_model, tiny_tokenizer
from studylib.lm.trainer import preferred_fraction, train
from studylib.losses import build_loss, get_loss

GLOBAL_BATCH = 4
PROMPTS = ["Say hi.", "Name a colour.", "Count to three.", "What is tea?"]
PROMPTS += ["Give a fruit.", "Describe rain.", "Name a pet.", "Say bye."]
GOOD = ["Hi there, friend!", "Blue, like the sky.", "One, two, three.", "A warm drink."]
GOOD += ["An apple.", "Soft water.", "A cat.", "Goodbye, take care."]
BAD = ["No.", "I hate colours.", "Never.", "Awful stuff.", "Bad.", "Terrible weather.", "Ugh.", "Go away."]


def encode(tokenizer, text: str, completion: bool = False) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids + [tokenizer.eos_token_id] if completion else ids


def paired_rows(tokenizer) -> list[dict]:
    return [
        {
            "prompt_ids": encode(tokenizer, p),
            "chosen_ids": encode(tokenizer, g, True),
            "rejected_ids": encode(tokenizer, b, True),
        }
        for p, g, b in zip(PROMPTS, GOOD, BAD, strict=True)
    ]


def unpaired_rows(tokenizer) -> list[dict]:
    """8 rows, 5 preferred and 3 not (RDRO's per-class weights are not 1)."""
    texts = [(p, g, True) for p, g in zip(PROMPTS[:5], GOOD[:5], strict=True)]
    texts += [(p, b, False) for p, b in zip(PROMPTS[5:], BAD[5:], strict=True)]
    return [
        {"prompt_ids": encode(tokenizer, p), "completion_ids": encode(tokenizer, c, True), "label": label}
        for p, c, label in texts
    ]


def low_byte_reward(prompts, completions) -> torch.Tensor:
    """Fraction of completion tokens in the lower half of the vocabulary (a reward that varies between samples)."""
    return torch.tensor([sum(t < 130 for t in c) / len(c) for c in completions], dtype=torch.float32)


def lora_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def initial_weights(tokenizer, config: TrainConfig) -> dict[str, torch.Tensor]:
    """The LoRA weights a run of ``config`` starts from (drawn under ``config.seed``, as the trainers draw them)."""
    policy, _ = policy_and_reference(tiny_model(tokenizer, seed=0), config, needs_reference=False)
    return lora_weights(policy)


def offline_case(tokenizer, loss: str, out: Path, processes: int, name: str | None = None, **knobs) -> dict:
    rows = paired_rows(tokenizer) if loss == "dpo" else unpaired_rows(tokenizer)
    fraction = None if loss == "dpo" else preferred_fraction(rows)
    loss_fn = build_loss(loss, {"alpha": "auto"} if loss == "rdro" else {}, fraction)
    accumulation = knobs.pop("gradient_accumulation_steps", 1)
    config = TrainConfig(
        max_steps=3,
        batch_size=GLOBAL_BATCH // processes // accumulation,
        gradient_accumulation_steps=accumulation,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        warmup_ratio=0.0,
        use_lora=knobs.pop("use_lora", True),
        lora_r=4,
        save_steps=100,
        training_args={"disable_tqdm": True},
        **knobs,
    )
    trainer = train(tiny_model(tokenizer, seed=0), tokenizer, rows, loss_fn, config, out / (name or loss))
    steps = [
        {k: v for k, v in entry.items() if isinstance(v, float | int)}
        for entry in trainer.state.log_history
        if "loss" in entry and "train_runtime" not in entry
    ]
    result = {"steps": steps, "weights": lora_weights(trainer.model), "initial": initial_weights(tokenizer, config)}
    if loss == "dpo":  # the reference of the trained policy, asked of the wrapped model, and the base model
        prompts = [r["prompt_ids"] for r in rows]
        batch = pad_sequences(prompts + prompts, [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows], 0)
        result["reference_logps"] = Reference(trainer.model_wrapped).logps(batch)
        result["wrapper"] = type(trainer.model_wrapped).__name__
        with torch.no_grad():
            result["base_logps"] = model_logps(tiny_model(tokenizer, seed=0), batch)
            result["policy_logps"] = model_logps(trainer.model, batch)
    return result


def online_case(tokenizer, loss: str, out: Path) -> dict:
    config = TrainConfig(
        max_steps=2,
        prompts_per_step=3,
        samples_per_prompt=2,
        max_new_tokens=4,
        learning_rate=1e-2,
        use_lora=True,
        lora_r=4,
        save_steps=100,
    )
    if loss == "reverse_kl":
        data = {"prompt_ids": [encode(tokenizer, p) for p in PROMPTS], "reward_fn": low_byte_reward}
        loss_fn = get_loss("reverse_kl")
    else:
        data = {"pair_rows": paired_rows(tokenizer)}
        loss_fn = get_loss("pmle", gamma=0.5, beta=0.1)
    policy, history = train_online(
        tiny_model(tokenizer, seed=0), tokenizer, loss_fn, config, output_dir=out / loss, **data
    )
    steps = [{k: v for k, v in e.items() if k != "step_seconds"} for e in history]
    return {"steps": steps, "weights": lora_weights(policy), "initial": initial_weights(tokenizer, config)}


def uneven_case() -> dict:
    """Per-row values of 6 rows, this process's share of them (rank 0 holds ``first`` rows), through each loss."""
    rank, processes = process_group()
    generator = torch.Generator().manual_seed(0)
    policy = torch.randn(6, generator=generator, dtype=torch.float64)
    reference = torch.randn(6, generator=generator, dtype=torch.float64)
    kl_policy = torch.randn(6, generator=generator, dtype=torch.float64) + 1.0  # z0 > 0
    labels = torch.tensor([True, False, True, True, False, True])
    rewards = torch.rand(6, generator=generator, dtype=torch.float64)
    losses = {
        "kto": lambda p, r, lab, kp, rew: get_loss("kto")(p, r, lab, policy_kl_logps=kp, reference_kl_logps=r),
        "bco": lambda p, r, lab, kp, rew: get_loss("bco")(p, r, lab),
        "rdro": lambda p, r, lab, kp, rew: get_loss("rdro", alpha=0.4)(p, r, lab),
        "reverse_kl": lambda p, r, lab, kp, rew: get_loss("reverse_kl")(p, r, rew, samples_per_prompt=2),
    }
    result = {}
    for first in (0, 2, 3):  # rows of rank 0: none, 2 of 6, 3 of 6 (a group of 2 split between the processes)
        share = slice(0, 6) if processes == 1 else (slice(0, first) if rank == 0 else slice(first, 6))
        for name, loss_fn in losses.items():
            mine = policy[share].clone().requires_grad_(True)
            gathered = gather_rows(mine, reference[share], labels[share], kl_policy[share], rewards[share])
            loss, metrics = loss_fn(*gathered)
            loss.backward()
            (grads,) = gather_rows(mine.grad)
            result[f"{name}/{first}"] = {
                "loss": loss.item(),
                "grads": grads,
                "metrics": {k: float(v) for k, v in metrics.items()},
            }
    return result


BUILDS = {"offline data": 0, "reward model": 0, "reference log-probs": 0}
"""How often this process built each cache (counted by ``count_builds``)."""


def count_builds() -> None:
    """Count the calls that build a cache: sampling the offline data, fitting a reward model, scoring the
    reference log-probs of the offline trainer (a cache hit calls none of them)."""
    import studylib.lm.reward as reward
    import studylib.lm.synth as synth
    import studylib.lm.trainer as trainer

    def counted(module, name: str, what: str) -> None:
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            BUILDS[what] += 1
            return original(*args, **kwargs)

        setattr(module, name, wrapper)

    counted(synth, "sample_ids_and_texts", "offline data")
    counted(reward, "train_reward_model", "reward model")
    counted(trainer, "score_sequences", "reference log-probs")


def run_case(out: Path) -> dict:
    """A whole run (``run_experiment``: offline data, a reward model) and the caches this process built for it."""
    from studylib.lm.experiment import run_experiment

    knobs = {"model": "tiny", "dataset": "offline", "n_prompts": 8, "completions_per_prompt": 2}
    knobs |= {"data_max_new_tokens": 4, "loss": "distill", "loss_kwargs": {"beta": 0.0}, "max_steps": 2}
    knobs |= {"batch_size": 2, "eval_prompts": 2, "eval_max_new_tokens": 4}
    knobs |= {"results_dir": str(out / "lm"), "training_args": {"disable_tqdm": True}}
    before = dict(BUILDS)
    record = run_experiment(RunConfig.from_flat(knobs))
    return {"builds": {k: BUILDS[k] - before[k] for k in BUILDS}, "runtime": record.get("runtime")}


def main(out: Path) -> None:
    os.environ["STUDYLIB_CACHE"] = str(out / "cache")  # shared by the processes of one launch
    PartialState(cpu=True)  # the process group (gloo) under accelerate launch
    rank, processes = process_group()
    torch.set_num_threads(1)
    tokenizer = tiny_tokenizer()
    results = {"processes": processes}
    results["dpo"] = offline_case(tokenizer, "dpo", out, processes, precompute_reference=False)
    results["kto"] = offline_case(tokenizer, "kto", out, processes, precompute_reference=False)
    count_builds()
    results["rdro"] = offline_case(tokenizer, "rdro", out, processes)
    results["rdro"]["builds"] = dict(BUILDS)  # the reference log-probs, precomputed
    results["bco"] = offline_case(tokenizer, "bco", out, processes)  # its running mean over the whole batch
    results["dpo-accumulate"] = offline_case(tokenizer, "dpo", out, processes, "dpo-ga", gradient_accumulation_steps=2)
    results["kto-full"] = offline_case(tokenizer, "kto", out, processes, "kto-full", use_lora=False)
    results["reverse_kl"] = online_case(tokenizer, "reverse_kl", out)
    results["pmle"] = online_case(tokenizer, "pmle", out)
    results["uneven"] = uneven_case()
    results["run"] = run_case(out)
    torch.save(results, out / f"rank{rank}.pt")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(Path(sys.argv[1]))
