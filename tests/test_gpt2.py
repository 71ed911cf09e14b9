"""gpt2.py against references it does not share code with: transformers' GPT-2 (logits both directions, fp32
and bf16 autocast) and Llama (rope + rmsnorm + swiglu + grouped-query attention), torch.nn.RMSNorm, the
defining properties of RoPE, SwiGLU and grouped-query attention written out by hand, the model run through
the plain attention formula vs scaled_dot_product_attention, and the full forward pass (every KV-cache mode
must give the logits a full recomputation gives).

Tests taking `device` run on each device in LLM_SCRATCH_TEST_DEVICES (tests/conftest.py; default cpu)."""

import http.server
import math
import os
import threading

import pytest
import torch
import torch.nn.functional as F
import transformers

import gpt2
from gpt2 import GPT, GPTConfig

SMALL = dict(block_size=32, vocab_size=101, n_layer=2, n_head=4, n_embd=32)


def small(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**SMALL, **kw})).eval()


# -- transformers parity ----------------------------------------------------------------------


def random_hf_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_positions=48, n_embd=64, n_layer=3, n_head=4, vocab_size=211,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # HF zero-initialises biases and unit-initialises norms: randomise everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "safetensors-hub-keys"])
def test_logits_match_transformers(tmp_path, fmt, device):
    hf = random_hf_model()
    if fmt == "safetensors":
        hf.save_pretrained(tmp_path)
    else:
        hf.config.save_pretrained(tmp_path)
        state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
        if fmt == "bin":
            torch.save(state, tmp_path / "pytorch_model.bin")
        else:  # openai-community/gpt2 on the hub stores keys without the "transformer." prefix
            state = {k.removeprefix("transformer."): v for k, v in state.items()}
            gpt2.write_safetensors(str(tmp_path / "model.safetensors"), state)
    ours = GPT.from_pretrained(str(tmp_path)).eval().to(device)
    hf = hf.to(device)
    idx = torch.randint(0, 211, (3, 48), device=device)
    with torch.no_grad():
        ref = hf(idx).logits
        got, _ = ours(idx)
    assert got.shape == ref.shape
    # measured ~1e-6 on CPU; GELU computed exactly instead of with GPT-2's tanh approximation gives ~4e-4
    assert (got - ref).abs().max().item() < 1e-5


def test_bf16_autocast_is_as_accurate_as_transformers(tmp_path, device):
    """Under bf16 autocast both models drift from their fp32 logits; ours may not drift more than 2x
    transformers' (measured on CPU: 0.0125 ours, 0.0129 transformers)."""
    hf = random_hf_model()
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(str(tmp_path)).eval().to(device)
    hf = hf.to(device)
    idx = torch.randint(0, 211, (3, 48), device=device)
    with torch.no_grad():
        ref = hf(idx).logits
        with gpt2.autocast(device, torch.bfloat16):
            hf_bf16 = hf(idx).logits.float()
            ours_bf16 = ours(idx)[0].float()
    hf_err, our_err = (hf_bf16 - ref).abs().max().item(), (ours_bf16 - ref).abs().max().item()
    assert hf_err > 1e-3, "autocast did not take effect: bf16 logits equal fp32 ones"
    assert our_err < 2 * hf_err, (our_err, hf_err)


@pytest.mark.parametrize("kw", [dict(bias=False), dict(bias=False, qkv_bias=True), dict(qkv_bias=False),
                                dict(mlp_hidden=48), dict(tie_weights=False)])
def test_export_loads_in_transformers_with_same_logits(tmp_path, kw):
    """Missing biases are exported as exact zeros (never over a real q, k, v bias); an MLP width of its own is
    GPT-2's n_inner; an untied head is written and read as such."""
    ours = small(vocab_size=211, **kw)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours.save_pretrained(str(tmp_path))
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(0, 211, (2, 32))
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)[0]).abs().max().item() < 1e-5  # measured 3e-7
    back = GPT.from_pretrained(str(tmp_path)).eval()  # and back in again
    with torch.no_grad():
        assert (back(idx)[0] - ours(idx)[0]).abs().max().item() < 1e-5


