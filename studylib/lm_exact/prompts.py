"""The answer-set prompts: templated questions whose answer is one of K candidate words of the prompt's category.

Each prompt asks for a person's favourite item of a category ("Anna's favourite colour is"); the answer is the next
token. ``data/lm_exact/prompts.jsonl`` holds the prompts (id, category, name, template, prompt, split) and
``data/lm_exact/candidates.json`` the K candidate words of each category, written with a leading space as the
tokenizer sees them after the prompt. ``python -m studylib.lm_exact.prompts`` rewrites the prompt file from the
templates below (a test checks the committed file is exactly that). The held-out split is a seeded half of each
category's prompts: held-out prompts share categories (so preferences) with training prompts, never a prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from studylib.results import resolve, write_atomic

DATA_DIR = "data/lm_exact"
PROMPTS_FILE = f"{DATA_DIR}/prompts.jsonl"
CANDIDATES_FILE = f"{DATA_DIR}/candidates.json"

NOUNS = {
    "colour": "colour",
    "animal": "animal",
    "fruit": "fruit",
    "drink": "drink",
    "sport": "sport",
    "country": "country",
}
TEMPLATES = (
    "{name}'s favourite {noun} is",
    "If {name} had to choose one {noun}, it would be",
    "The {noun} that {name} likes best is",
    "{name} said that the best {noun} is",
    "When {name} thinks of a {noun}, the first one that comes to mind is",
)
NAMES = ("Anna", "Ben", "Carlos", "Diana", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jack", "Kofi", "Lena")
HELDOUT_FRACTION = 0.5


def build_prompts(seed: int = 0) -> pd.DataFrame:
    """Every (category, template, name) prompt, with a seeded held-out half (``HELDOUT_FRACTION``) per category."""
    rng = np.random.default_rng(seed)
    rows = []
    for category, noun in NOUNS.items():
        cells = [(t, name) for t in range(len(TEMPLATES)) for name in NAMES]
        heldout = set(rng.choice(len(cells), size=round(HELDOUT_FRACTION * len(cells)), replace=False).tolist())
        for i, (t, name) in enumerate(cells):
            rows.append(
                {
                    "id": f"{category}-{t}-{name}",
                    "category": category,
                    "name": name,
                    "template": t,
                    "prompt": TEMPLATES[t].format(name=name, noun=noun),
                    "split": "heldout" if i in heldout else "train",
                }
            )
    return pd.DataFrame(rows)


def load_prompts(path: str | Path = PROMPTS_FILE) -> pd.DataFrame:
    """The committed prompts (columns id, category, name, template, prompt, split)."""
    frame = pd.read_json(resolve(path), lines=True)
    bad = set(frame["split"]) - {"train", "heldout"}
    if bad:
        raise ValueError(f"{path}: split must be 'train' or 'heldout', got {sorted(bad)}")
    return frame


def load_candidates(path: str | Path = CANDIDATES_FILE) -> dict[str, list[str]]:
    """Candidate words per category, each category with the same number K of distinct words."""
    candidates = json.loads(resolve(path).read_text())
    sizes = {len(words) for words in candidates.values()}
    if len(sizes) != 1 or any(len(set(w)) != len(w) for w in candidates.values()):
        raise ValueError(f"{path}: every category needs the same number of distinct candidate words")
    return candidates


def write_prompts(path: str | Path = PROMPTS_FILE, seed: int = 0) -> Path:
    """Write ``build_prompts(seed)`` as JSON lines."""
    lines = [json.dumps(row) for row in build_prompts(seed).to_dict("records")]
    return write_atomic(path, "\n".join(lines) + "\n")


if __name__ == "__main__":
    print(write_prompts())
