"""Modern open models through gpt2.py and bpe.py, against transformers, tokenizers and tiktoken, offline: no
weights can be downloaded here, so every model is a small random one written by transformers' save_pretrained
(sharded with an index, with Llama 3's rope scaling, tied and untied, Qwen2's q/k/v biases), and every
tokenizer is built here in the real files' layouts (Qwen2's tokenizer.json, Llama 3's tiktoken rank file)."""

import json

import pytest
import torch
import transformers

import gpt2
from gpt2 import GPT, GPTConfig

VOCAB = 300
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}


def random_hf(kind, tied=False, seed=0, **kw):
    """A small random LlamaForCausalLM / Qwen2ForCausalLM, every parameter perturbed (HF inits norms to 1 and
    biases to 0, which would hide a norm gain or a bias that is not loaded)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=136, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-3,
                  rope_theta=5000.0, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, **kw)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def max_diff(ours, hf, idx):
    with torch.no_grad():
        return (ours(idx)[0] - hf(idx).logits).abs().max().item()


CASES = {  # name: (kind, tied, extra HF config, save_pretrained's max_shard_size)
    "llama-rope-scaling-sharded": ("llama", False, {"rope_scaling": LLAMA3_SCALING}, "60KB"),
    "llama-tied": ("llama", True, {}, None),
    "qwen2-untied-sharded": ("qwen2", False, {}, "60KB"),
    "qwen2-tied": ("qwen2", True, {}, None),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(tmp_path, case):
    kind, tied, extra, shard = CASES[case]
    hf = random_hf(kind, tied, **extra)
    hf.save_pretrained(tmp_path, max_shard_size=shard or "2GB")
    if shard:
        assert (tmp_path / "model.safetensors.index.json").exists()
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    ours = GPT.from_pretrained(str(tmp_path)).eval()
    cfg = ours.config
    assert (cfg.tie_weights, cfg.qkv_bias, cfg.n_kv_head, cfg.mlp_hidden) == (tied, kind == "qwen2", 2, 136)
    assert (ours.lm_head.weight is ours.transformer.wte.weight) == tied
    # positions past original_max_position_embeddings = 16, where the scaled frequencies matter
    idx = torch.randint(0, VOCAB, (2, 100))
    assert max_diff(ours, hf, idx) < 1e-4  # measured ~2e-6


def test_rope_scaling_is_applied(tmp_path):
    """The llama3 case above passes only if the scaled frequencies are used: without them the logits differ."""
    hf = random_hf("llama", rope_scaling=LLAMA3_SCALING)
    hf.save_pretrained(tmp_path)
    unscaled = GPT.from_pretrained(str(tmp_path), rope_scaling=None).eval()
    assert max_diff(unscaled, hf, torch.randint(0, VOCAB, (1, 100))) > 1e-2


def test_hub_config_layout_and_bf16(tmp_path):
    """config.json as on the hub (rope_theta + rope_scaling, torch_dtype bfloat16, no rope_parameters): same
    model; bf16 weights stay bf16 unless another dtype is asked for."""
    hf = random_hf("llama", rope_scaling=LLAMA3_SCALING)
    hf.to(torch.bfloat16).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.pop("dtype", None)
    config.update(rope_theta=rope.pop("rope_theta"), rope_scaling=rope, torch_dtype="bfloat16")
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = GPT.from_pretrained(str(tmp_path))
    assert ours.lm_head.weight.dtype == torch.bfloat16 and ours.inv_freq.dtype == torch.float32
    assert ours.config.rope_scaling["factor"] == 8.0 and ours.config.rope_base == 5000.0
    ours32 = GPT.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    # (not hf.float(): hf.to(bfloat16) above rounded its rotary frequencies to bf16 for good)
    hf32 = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert ours32.lm_head.weight.dtype == torch.float32
    assert max_diff(ours32, hf32, torch.randint(0, VOCAB, (2, 60))) < 1e-4


@pytest.mark.parametrize("kind,tied,shard", [("llama", False, 50_000), ("qwen2", True, None)])
def test_export_loads_back_in_transformers(tmp_path, kind, tied, shard):
    hf = random_hf(kind, tied, **({"rope_scaling": LLAMA3_SCALING} if kind == "llama" else {}))
    hf.save_pretrained(tmp_path / "hf")
    ours = GPT.from_pretrained(str(tmp_path / "hf")).eval()
    ours.save_pretrained(str(tmp_path / "out"), max_shard_size=shard)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists() == bool(shard)
    assert (len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1) == bool(shard)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == kind and (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == gpt2.HF_ARCHS[kind]
    assert max_diff(ours, back, torch.randint(0, VOCAB, (2, 80))) < 1e-4
    # a model built here (not loaded) exports too: a Llama-shaped GPTConfig
    torch.manual_seed(0)
    fresh = GPT(GPTConfig(block_size=64, vocab_size=VOCAB, n_layer=1, n_head=4, n_kv_head=1, n_embd=32, bias=False,
                          pos_emb="rope", norm="rmsnorm", mlp="swiglu", tie_weights=False)).eval()
    fresh.save_pretrained(str(tmp_path / "fresh"))
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fresh").eval()
    assert max_diff(fresh, back, torch.randint(0, VOCAB, (2, 40))) < 1e-4


def test_clear_errors(tmp_path):
    hf = random_hf("qwen2")
    hf.save_pretrained(tmp_path / "ok")
    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    (tmp_path / "mistral").mkdir()
    (tmp_path / "mistral" / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    with pytest.raises(ValueError, match="architecture 'mistral' is not supported"):
        GPT.from_pretrained(str(tmp_path / "mistral"))
    (tmp_path / "yarn").mkdir()
    (tmp_path / "yarn" / "config.json").write_text(json.dumps(
        {**config, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}))
    with pytest.raises(ValueError, match="rope scaling 'yarn' is not supported"):
        GPT.from_pretrained(str(tmp_path / "yarn"))
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="lack 12 tensors"):
        GPT.from_pretrained(str(tmp_path / "ok"))
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(ValueError, match="has no place"):
        GPT.from_pretrained(str(tmp_path / "ok"))
    with pytest.raises(ValueError, match="plain GPT-2"):  # neither GPT-2 nor Llama / Qwen2
        GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, pos_emb="rope")).save_pretrained(str(tmp_path / "x"))