def test_export_refuses_architectures_gpt2_lacks(tmp_path):
    with pytest.raises(ValueError, match="plain GPT-2"):
        small(pos_emb="rope").save_pretrained(str(tmp_path))


@pytest.mark.parametrize("kw", [dict(n_inner=48), dict(tie_word_embeddings=False)])
def test_hf_gpt2_with_its_own_mlp_width_or_an_untied_head_loads(tmp_path, kw):
    hf = random_hf_model(**kw)
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(0, 211, (2, 32))
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)[0]).abs().max().item() < 1e-5


@pytest.mark.parametrize("kw", [dict(scale_attn_by_inverse_layer_idx=True), dict(scale_attn_weights=False)])
def test_hf_gpt2_with_other_attention_scaling_is_refused(tmp_path, kw):
    random_hf_model(**kw).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="attention scaled otherwise"):
        GPT.from_pretrained(str(tmp_path))


def test_truncated_safetensors_is_an_error(tmp_path):
    hf = random_hf_model()
    hf.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        GPT.from_pretrained(str(tmp_path))


def random_llama(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   rms_norm_eps=1e-5, rope_theta=500.0, tie_word_embeddings=False, **kw)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # unit norm gains would hide a norm that ignores its weight: randomise everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_modern_stack_matches_transformers_llama():
    """rope + rmsnorm + swiglu + grouped-query attention, untied: the Llama architecture, weights mapped by name."""
    hf = random_llama()
    ours = GPT(GPTConfig(block_size=32, vocab_size=101, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, bias=False,
                         pos_emb="rope", rope_base=500.0, norm="rmsnorm", norm_eps=1e-5, mlp="swiglu",
                         tie_weights=False)).eval()
    hs = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    state = {"transformer.wte.weight": hs["embed_tokens.weight"], "transformer.ln_f.weight": hs["norm.weight"],
             "lm_head.weight": hs["lm_head.weight"]}
    for i in range(2):
        h, o = f"layers.{i}.", f"transformer.h.{i}."
        state[o + "ln_1.weight"] = hs[h + "input_layernorm.weight"]
        state[o + "ln_2.weight"] = hs[h + "post_attention_layernorm.weight"]
        state[o + "attn.c_attn.weight"] = torch.cat([hs[h + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        state[o + "attn.c_proj.weight"] = hs[h + "self_attn.o_proj.weight"]
        state[o + "mlp.c_fc.weight"] = torch.cat([hs[h + "mlp.gate_proj.weight"], hs[h + "mlp.up_proj.weight"]])
        state[o + "mlp.c_proj.weight"] = hs[h + "mlp.down_proj.weight"]
    ours.load_state_dict(state)  # strict: every parameter of ours is mapped
    idx = torch.randint(0, 101, (3, 32))
    with torch.no_grad():
        ref = hf(idx).logits
        got, _ = ours(idx)
    assert (got - ref).abs().max().item() < 1e-5


# -- the pieces, each against its definition -------------------------------------------------------


def rotate(x, pos, head_size, base=10000.0):
    """x (..., hs) rotated as a query / key at integer position pos."""
    cos, sin = gpt2.rope_cos_sin(torch.tensor([[pos]]), gpt2.rope_frequencies(head_size, base))
    return gpt2.apply_rope(x.view(1, 1, 1, head_size), cos, sin).view(-1)


def test_rope_scores_depend_on_relative_position_only():
    torch.manual_seed(0)
    hs = 16
    q, k = F.normalize(torch.randn(hs), dim=0), F.normalize(torch.randn(hs), dim=0)
    scores = torch.tensor([[rotate(q, m, hs) @ rotate(k, n, hs) for n in range(8)] for m in range(8)])
    shifted = torch.tensor([[rotate(q, m + 37, hs) @ rotate(k, n + 37, hs) for n in range(8)] for m in range(8)])
    assert torch.allclose(scores, shifted, atol=1e-5)  # both positions shifted: same scores
    assert (scores - scores.T).abs().max() > 0.1  # but they do depend on m - n, with its sign
    for p in (0, 1, 5, 31):
        assert abs(rotate(q, p, hs).norm().item() - 1.0) < 1e-6  # a rotation keeps norms
    assert torch.allclose(rotate(q, 0, hs), q)  # position 0: no rotation
    # one channel pair at frequency 1: (1, 0) at position p is the point (cos p, sin p) of the unit circle
    for p in (1, 2, 3):
        assert torch.allclose(rotate(torch.tensor([1.0, 0.0]), p, 2), torch.tensor([math.cos(p), math.sin(p)]),
                              atol=1e-6)
    assert torch.allclose(gpt2.rope_frequencies(8, 10000.0), torch.tensor([1.0, 0.1, 0.01, 0.001]))


@pytest.mark.parametrize("scale", [1.0, 1e-3])  # at 1e-3, mean(x^2) ~ 1e-6 is below eps: eps matters
def test_rmsnorm_matches_torch_and_formula(scale):
    torch.manual_seed(0)
    norm = gpt2.Norm(GPTConfig(n_embd=64, n_head=4, norm="rmsnorm", bias=False, norm_eps=1e-5))
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
    ref_mod = torch.nn.RMSNorm(64, eps=1e-5)
    with torch.no_grad():
        ref_mod.weight.copy_(norm.weight)
    x = torch.randn(3, 5, 64) * scale
    xd, w = x.double(), norm.weight.detach().double()
    formula = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    got = norm(x)
    assert torch.allclose(got, ref_mod(x), atol=1e-5, rtol=0)
    assert torch.allclose(got.double(), formula, atol=1e-5, rtol=0)
    assert [n for n, _ in norm.named_parameters()] == ["weight"]  # RMSNorm has no bias


def test_swiglu_matches_formula():
    """W2(silu(W1 x) * W3 x), with W1 (gate) and W3 (up) the two halves of c_fc, W2 = c_proj."""
    torch.manual_seed(0)
    mlp = gpt2.MLP(GPTConfig(n_embd=64, n_head=4, mlp="swiglu", bias=False))
    hidden = 192  # 8/3 * 64, rounded up to a multiple of 64
    w1, w3 = mlp.c_fc.weight[:hidden], mlp.c_fc.weight[hidden:]
    w2 = mlp.c_proj.weight
    assert w1.shape == w3.shape == (hidden, 64) and w2.shape == (64, hidden)
    x = torch.randn(2, 7, 64)
    silu = lambda z: z * torch.sigmoid(z)  # noqa: E731
    ref = (silu(x @ w1.T) * (x @ w3.T)) @ w2.T
    assert torch.allclose(mlp(x), ref, atol=1e-5, rtol=0)


def test_grouped_query_attention_matches_repeated_heads_by_hand():
    """4 query heads over 2 k/v heads: query head h reads k/v head h // 2 (heads 0, 1 share k/v head 0)."""
    torch.manual_seed(0)
    cfg = GPTConfig(n_embd=32, n_head=4, n_kv_head=2, bias=False)
    attn = gpt2.CausalSelfAttention(cfg).eval()
    B, T, hs = 2, 6, 8
    x = torch.randn(B, T, 32)
    w = attn.c_attn.weight
    q, k, v = (x @ w[:32].T).view(B, T, 4, hs), (x @ w[32:48].T).view(B, T, 2, hs), (x @ w[48:].T).view(B, T, 2, hs)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    heads = []
    for h in range(4):
        g = h // 2
        s = q[:, :, h] @ k[:, :, g].transpose(1, 2) / math.sqrt(hs)  # (B, T, T)
        heads.append(s.masked_fill(~causal, float("-inf")).softmax(-1) @ v[:, :, g])  # (B, T, hs)
    ref = torch.cat(heads, dim=-1) @ attn.c_proj.weight.T
    with torch.no_grad():
        assert torch.allclose(attn(x), ref, atol=1e-5, rtol=0)


# -- attention ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["learned", "rope-gqa", "rope-window-sinks"])
def test_model_through_plain_math_attention_equals_sdpa(name, device):
    """GPTConfig(attention="math") runs every layer through attention_reference (the formula); its logits
    must be SDPA's: on the training path (mask=None, is_causal), and with left padding + a KV cache (masks)."""
    sdpa = small(**CACHE_VARIANTS[name]).to(device)
    math_model = small(**CACHE_VARIANTS[name], attention="math").to(device)
    math_model.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, 101, (2, 24), device=device)
    mask = torch.ones(2, 24, dtype=torch.long, device=device)
    mask[0, :5] = 0
    with torch.no_grad():
        assert (sdpa(idx)[0] - math_model(idx)[0]).abs().max().item() < 1e-5
        a, b = cached_logits(sdpa, idx, [10, 13], mask), cached_logits(math_model, idx, [10, 13], mask)
    assert (a - b)[mask.bool()].abs().max().item() < 1e-5


def test_mask_semantics():
    pos = torch.arange(8)[None]
    m = gpt2.build_mask(pos, pos, window=3, n_sink=1)[0, 0]
    assert m[7].tolist() == [True, False, False, False, False, True, True, True]  # sink + last 3
    assert m[2].tolist() == [True, True, True, False, False, False, False, False]


# -- KV cache == full forward -----------------------------------------------------------------------

CACHE_VARIANTS = {
    "learned": dict(pos_emb="learned"),
    "sinusoidal": dict(pos_emb="sinusoidal"),
    "rope": dict(pos_emb="rope"),
    "rope-gqa": dict(pos_emb="rope", n_kv_head=2),
    "learned-mqa": dict(pos_emb="learned", n_kv_head=1),
    "llama-like": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False),
    "rope-window-sinks": dict(pos_emb="rope", window=5, n_sink=2),
    "sinusoidal-window": dict(pos_emb="sinusoidal", window=6),
    "rope-gqa-window": dict(pos_emb="rope", window=4, n_sink=1, n_kv_head=1),
}


def cached_logits(model, idx, chunks, mask=None):
    cache = model.new_cache(idx.size(0), max_len=idx.size(1) if model.config.window is None else None)
    out, start = [], 0
    for end in chunks + [idx.size(1)]:
        if end > start:
            m = mask[:, start:end] if mask is not None else None
            out.append(model(idx[:, start:end], cache=cache, attention_mask=m)[0])
        start = end
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("name", list(CACHE_VARIANTS))
def test_cache_equals_full_forward(name, device):
    model = small(**CACHE_VARIANTS[name]).to(device)
    T = 32 if model.config.window is None else 70  # windowed rotary/sinusoidal models run past block_size
    idx = torch.randint(0, 101, (2, T), device=device)
    with torch.no_grad():
        full, _ = model(idx)
        # prefill 9 tokens, then a chunk of 3, then one token at a time
        got = cached_logits(model, idx, [9, 12] + list(range(13, T)))
    assert (got - full).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", list(CACHE_VARIANTS))
def test_left_padded_batch_with_cache_equals_each_row_alone(name):
    model = small(**CACHE_VARIANTS[name])
    lengths = [20, 13, 7]
    T = max(lengths)
    torch.manual_seed(1)
    rows = [torch.randint(0, 101, (n,)) for n in lengths]
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, T - len(r):], mask[i, T - len(r):] = r, 1
    steps = torch.randint(0, 101, (len(rows), 6))  # six decode steps after the padded prefill
    with torch.no_grad():
        cache = model.new_cache(len(rows), max_len=T + 6 if model.config.window is None else None)
        pre, _ = model(idx, cache=cache, attention_mask=mask)
        dec = torch.cat([model(steps[:, t:t + 1], cache=cache)[0] for t in range(6)], dim=1)
        nocache, _ = model(torch.cat([idx, steps], 1), attention_mask=torch.cat([mask, torch.ones_like(steps)], 1))
        for i, r in enumerate(rows):
            alone, _ = model(torch.cat([r, steps[i]])[None])
            n = len(r)
            assert (pre[i, T - n:] - alone[0, :n]).abs().max().item() < 1e-4
            assert (dec[i] - alone[0, n:]).abs().max().item() < 1e-4
            assert (nocache[i, T - n:] - alone[0]).abs().max().item() < 1e-4


