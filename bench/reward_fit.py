"""The cpu profile's reward model on the 135M model, fit on every pair of each prompt's completions: its held-out
accuracy with its interval over held-out prompts, and the fit's seconds. Writes ``results/bench/reward_fit.json``
(with its stamp), which notebook 05 reads when no run of its profile fits a reward model (the cpu profile leaves
distillation and reverse KL out while this accuracy is at chance).

    python bench/reward_fit.py            # cached after the first fit: delete the cache entry to time a fit
"""

import json
import time

from studylib.lm.annotators import AnnotatorPool
from studylib.lm.config import RunConfig
from studylib.lm.models import load_policy
from studylib.lm.preferences import load_preferences, tokenized_reward_pairs
from studylib.lm.reward import reward_model_for
from studylib.lm.runtime import describe_precision, make_runtime
from studylib.results import save_json
from studylib.study import machine

PARAMS = {
    "loss": "distill",
    "loss_kwargs": {"gamma": 0.1, "beta": 0.05},
    "batch_size": 16,
    "learning_rate": 0.0003,
    "bf16": "auto",
    "max_steps": 40,
}
# The cpu profile's data (studies/cpu.yaml); of these knobs only batch_size enters the reward model's fit
config = RunConfig.from_flat(PARAMS)
runtime = make_runtime(config.train.bf16)
model, tokenizer = load_policy(config, runtime)
data = load_preferences(config, model, tokenizer, AnnotatorPool(seed=0), runtime)
rows, counts = tokenized_reward_pairs(config, data, tokenizer)
start = time.perf_counter()
_, info = reward_model_for(config, model, tokenizer, rows, runtime)
record = {**info, "all_pairs": len(rows), "seconds": round(time.perf_counter() - start, 1),
          "precision": describe_precision(runtime), "machine": machine()}  # fmt: skip
save_json(record, "results/bench/reward_fit.json", {"script": "bench/reward_fit.py", "params": PARAMS, "seed": 0})
print(json.dumps(record, indent=1))
