"""Fixtures shared by test files: a tiny end-to-end run config (tiny Llama, the UltraFeedback fixture)."""

from __future__ import annotations

import pytest

from studylib.lm.config import RunConfig
from studylib.study import ROOT

TINY = {"model": "tiny", "dataset": "ufb", "dataset_path": "tests/fixtures/ufb_small", "loss": "rdro"}
TINY |= {"max_steps": 2, "batch_size": 2, "eval_prompts": 2, "eval_max_new_tokens": 4}


@pytest.fixture
def tiny_run(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDYLIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(ROOT)
    return lambda **knobs: RunConfig.from_flat(TINY | {"results_dir": str(tmp_path / "lm")} | knobs)


@pytest.fixture
def tiny_knobs() -> dict:
    """The flat knobs of a tiny end-to-end run (results_dir not set)."""
    return dict(TINY)