def test_cache_is_preallocated_in_model_dtype_and_crop_rolls_back():
    model = small(pos_emb="rope").to(torch.bfloat16)
    cache = model.new_cache(2)
    buffers = [t.data_ptr() for t in cache.k + cache.v]
    with torch.no_grad():
        model(torch.randint(0, 101, (2, 5)), cache=cache)
        model(torch.randint(0, 101, (2, 1)), cache=cache)
    # inspected after use: the same preallocated bf16 buffers, written in place, the first 6 columns filled
    assert [t.data_ptr() for t in cache.k + cache.v] == buffers
    for t in cache.k + cache.v:
        assert t.dtype == torch.bfloat16 and t.shape == (2, 4, SMALL["block_size"], 8)
        assert t[:, :, :6].abs().sum() > 0 and t[:, :, 6:].abs().sum() == 0
    assert cache.length == 6 and cache.next_pos.tolist() == [6, 6]
    model = small(pos_emb="rope")
    idx = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        cache = model.new_cache(2)
        model(idx[:, :8], cache=cache)
        model(torch.randint(0, 101, (2, 3)), cache=cache)  # tokens a draft proposed, then rejected
        cache.crop(8)
        got = torch.cat([model(idx[:, t:t + 1], cache=cache)[0] for t in range(8, 12)], 1)
        full, _ = model(idx)
    assert (got - full[:, 8:]).abs().max().item() < 1e-4


