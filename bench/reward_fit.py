"""The cpu profile's reward model on the 135M model, fit on every pair of each prompt's completions: its held-out
accuracy with its interval, and the fit's seconds (python bench/reward_fit.py; cached after the first fit)."""

import json
import time

from studylib.lm.annotators import AnnotatorPool
from studylib.lm.config import RunConfig
from studylib.lm.models import load_policy
from studylib.lm.preferences import load_preferences, tokenized_reward_pairs
from studylib.lm.reward import reward_model_for
from studylib.lm.runtime import make_runtime

config = RunConfig.from_flat(
    {
        "loss": "distill",
        "loss_kwargs": {"gamma": 0.1, "beta": 0.05},
        "batch_size": 16,
        "learning_rate": 0.001,
        "bf16": "auto",
        "max_steps": 12,
    }
)
runtime = make_runtime(config.train.bf16)
model, tokenizer = load_policy(config, runtime)
data = load_preferences(config, model, tokenizer, AnnotatorPool(seed=0), runtime)
rows, counts = tokenized_reward_pairs(config, data, tokenizer)
start = time.perf_counter()
_, info = reward_model_for(config, model, tokenizer, rows, runtime)
print(json.dumps({**info, "all_pairs": len(rows), "seconds": round(time.perf_counter() - start, 1)}, indent=1))
