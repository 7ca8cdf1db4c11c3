"""The paper path on a CPU: the paper profile's architectures (Qwen2, Llama) built tiny from their configs.

One step of DPO, KTO, RDRO (offline trainer) and reverse KL (on-policy trainer) in bf16, with full fine-tuning
(a separate frozen reference) and with LoRA, then sampling from the trained policy; and notebook 04 through
papermill with the paper profile's own knobs on a tiny Qwen2 saved as a local checkpoint. What this does not
check (a GPU, hub weights, several processes) is listed in docs/TRAINING.md.
"""

from __future__ import annotations

import json
import math

import huggingface_hub.constants
import pandas as pd
import papermill
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from studylib.lm.config import TrainConfig
from studylib.lm.data import encode_prompt
from studylib.lm.models import load_model
from studylib.lm.online import train_online
from studylib.lm.reference import frozen_copy
from studylib.lm.sampling import sample_completions
from studylib.lm.tiny import TINY_CONFIG, tiny_tokenizer
from studylib.lm.trainer import preferred_fraction, train
from studylib.losses import build_loss, get_loss
from studylib.study import NOTEBOOKS, ROOT, load_study

# the real classes; tied embeddings as Qwen2.5-1.5B-Instruct, untied as Llama-3.1-8B-Instruct
ARCHITECTURES = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": True}),
    "llama": (LlamaConfig, LlamaForCausalLM, {"tie_word_embeddings": False}),
}
PROMPTS = ["Say hi.", "Name a colour.", "Count to three.", "What is tea?"]
GOOD = ["Hi there, friend!", "Blue, like the sky.", "One, two, three.", "A warm drink."]
BAD = ["No.", "I hate colours.", "Never.", "Awful stuff."]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def paper_shaped(arch: str, tokenizer, seed: int = 0):
    """A randomly initialised tiny ``Qwen2ForCausalLM`` or ``LlamaForCausalLM`` (2 layers, hidden size 64), float32."""
    config_class, model_class, own = ARCHITECTURES[arch]
    params = {**TINY_CONFIG, "num_hidden_layers": 2, **own}
    rope_theta = params.pop("rope_theta")
    config = config_class(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        **params,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def encode(tokenizer, text: str, eos: bool = False) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) + ([tokenizer.eos_token_id] if eos else [])