def test_rolling_cache_memory_is_constant():
    model = small(pos_emb="rope", window=4, n_sink=2)
    cache = model.new_cache(1)
    buffers = [t.data_ptr() for t in cache.k + cache.v]
    with torch.no_grad():
        for _ in range(100):  # far past block_size = 32
            model(torch.randint(0, 101, (1, 1)), cache=cache)
    # the cache that was used, after 100 tokens: still the 2 + 4 (+1 spare) slots it started with, in place
    assert [t.data_ptr() for t in cache.k + cache.v] == buffers
    assert all(t.shape == (1, 4, 4 + 2 + 1, 8) for t in cache.k + cache.v)
    assert cache.kpos.shape == (1, 7) and sorted(cache.kpos[0].tolist()) == [-1, 0, 1, 96, 97, 98, 99]
    assert int(cache.next_pos) == 100


# -- training ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [dict(), dict(pos_emb="sinusoidal"), dict(pos_emb="rope", norm="rmsnorm"),
                                     dict(mlp="swiglu", n_kv_head=1), dict(pos_emb="rope", window=8, n_sink=1),
                                     dict(tie_weights=False, bias=False, dropout=0.1)])
def test_each_variant_learns(variant, device):
    model = small(**variant).train().to(device)
    torch.manual_seed(0)
    x = torch.randint(0, 101, (4, 16), device=device)
    y = torch.roll(x, -1, 1)
    opt = model.configure_optimizer(0.1, 3e-3, device_type=device)
    losses = []
    for _ in range(40):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > math.log(101) - 0.5  # starts near uniform
    # sinusoidal is the slowest: its unit-amplitude table swamps the 0.02-std token embeddings at first
    assert losses[-1] < 0.6 * losses[0]


def test_init_follows_gpt2():
    model = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=256, vocab_size=1000, block_size=64))
    assert abs(model.transformer.h[0].attn.c_attn.weight.std().item() - 0.02) < 0.002
    assert abs(model.transformer.h[0].mlp.c_proj.weight.std().item() - 0.02 / math.sqrt(16)) < 0.001
    assert model.lm_head.weight is model.transformer.wte.weight


def test_optimizer_decays_matrices_only():
    model = small()
    opt = model.configure_optimizer(0.1, 1e-3)
    decay, no_decay = opt.param_groups
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_param_counts_of_presets():
    with torch.device("meta"):
        assert round(GPT(GPTConfig.from_preset("gpt2")).num_params() / 1e6, 2) == 123.65  # nanoGPT's number
        assert round(GPT(GPTConfig.from_preset("gpt2-xl")).num_params() / 1e6) == 1556


# -- checkpoints ------------------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path):
    model = small(pos_emb="rope", mlp="swiglu")
    path = str(tmp_path / "ckpt.pt")
    gpt2.save_checkpoint(path, model, step=7, note="x")
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temp file left behind
    ckpt = gpt2.load_checkpoint(path)
    assert ckpt["step"] == 7 and ckpt["config"]["pos_emb"] == "rope"
    back = GPT.from_pretrained(path).eval()
    idx = torch.randint(0, 101, (1, 10))
    with torch.no_grad():
        assert torch.equal(back(idx)[0], model(idx)[0])