def prompt_ids(tokenizer) -> list[list[int]]:
    """Chat-templated prompts, as a run encodes them."""
    return [encode_prompt(tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]


def rows_for(loss: str, tokenizer) -> list[dict]:
    """4 pairs for DPO; their 8 halves as labelled rows for KTO and RDRO."""
    prompts = prompt_ids(tokenizer)
    if loss == "dpo":
        return [
            {"prompt_ids": p, "chosen_ids": encode(tokenizer, g, True), "rejected_ids": encode(tokenizer, b, True)}
            for p, g, b in zip(prompts, GOOD, BAD, strict=True)
        ]
    return [
        {"prompt_ids": p, "completion_ids": encode(tokenizer, text, True), "label": label}
        for p, g, b in zip(prompts, GOOD, BAD, strict=True)
        for text, label in ((g, True), (b, False))
    ]


def bf16_config(use_lora: bool, **overrides) -> TrainConfig:
    """One step in bf16 (4 rows offline; 2 prompts x 2 samples of 4 tokens on-policy)."""
    knobs = {"bf16": True, "use_lora": use_lora, "lora_r": 4, "max_steps": 1, "batch_size": 4, "learning_rate": 1e-2}
    knobs |= {"warmup_ratio": 0.0, "lr_scheduler_type": "constant", "save_steps": 100}
    knobs |= {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 4}
    return TrainConfig(**(knobs | overrides))


def check_trained(policy, initial: dict[str, torch.Tensor], use_lora: bool) -> None:
    """Trained weights are float32 and moved; frozen ones (LoRA's base) bf16; full fine-tuning trains every weight."""
    trained = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    assert trained and {p.dtype for p in trained.values()} == {torch.float32}
    if use_lora:
        assert all("lora_" in n for n in trained)
        assert {p.dtype for p in policy.parameters() if not p.requires_grad} == {torch.bfloat16}
        lora_b = [p for n, p in trained.items() if "lora_B" in n]  # B starts at zero; A gets no gradient at step 1
        assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
    else:
        assert set(trained) == set(initial)
        unchanged = [n for n, p in trained.items() if torch.equal(p.detach(), initial[n])]
        assert not unchanged, f"not trained: {unchanged}"


def check_reference_is_initial(reference, policy, initial: dict[str, torch.Tensor]) -> None:
    """Full fine-tuning: the reference is a separate, frozen float32 copy of the starting model (the policy's dtype,
    so T = 0 at the start), untouched by training."""
    assert reference is not policy
    named = dict(reference.named_parameters())
    assert set(named) == set(initial)
    assert not any(p.requires_grad for p in named.values())
    moved = [n for n, p in named.items() if not torch.equal(p, initial[n].float())]
    assert not moved, f"reference moved: {moved}"


def check_generates(policy, tokenizer) -> None:
    """The trained policy samples (as evaluation does, outside autocast) and its samples decode."""
    completions = sample_completions(policy, tokenizer, prompt_ids(tokenizer)[:2], max_new_tokens=5, seed=3)
    assert len(completions) == 2 and all(1 <= len(c) <= 5 for c in completions)
    assert all(0 <= t < policy.config.vocab_size for c in completions for t in c)
    assert all(isinstance(tokenizer.decode(c), str) for c in completions)


# each loss with full fine-tuning and with LoRA, each architecture both ways (bf16 LoRA steps take seconds on a CPU)
OFFLINE_CASES = [
    ("dpo", "qwen2", False), ("dpo", "llama", True),
    ("kto", "llama", False), ("kto", "qwen2", True),
    ("rdro", "qwen2", False), ("rdro", "llama", True),
]  # fmt: skip


def case_id(case: tuple) -> str:
    return "-".join(["lora" if v is True else "full" if v is False else str(v) for v in case])


@pytest.mark.parametrize(("loss", "arch", "use_lora"), OFFLINE_CASES, ids=list(map(case_id, OFFLINE_CASES)))
def test_one_offline_step_in_bf16_then_generate(tmp_path, tokenizer, loss, arch, use_lora):
    model = paper_shaped(arch, tokenizer)
    if arch == "qwen2":  # the real architecture: biased q/k/v projections
        assert isinstance(model, Qwen2ForCausalLM) and model.model.layers[0].self_attn.q_proj.bias is not None
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = rows_for(loss, tokenizer)
    loss_fn = build_loss(loss, {}, None if loss == "dpo" else preferred_fraction(rows))
    trainer = train(model, tokenizer, rows, loss_fn, bf16_config(use_lora), tmp_path)
    (logged,) = [e for e in trainer.state.log_history if "loss" in e]
    assert math.isfinite(logged["loss"]) and math.isfinite(logged["grad_norm"])
    check_trained(trainer.model, initial, use_lora)
    if not use_lora:
        check_reference_is_initial(trainer.reference.model, trainer.model, initial)
    check_generates(trainer.model, tokenizer)


def low_byte_reward(prompts, completions) -> torch.Tensor:
    """A stand-in reward model: the fraction of a completion's tokens in the lower half of the vocabulary."""
    return torch.tensor([sum(t < 130 for t in c) / len(c) for c in completions], dtype=torch.float32)


@pytest.mark.parametrize(("arch", "use_lora"), [("qwen2", False), ("llama", True)], ids=["qwen2-full", "llama-lora"])
def test_one_on_policy_step_in_bf16_then_generate(tokenizer, arch, use_lora):
    """Reverse KL (sampling the policy, RLOO, KL to the reference); the separate reference made as a run makes it."""
    model = paper_shaped(arch, tokenizer)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    reference = None if use_lora else frozen_copy(model)  # studylib.lm.experiment.separate_reference
    policy, history = train_online(
        model,
        tokenizer,
        get_loss("reverse_kl", gamma=0.01, beta=0.05),
        bf16_config(use_lora),
        prompt_ids=prompt_ids(tokenizer),
        reward_fn=low_byte_reward,
        reference_model=reference,
    )
    (entry,) = history
    assert all(math.isfinite(entry[k]) for k in ("loss", "grad_norm", "kl", "rewards/mean"))
    assert 1 <= entry["completions/mean_length"] <= 4
    check_trained(policy, initial, use_lora)
    if not use_lora:
        check_reference_is_initial(reference, policy, initial)
    check_generates(policy, tokenizer)


HUB_ID = "studylib-test/tiny-qwen2"


@pytest.fixture
def offline_hub(tmp_path, tokenizer, monkeypatch):
    """A Hugging Face cache holding a tiny Qwen2 saved in bf16 (as Qwen2.5's checkpoints are) under ``HUB_ID``, with
    the hub offline: ``load_model(HUB_ID)`` takes the path it takes for ``Qwen/Qwen2.5-1.5B-Instruct``."""
    repo, revision = tmp_path / "hub" / f"models--{HUB_ID.replace('/', '--')}", "0" * 40
    paper_shaped("qwen2", tokenizer).to(torch.bfloat16).save_pretrained(repo / "snapshots" / revision)
    tokenizer.save_pretrained(repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return HUB_ID


def test_a_hub_id_loads_from_the_offline_cache_in_its_checkpoint_dtype(tokenizer, offline_hub):
    model, loaded = load_model(offline_hub)
    assert isinstance(model, Qwen2ForCausalLM) and model.dtype == torch.bfloat16  # dtype "auto"
    messages = [{"role": "user", "content": "Héllo\tthere"}]
    assert encode_prompt(loaded, messages) == encode_prompt(tokenizer, messages)
    assert (loaded.pad_token_id, loaded.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)


def test_full_fine_tuning_of_a_bf16_hub_checkpoint_trains_float32_weights(tmp_path, tokenizer, offline_hub):
    """A bf16 checkpoint (Qwen2.5, Llama 3.1 load in bf16: dtype "auto") is trained in float32 master weights;
    trained in bf16, one AdamW step at lr 5e-7 moved about 1% of them (the rest of the update rounded away)."""
    model, _ = load_model(offline_hub)
    if model.dtype != torch.bfloat16:
        raise RuntimeError(f"the set-up changed: the checkpoint loaded in {model.dtype}")
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = rows_for("rdro", tokenizer)
    config = bf16_config(False, learning_rate=5e-7)  # the paper profile's learning rate
    trainer = train(model, tokenizer, rows, build_loss("rdro", {}, preferred_fraction(rows)), config, tmp_path)
    trained = dict(trainer.model.named_parameters())
    moved = sum((p.detach() != initial[n]).sum().item() for n, p in trained.items())
    fraction = moved / sum(p.numel() for p in initial.values())
    dtypes = {p.dtype for p in trained.values() if p.requires_grad}
    assert dtypes == {torch.float32}, f"trained in {dtypes}; one step moved {fraction:.1%} of the weights"


def test_paper_profile_notebook_on_a_tiny_qwen2(tmp_path, tokenizer, monkeypatch):
    """Notebook 04 with the paper profile's RDRO run on UF-G: full fine-tuning in bf16 over whole epochs with
    gradient accumulation, the model a tiny Qwen2 saved with ``save_pretrained`` (loaded as a local path), the data
    the UF-G fixture, and only sizes made small."""
    model_dir = tmp_path / "tiny-qwen2"
    paper_shaped("qwen2", tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    _, runs = load_study("paper", results_dir=tmp_path / "results")
    (run,) = [r for r in runs if r.name == "rdro-paper-model=Qwen-Qwen2.5-1.5B-Instruct-method=ufg-rdro"]
    kept = {"use_lora": False, "bf16": True, "max_steps": -1, "learning_rate": 5e-7, "loss_kwargs": {"alpha": 0.39}}
    assert kept.items() <= run.parameters.items()
    small = {"model": str(model_dir), "dataset_path": "tests/fixtures/ufg.jsonl", "batch_size": 2}
    small |= {"gradient_accumulation_steps": 2, "max_length": 128, "max_prompt_length": 64}
    small |= {"eval_prompts": 2, "eval_max_new_tokens": 8}
    monkeypatch.setenv("STUDYLIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    papermill.execute_notebook(
        str(NOTEBOOKS / "04_lm_alignment.ipynb"),
        str(tmp_path / "04.ipynb"),
        parameters=run.parameters | small,
        cwd=str(ROOT),
        progress_bar=False,
        log_output=False,
        kernel_name="python3",
    )
    (run_dir,) = (tmp_path / "results" / "lm").glob("ufg-rdro-alpha=0.39-seed=42-*")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert kept.items() <= metrics["params"].items() and metrics["training"]["trainer"] == "offline"
    assert metrics["steps"] >= 1 and 0 <= metrics["win_rate"] <= 1 and math.isfinite(metrics["kl"])
    assert pd.read_csv(run_dir / "curves.csv")["loss"].map(math.isfinite).all()
    assert isinstance(AutoModelForCausalLM.from_pretrained(run_dir / "model"), Qwen2ForCausalLM)