def test_corrupt_truncated_and_mismatched_checkpoints(tmp_path):
    model = small()
    path = tmp_path / "ckpt.pt"
    gpt2.save_checkpoint(str(path), model)
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        gpt2.load_checkpoint(str(tmp_path / "trunc.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        gpt2.load_checkpoint(str(tmp_path / "junk.pt"))
    with pytest.raises(FileNotFoundError):
        gpt2.load_checkpoint(str(tmp_path / "missing.pt"))
    other = small(n_embd=48)
    with pytest.raises(ValueError, match="does not match the model"):
        gpt2.load_model_state(other, gpt2.load_checkpoint(str(path))["model"], str(path))


# -- bad input --------------------------------------------------------------------------------------


def test_bad_input_errors():
    model = small()
    with pytest.raises(ValueError, match="longer than block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 101\)"):
        model(torch.tensor([[5, 101]]))
    with pytest.raises(ValueError, match="token ids"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match="unknown preset 'gpt3'; valid: tiny, gpt2"):
        GPTConfig.from_preset("gpt3")
    with pytest.raises(ValueError, match="unknown pos_emb 'alibi'; valid: learned, sinusoidal, rope"):
        GPTConfig(pos_emb="alibi")
    with pytest.raises(ValueError, match="unknown mlp"):
        GPTConfig(mlp="relu")
    with pytest.raises(ValueError, match="not divisible by n_head"):
        GPTConfig(n_embd=100, n_head=12)
    with pytest.raises(ValueError, match="n_sink only makes sense"):
        GPTConfig(n_sink=4)
    for kw, match in ((dict(n_head=0), "n_head must be >= 1"), (dict(n_kv_head=0), "n_kv_head must be >= 1"),
                      (dict(window=4, n_sink=-1), "n_sink must be >= 0")):  # not a ZeroDivisionError or IndexError
        with pytest.raises(ValueError, match=match):
            GPTConfig(**kw)
    with pytest.raises(ValueError, match="KV cache full"):
        cache = model.new_cache(1, max_len=8)
        model(torch.zeros(1, 9, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="learned position"):
        learned_window = small(window=4)
        cache = learned_window.new_cache(1)
        for _ in range(40):
            learned_window(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="unknown model 'gpt5'"):
        GPT.from_pretrained("gpt5")
    with pytest.raises(ValueError, match="unknown dtype"):
        gpt2.pick_dtype("float8", "cpu")


# -- downloads --------------------------------------------------------------------------------------


class RangeHandler(http.server.BaseHTTPRequestHandler):
    payload = bytes(range(256)) * 400

    def do_GET(self):
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
        body = self.payload[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_download_resumes_and_checks_size(tmp_path):
    server = http.server.HTTPServer(("127.0.0.1", 0), RangeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/file.bin"
    try:
        dest = tmp_path / "file.bin"
        (tmp_path / "file.bin.part").write_bytes(RangeHandler.payload[:1000])  # an interrupted download
        gpt2.download(url, str(dest), expected_size=len(RangeHandler.payload))
        assert dest.read_bytes() == RangeHandler.payload
        assert not (tmp_path / "file.bin.part").exists()
        with pytest.raises(RuntimeError, match="incomplete"):
            gpt2.download(url, str(tmp_path / "other.bin"), expected_size=len(RangeHandler.payload) + 1)
    finally:
        server.shutdown()


def test_download_without_network_names_url_and_destination(tmp_path):
    dest = str(tmp_path / "w.safetensors")
    with pytest.raises(RuntimeError, match=r"could not download http://127\.0\.0\.1:9/x .*put it at .*w\.safetensors"):
        gpt2.download("http://127.0.0.1:9/x", dest)


def test_checkpoint_unwraps_ddp_and_compile_in_any_order(tmp_path):
    class Compiled(torch.nn.Module):  # stand-ins with the attributes torch.compile and DDP add
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

    class Parallel(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m

    model = small()
    for wrapped in (Parallel(Compiled(model)), Compiled(Parallel(model))):
        path = str(tmp_path / "w.pt")
        gpt2.save_checkpoint(path, wrapped)
        assert set(gpt2.load_checkpoint(path)["model"]) == set(model.state_dict())


def test_docstrings_print_as_written():
    """A backslash in a plain (non-raw) docstring is an escape: "\\boxed" prints as a backspace + "oxed", and a
    command's line-continuation backslash joins the lines in --help. Every docstring of the topic files and
    bench scripts either has no such escape or is raw."""
    import ast
    import glob
    import re
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    bad = []
    for path in sorted(glob.glob(os.path.join(root, "*.py")) + glob.glob(os.path.join(root, "bench", "*.py"))):
        src = open(path, encoding="utf-8").read()
        for node in ast.walk(ast.parse(src)):
            body = getattr(node, "body", None)
            if not (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                    and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
                continue
            literal = ast.get_source_segment(src, body[0].value)
            joined = re.search(r"(?<!\\)(\\\\)*\\\n", literal)  # an odd run of backslashes ends a line
            if literal[0] not in "rR" and (joined or any(c in body[0].value.value for c in "\a\b\f\v")):
                bad.append(f"{os.path.basename(path)}:{body[0].lineno}")
    assert not bad, f"docstrings whose backslashes are escapes (write \\\\ or make them raw): {bad}"


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    """rng_state() survives save_checkpoint / load_checkpoint (weights_only) and set_rng_state puts the stream back
    where it was; an older checkpoint's bare CPU state is accepted too."""
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8))
    torch.manual_seed(0)
    path = str(tmp_path / "c.pt")
    gpt2.save_checkpoint(path, model, rng=gpt2.rng_state())
    want = torch.rand(4)
    gpt2.set_rng_state(gpt2.load_checkpoint(path)["rng"])
    assert torch.equal(torch.rand(4), want)
    torch.manual_seed(1)
    old = torch.get_rng_state()
    want = torch.rand(4)
    gpt2.set_rng_state(old)
    assert torch.equal(torch.rand(4), want)


def test_restore_scaler_accepts_a_run_trained_without_fp16():
    """A float32 / bf16 run saves an empty grad-scaler state; resumed in fp16 the scaler keeps its initial scale.
    An fp16 run's state comes back whole."""
    fp16 = gpt2.grad_scaler("cpu", torch.float16)
    gpt2.restore_scaler(fp16, gpt2.grad_scaler("cpu", torch.float32).state_dict())
    assert fp16.get_scale() == 65536.0
    saved = {**fp16.state_dict(), "scale": 8.0}
    gpt2.restore_scaler(fp16, saved)
    assert fp16.get_scale() == 8.0
