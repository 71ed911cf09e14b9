"""gpt2.py against references it does not share code with: transformers' GPT-2 (logits both directions, fp32
and bf16 autocast) and Llama (rope + rmsnorm + swiglu + grouped-query attention), torch.nn.RMSNorm, the
defining properties of RoPE, SwiGLU and grouped-query attention written out by hand, the model run through
the plain attention formula vs scaled_dot_product_attention, and the full forward pass (every KV-cache mode
must give the logits a full recomputation gives); then the shared pieces: Llama 3 / Qwen2 in and out against
transformers, checkpoints (atomic, weights_only), --resume settings, the learning-rate schedule, metrics log,
LoRA (formula, merge, adapter alone, peft's LoRA) and the batched sampler (log-probs against a plain forward pass, eos, filters).

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


@pytest.mark.parametrize("kw", [dict(n_inner=48), dict(tie_word_embeddings=False), dict(layer_norm_epsilon=1e-2)])
def test_hf_gpt2_with_its_own_mlp_width_epsilon_or_an_untied_head_loads(tmp_path, kw):
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


@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_prefill_chunk_of_padding_only_leaves_no_trace(attention):
    """A row whose first prefill chunk is all padding has queries that may attend to no key at all; the plain
    formula would make them NaN (softmax over nothing), and NaN values leak into real tokens through 0 * NaN."""
    model = small(attention=attention)
    row = torch.randint(0, 101, (6,))
    idx = torch.cat([torch.randint(0, 101, (1, 10)), torch.cat([torch.zeros(4, dtype=torch.long), row])[None]])
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        got = cached_logits(model, idx, [3], mask)  # row 1: 3 padding tokens, then 1 more and its 6 tokens
        alone, _ = model(row[None])
    assert (got[1, 4:] - alone[0]).abs().max().item() < 1e-4


def test_rolling_cache_never_writes_two_keys_to_one_slot():
    """A prefill chunk longer than the window: of the tokens that share a ring slot only the last is kept (the
    others go to the spare slot), so the scatter that writes them has no duplicate index (whose winner torch
    leaves undefined)."""
    model = small(pos_emb="rope", window=4, n_sink=2)
    cache = model.new_cache(2)
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        model(torch.randint(0, 101, (2, 13)), cache=cache, attention_mask=mask)
    for row in cache._slot.tolist():
        ring = [s for s in row if s != cache.size - 1]
        assert len(ring) == len(set(ring)) == 6  # 2 sinks + the last 4
    assert sorted(cache.kpos[0].tolist()) == [-1, 0, 1, 9, 10, 11, 12]
    assert sorted(cache.kpos[1].tolist()) == [-1, 0, 1, 6, 7, 8, 9]


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
    assert GPT.from_pretrained(path, dropout=0.3).config.dropout == 0.3  # overrides apply to a file too (were dropped)


def test_corrupt_truncated_and_mismatched_checkpoints(tmp_path):
    model = small()
    path = tmp_path / "ckpt.pt"
    gpt2.save_checkpoint(str(path), model)
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match=r"corrupt or truncated.*the zip archive ends early.*delete it"):
        gpt2.load_checkpoint(str(tmp_path / "trunc.pt"))
    # a file that is no checkpoint at all (a README given to --init): say so, and never advise deleting it
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="is not a checkpoint") as e:
        gpt2.load_checkpoint(str(tmp_path / "junk.pt"))
    assert "not the zip archive torch.save writes" in str(e.value) and "weights_only" not in str(e.value)
    told = str(e.value).replace(str(tmp_path), "")  # the folder's name holds "corrupt"
    assert "delete" not in told and "corrupt" not in told
    with pytest.raises(FileNotFoundError):
        gpt2.load_checkpoint(str(tmp_path / "missing.pt"))
    other = small(n_embd=48)
    with pytest.raises(ValueError, match="does not match the model"):
        gpt2.load_model_state(other, gpt2.load_checkpoint(str(path))["model"], str(path))
    # char_gpt.py's checkpoint: model and config entries, but a config of training settings (was a TypeError)
    torch.save({"model": {}, "config": {"stage": "full", "n_layer": 1, "batch_size": 4}}, tmp_path / "char.pt")
    with pytest.raises(ValueError, match="not a gpt2.py model checkpoint .*batch_size, stage.*char_gpt.py"):
        gpt2.load_checkpoint(str(tmp_path / "char.pt"))


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
                      (dict(window=4, n_sink=-1), "n_sink must be >= 0"),  # not a ZeroDivisionError or IndexError
                      (dict(dropout=1.5), r"dropout must lie in \[0, 1\), got 1.5")):
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



def test_a_tokenizer_with_more_ids_than_the_model_is_refused(tmp_path):
    """A checkpoint whose recorded tokenizer has more ids than its embedding rows: ids past the table would index
    out of it; load_with_tokenizer (every post-training script's --init) refuses it by name."""
    path = str(tmp_path / "m.pt")
    tok = __import__("bpe").byte_tokenizer()  # 257 ids
    gpt2.save_checkpoint(path, GPT(GPTConfig(block_size=16, vocab_size=200, n_layer=1, n_head=2, n_embd=16)),
                         tokenizer=tok.dumps())
    with pytest.raises(ValueError, match=f"{path}: the tokenizer has 257 ids, more than the model's vocabulary of 200"):
        gpt2.load_with_tokenizer(path)


def test_offline_weights_fail_with_one_message_naming_every_file(tmp_path, monkeypatch, offline):
    """No network: OpenAI's weights (or an HF hub name) fail with a message naming the files to fetch and where
    they go: a DownloadError from the downloaders, a ValueError from load_with_tokenizer (the post-training
    scripts print it as their error), gpt2.py's error line; never a traceback."""
    import sys

    import bpe
    import requests

    folder = str(offline / "hf" / "gpt2")
    with pytest.raises(bpe.DownloadError) as e:
        gpt2.download_hf_model("gpt2")
    for part in ("openai-community/gpt2/resolve/main/config.json", "model.safetensors", folder):
        assert part in str(e.value)
    with pytest.raises(ValueError) as e:
        gpt2.load_with_tokenizer("gpt2")
    assert str(e.value).startswith("--init gpt2: could not download") and "model.safetensors" in str(e.value)
    with pytest.raises(ValueError, match="cannot reach https://huggingface.co to list org/tiny"):
        gpt2.load_with_tokenizer("org/tiny")
    monkeypatch.setattr(sys, "argv", ["gpt2.py", "--model", "gpt2"])
    with pytest.raises(SystemExit) as e:
        gpt2.main()
    assert str(e.value.code).startswith("gpt2.py: error: could not download") and folder in str(e.value.code)

    bare = str(tmp_path / "bare.pt")  # a checkpoint of another vocabulary that records no tokenizer
    gpt2.save_checkpoint(bare, GPT(GPTConfig(block_size=16, vocab_size=300, n_layer=1, n_head=2, n_embd=16)))
    monkeypatch.setattr(sys, "argv", ["gpt2.py", "--model", bare])
    with pytest.raises(SystemExit, match="records no tokenizer, and GPT-2's 50257 ids do not fit its vocabulary "
                                         "of 300.*load those with moe.load_model"):
        gpt2.main()  # was an IndexError from the embedding

    class Down:  # the hub answers, with a server error
        status_code = 503
    monkeypatch.setattr(requests, "get", lambda *a, **k: Down())
    with pytest.raises(bpe.DownloadError, match="org/tiny: HTTP 503"):
        gpt2.download_hf_repo("org/tiny", cache_root=str(tmp_path))

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


# -- more pieces against their definitions -----------------------------------------------------------


def test_sinusoidal_table_is_the_formula():
    """PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d)), written out for d = 6."""
    pos = torch.tensor([[0, 3, 7]])
    ref = torch.tensor([[(math.sin if i % 2 == 0 else math.cos)(p / 10000 ** ((i - i % 2) / 6)) for i in range(6)]
                        for p in (0, 3, 7)])
    assert torch.allclose(gpt2.sinusoidal_embedding(pos, 6)[0], ref, atol=1e-6)


def test_llama3_rope_scaling_matches_transformers():
    """Llama 3.1's real settings (head size 128, theta 500000, factor 8 over an 8192-token original context):
    slow, fast and blended channels all present."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    cfg = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0,
                                   max_position_embeddings=131072, rope_scaling={"rope_type": "llama3", **scaling})
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    got = gpt2.rope_frequencies(128, 500000.0, scaling)
    plain = gpt2.rope_frequencies(128, 500000.0)
    assert (got < plain).any() and (got == plain).any()  # some channels slowed, some kept
    assert torch.allclose(got, ref.float(), rtol=1e-5, atol=0)


def test_loss_skips_targets_of_minus_one():
    """targets -1 (padding, prompt tokens in SFT) are left out of the mean, not counted as some token."""
    model = small()
    x = torch.randint(0, 101, (2, 10))
    y = torch.randint(0, 101, (2, 10))
    y[0, :4], y[1, 7:] = -1, -1
    with torch.no_grad():
        logits, loss = model(x, y)
    keep = y >= 0
    ref = -logits.log_softmax(-1)[keep].gather(-1, y[keep][:, None]).mean()
    assert abs(loss.item() - ref.item()) < 1e-5


def test_eval_mode_turns_dropout_off_everywhere():
    """With dropout 0.5, eval mode gives the logits of the same weights with dropout 0 (attention dropout too)."""
    noisy = small(dropout=0.5)
    clean = small()
    clean.load_state_dict(noisy.state_dict())
    idx = torch.randint(0, 101, (2, 16))
    with torch.no_grad():
        assert torch.equal(noisy(idx)[0], clean(idx)[0])


# -- Llama 3 / Qwen2 in and out, against transformers --------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_hf_llama_and_qwen2_round_trip_through_transformers(tmp_path, kind):
    """An HF Llama (untied, rope_theta 500, Llama 3.1 rope scaling that matters within 32 tokens) and an HF Qwen2
    (tied, q/k/v biases), each with grouped-query attention and every weight perturbed: loaded by
    GPT.from_pretrained with transformers' logits, exported by save_pretrained and read by transformers again."""
    torch.manual_seed(0)
    common = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-5, rope_theta=500.0)
    if kind == "llama":
        scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=16)
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, rope_scaling=scaling,
                                                                    tie_word_embeddings=False))
    else:
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=True))
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.eval().save_pretrained(tmp_path / "hf")
    ours = GPT.from_pretrained(str(tmp_path / "hf")).eval()
    assert ours.config.tie_weights == (kind == "qwen2") and ours.config.qkv_bias == (kind == "qwen2")
    idx = torch.randint(0, 101, (2, 32))
    with torch.no_grad():
        ref = hf(idx).logits
        assert (ours(idx)[0] - ref).abs().max().item() < 1e-4
        ours.save_pretrained(str(tmp_path / "out"))
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
        assert (back(idx).logits - ref).abs().max().item() < 1e-4


def test_safetensors_header_is_8_byte_aligned(tmp_path):
    """The format asks for the data to start at a multiple of 8 bytes, whatever the header's length."""
    import struct
    for n in range(1, 9):
        path = tmp_path / f"{n}.safetensors"
        gpt2.write_safetensors(str(path), {"x" * n: torch.arange(3.0)})
        (size,) = struct.unpack("<Q", path.read_bytes()[:8])
        assert size % 8 == 0, (n, size)
        assert torch.equal(gpt2.read_safetensors(str(path))["x" * n], torch.arange(3.0))


# -- checkpoints, resume and the shared helpers --------------------------------------------------------


class Pickled:  # an arbitrary object: weights_only loading must refuse to build it
    pass


def test_checkpoint_write_is_atomic_and_saves_the_state_given(tmp_path, monkeypatch):
    """A crash while writing leaves the previous checkpoint intact; `state` (an FSDP model's gathered weights)
    is what gets saved when given; weights_only loading refuses pickled objects; unexpected keys are named."""
    model = small()
    path = str(tmp_path / "ckpt.pt")
    zeros = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    gpt2.save_checkpoint(path, model, state=zeros, step=1)
    assert all(not v.any() for v in GPT.from_checkpoint(path).state_dict().values())
    real_save = torch.save

    def crash(obj, f):
        real_save({"half": torch.zeros(1000)}, f)
        with open(f, "r+b") as fh:
            fh.truncate(100)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        gpt2.save_checkpoint(path, model, step=2)
    monkeypatch.undo()
    assert gpt2.load_checkpoint(path)["step"] == 1
    torch.save({"model": {}, "config": {}, "x": Pickled()}, str(tmp_path / "pickle.pt"))
    with pytest.raises(ValueError, match="corrupt or truncated"):
        gpt2.load_checkpoint(str(tmp_path / "pickle.pt"))
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        gpt2.load_model_state(model, {**model.state_dict(), "extra": torch.zeros(1)})


def test_resume_settings_keep_the_run_and_change_only_where_and_when(tmp_path):
    import argparse
    run = dict(lr=0.1, seed=1, device="cpu", dtype="float32", compile=False, stop_after=None, resume=False,
               out_dir=str(tmp_path))
    gpt2.save_checkpoint(str(tmp_path / "ckpt.pt"), small(), args=run)
    now = argparse.Namespace(lr=9.0, seed=2, device="cuda", dtype="bfloat16", compile=True, stop_after=5, resume=True,
                             out_dir=str(tmp_path))
    args, ckpt = gpt2.resume_settings(now, "x.py", "lr", ["--device", "cuda", "--dtype=bfloat16", "--compile"])
    assert ckpt["args"] == run
    assert (args.lr, args.seed) == (0.1, 1)  # the run's own settings
    assert (args.device, args.dtype, args.compile, args.stop_after) == ("cuda", "bfloat16", True, 5)  # as asked
    # not asked: where it runs stays the run's own (a bf16 run resumed without --dtype was float32); when it
    # stops is the command line's (its default None: to the end)
    args, _ = gpt2.resume_settings(now, "x.py", "lr", ["--stop-after", "5"])
    assert (args.device, args.dtype, args.compile, args.stop_after) == ("cpu", "float32", False, 5)
    args, _ = gpt2.resume_settings(argparse.Namespace(**{**vars(now), "stop_after": None}), "x.py", "lr", [])
    assert args.stop_after is None and args.out_dir == str(tmp_path)
    assert gpt2.resume_settings(argparse.Namespace(resume=False), "x.py", "lr")[1] is None
    with pytest.raises(SystemExit, match="no checkpoint at .*run without --resume"):
        gpt2.resume_settings(argparse.Namespace(**{**vars(now), "out_dir": str(tmp_path / "none")}), "x.py", "lr")
    with pytest.raises(SystemExit, match="was not written by y.py"):  # a run of x.py records no --group-size
        gpt2.resume_settings(now, "y.py", "group_size")


def test_resume_names_the_flags_it_does_not_use(tmp_path, capsys):
    """Flags given with --resume that ask for another value than the run's are named (they used to be dropped
    in silence); where and when the run goes on (--device, --stop-after) and flags equal to the run's are not."""
    import argparse
    run = dict(lr=0.1, seed=1, preamble=True, device="cpu", dtype="float32", compile=False, stop_after=None,
               resume=False, out_dir=str(tmp_path))
    gpt2.save_checkpoint(str(tmp_path / "ckpt.pt"), small(), args=run)
    now = argparse.Namespace(**{**run, "lr": 9.0, "preamble": False, "device": "cuda", "stop_after": 5, "resume": True})
    argv = ["--resume", "--lr", "9.0", "--seed=1", "--no-preamble", "--device", "cuda", "--stop-after", "5"]
    args, _ = gpt2.resume_settings(now, "x.py", "lr", argv)
    assert (args.lr, args.preamble, args.device) == (0.1, True, "cuda")
    assert capsys.readouterr().out == ("x.py: --resume goes on with the run's own settings; not used: --lr 9.0 (the "
                                       "run's: 0.1), --preamble False (the run's: True); to change them, start a new "
                                       "run in another --out-dir\n")
    gpt2.resume_settings(now, "x.py", "lr", ["--resume", "--out-dir", str(tmp_path), "--device", "cuda"])
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("script", ["train_gpt2", "moe", "classify", "sft", "reward_model", "ppo", "grpo",
                                    "char_gpt", "generate"])
def test_given_flags_and_no_abbreviated_flags(script, capsys):
    """given_flags names the settings a command line gives (what --resume keeps or notes). The scripts' parsers
    take no abbreviations: `--dtyp bfloat16` would set --dtype without given_flags seeing it, and a resumed run
    would take the run's own dtype in silence."""
    import importlib
    argv = ["--lr", "1e-3", "--dtype=bfloat16", "--no-preamble", "--", "--seed"]
    assert gpt2.given_flags(argv) == {"lr", "dtype", "no_preamble", "preamble"}
    mod = importlib.import_module(script)
    parse = getattr(mod, "parse_args", None) or mod.main
    with pytest.raises(SystemExit):
        parse(["--dtyp", "bfloat16"])
    assert "unrecognized arguments: --dtyp" in capsys.readouterr().err


def test_a_warmup_as_long_as_the_run_is_noted(capsys):
    """A --warmup-steps of at least --max-steps is noted (the learning rate never reaches --lr and never decays),
    where each script parses its flags."""
    import grpo
    import moe
    import ppo
    assert gpt2.warmup_note(29, 30) == ""
    assert gpt2.warmup_note(30, 30) == ("note: --warmup-steps 30 >= --max-steps 30: the learning rate never reaches "
                                        "--lr and never decays")
    for script in (ppo, grpo, moe):
        script.parse_args(["--max-steps", "10", "--warmup-steps", "10"])
        assert "--warmup-steps 10 >= --max-steps 10" in capsys.readouterr().out
        script.parse_args(["--max-steps", "10", "--warmup-steps", "9"])
        assert "warmup" not in capsys.readouterr().out
    import train_gpt2
    train_gpt2.check_args(train_gpt2.parse_args(["--max-steps", "10", "--warmup-steps", "10"]), 1)
    assert "--warmup-steps 10 >= --max-steps 10" in capsys.readouterr().out


def test_every_presets_pipeline_input_names_the_command_that_writes_it(tmp_path, monkeypatch):
    """Each preset's --init / --reward-model under out/ is in MADE_BY, and its command is a preset whose
    --out-dir is that folder (so following the message writes what was missing); a missing one is named."""
    import shlex
    import grpo
    import ppo
    import reward_model
    import sft
    import train_gpt2
    inputs = {p.get(k) for m in (sft, reward_model, ppo, grpo) for p in m.PRESETS.values()
              for k in ("init", "reward_model")}
    inputs = {i for i in inputs if i and i.startswith("out/")}
    assert inputs and inputs <= set(gpt2.MADE_BY), inputs - set(gpt2.MADE_BY)
    scripts = {"train_gpt2.py": train_gpt2, "sft.py": sft, "reward_model.py": reward_model}
    for path, command in gpt2.MADE_BY.items():
        python, script, *argv = shlex.split(command.split("   (after:")[0])
        args = scripts[script].parse_args(argv)
        out_dir = args.out_dir or f"out/{args.preset}-{args.method}"  # reward_model.py's default: see its main
        assert os.path.join(out_dir, "ckpt.pt") == path, command
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"no model at out/gpt2-alpaca/ckpt.pt; make it with:\n    python sft.py "
                                         r"--preset gpt2-alpaca"):
        gpt2.load_with_tokenizer("out/gpt2-alpaca/ckpt.pt")


def test_batch_rows_walk_epochs_of_shuffled_rows():
    """10 rows, batches of 3: 3 batches an epoch, each epoch 9 distinct rows in its own order, the order set by
    (seed, epoch) and nothing else (a resumed run asks again and gets the same rows). The seed is seed * 1000 +
    epoch, as in every recorded run of sft, reward_model, ppo and grpo."""
    epoch = lambda e, seed=0: [i for k in range(3 * e, 3 * e + 3) for i in gpt2.batch_rows(k, 10, 3, seed)]
    for e in range(3):
        rows = epoch(e)
        assert len(rows) == 9 and len(set(rows)) == 9 and set(rows) <= set(range(10))
    assert epoch(0) != epoch(1) and epoch(0) != epoch(0, seed=1)
    assert epoch(1) == epoch(1) and gpt2.batch_rows(4, 10, 3, 0) == epoch(1)[3:6]
    assert gpt2.epoch_order(10, 3, 2) == torch.randperm(10, generator=torch.Generator().manual_seed(3002)).tolist()


def test_lr_schedule_dtype_scaler_and_metrics_log(tmp_path):
    # warmup over 10 steps to 1.0, cosine to 0.1 at step 110: the formula at a few steps
    lr = [gpt2.lr_at(s, 1.0, 10, 110) for s in (0, 9, 10, 60, 110, 500)]
    ref = [0.1, 1.0, 1.0, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 50 / 100)), 0.1, 0.1]
    assert lr == pytest.approx(ref, abs=1e-12)
    assert gpt2.pick_dtype("auto", "cpu") == torch.float32 and gpt2.pick_dtype("bfloat16", "cpu") == torch.bfloat16
    assert gpt2.grad_scaler("cpu", torch.float16).is_enabled()
    assert not gpt2.grad_scaler("cpu", torch.bfloat16).is_enabled()
    log = gpt2.MetricsLog(str(tmp_path))
    for step in range(1, 6):
        log.log(step=step, train_loss=1.0 / step)
    gpt2.MetricsLog(str(tmp_path), resume_step=3)  # resumed from the checkpoint of step 3
    assert [r["step"] for r in gpt2.MetricsLog.read(str(tmp_path))] == [1, 2, 3]
    gpt2.MetricsLog(str(tmp_path))  # a fresh run
    assert gpt2.MetricsLog.read(str(tmp_path)) == []


# -- LoRA --------------------------------------------------------------------------------------------------


def test_lora_formula_freezing_merge_and_adapter_round_trip(tmp_path):
    """y = x W^T + b + (alpha / r) x A^T B^T on every adapted Linear (lm_head included, also on the no-grad CPU
    path); only A and B train; merging gives the same logits (biases included) and a head of its own that
    survives a checkpoint; an adapter saved alone loads onto a fresh base with the same logits."""
    base = small(tie_weights=True)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # biases too: a merge that drops them must show
    state0 = {k: v.clone() for k, v in base.state_dict().items()}
    idx = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        before = base(idx)[0]
    model = gpt2.add_lora(base, r=4, alpha=8, targets=("c_attn", "c_proj", "c_fc", "lm_head"))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if ".lora_" in n}
    opt = model.configure_optimizer(0.1, 1e-3)
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(idx)[0], before)  # B = 0: a fresh adapter changes nothing
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.copy_(torch.randn_like(p) * 0.1)
    fc = model.transformer.h[0].mlp.c_fc
    x = torch.randn(3, 32)
    ref = x @ fc.weight.T + fc.bias + 2.0 * (x @ fc.lora_A.T @ fc.lora_B.T)  # alpha / r = 8 / 4
    with torch.no_grad():
        assert torch.allclose(fc(x), ref, atol=1e-5)
        adapted = model(idx)[0]
    assert torch.allclose(model(idx)[0], adapted, atol=1e-5)  # with grad (nn path) == without (CPU fast path)
    gpt2.save_adapter(str(tmp_path / "a.pt"), model)
    fresh = small(tie_weights=True)
    fresh.load_state_dict(state0)
    gpt2.load_adapter(fresh, str(tmp_path / "a.pt"))
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(idx)[0], adapted, atol=1e-5)
    merged = gpt2.merge_lora(model)
    with torch.no_grad():
        assert torch.allclose(merged(idx)[0], adapted, atol=1e-4)
    gpt2.save_checkpoint(str(tmp_path / "m.pt"), merged)
    with torch.no_grad():
        assert torch.allclose(GPT.from_checkpoint(str(tmp_path / "m.pt")).eval()(idx)[0], adapted, atol=1e-4)


def test_lora_matches_peft(tmp_path):
    """add_lora is peft's LoRA (LoraConfig on GPT-2's c_attn, c_proj, c_fc): with the same A and B both give the
    same logits, the same loss, and the same gradients on A and B (peft stores Conv1D weights transposed, the
    adapters not)."""
    import peft
    hf = random_hf_model()
    hf.save_pretrained(tmp_path)
    ours = gpt2.add_lora(GPT.from_pretrained(str(tmp_path)).eval(), r=4, alpha=8)
    ref = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, fan_in_fan_out=True,
                                                  target_modules=["c_attn", "c_proj", "c_fc"])).eval()
    pairs = {}
    for name, p in ours.named_parameters():
        if ".lora_" in name:
            site, ab = name.rsplit(".", 1)  # transformer.h.0.attn.c_attn, lora_A
            pairs[name] = ref.get_parameter(f"base_model.model.{site}.{ab}.default.weight")
    assert len(pairs) == 3 * 4 * 2  # 3 blocks x (c_attn, attn.c_proj, c_fc, mlp.c_proj) x (A, B)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)  # B too: a fresh B = 0 would hide a wrong A or scale
                pairs[name].copy_(p)
    idx = torch.randint(0, 211, (2, 20))
    logits, loss = ours(idx[:, :-1], targets=idx[:, 1:])
    out = ref(input_ids=idx[:, :-1])
    ref_loss = F.cross_entropy(out.logits.flatten(0, 1), idx[:, 1:].flatten())
    assert (logits - out.logits).abs().max() < 1e-5 and abs(loss.item() - ref_loss.item()) < 1e-6
    loss.backward()
    ref_loss.backward()
    for name, p in ours.named_parameters():
        if ".lora_" in name:
            assert torch.allclose(p.grad, pairs[name].grad, atol=1e-6), name
        else:
            assert p.grad is None  # frozen


# -- batched sampling ----------------------------------------------------------------------------------------


def test_left_pad_and_filters_on_hand_examples():
    idx, mask = gpt2.left_pad([[5, 6], [7]])
    assert idx.tolist() == [[5, 6], [0, 7]] and mask.tolist() == [[1, 1], [0, 1]]
    inf = float("-inf")
    assert gpt2.top_k_filter(torch.tensor([1.0, 5, 3, 4]), 2).tolist() == [inf, 5, inf, 4]
    logits = torch.tensor([0.1, 0.5, 0.05, 0.2, 0.15]).log()  # unsorted: 0.5 and 0.2 reach p = 0.6
    kept = gpt2.top_p_filter(logits, 0.6) > inf
    assert kept.tolist() == [False, True, False, True, False]
    g = torch.Generator().manual_seed(0)
    drawn = gpt2.draw(torch.tensor([0.0, 2.0, 0.0, 2.0]).expand(2000, 4), g)  # rows need not sum to 1
    assert set(drawn.tolist()) == {1, 3} and 800 < int((drawn == 3).sum()) < 1200


def test_sample_log_probs_eos_and_vocab_against_a_full_forward():
    """sample() on left-padded prompts of different lengths, temperature 0.7, vocab_size 60: every token drawn
    is < 60, and its log-prob is log_softmax(logits[:60] / 0.7) of a plain forward pass over the row alone. With
    eos_id set to a token a row drew, the same draws stop there: after its end a row gives eos_id, mask False,
    log-prob 0. The model comes back in training mode."""
    model = small().train()
    prompts = [[3, 14, 15, 92, 65], [35], [89, 79]]
    idx, mask = gpt2.left_pad(prompts)
    kw = dict(attention_mask=mask, temperature=0.7, vocab_size=60)
    tokens, live, logprobs = gpt2.sample(model, idx, 8, generator=torch.Generator().manual_seed(0), **kw)
    assert model.training and tokens.shape == (3, 8) and live.all() and (tokens < 60).all()
    eos = int(tokens[1, 2])
    tokens_e, live_e, logprobs_e = gpt2.sample(model, idx, 8, eos_id=eos, generator=torch.Generator().manual_seed(0),
                                               **kw)
    model.eval()
    for i, p in enumerate(prompts):
        n = int(live_e[i].sum())
        ended = n < tokens_e.size(1)
        assert torch.equal(tokens_e[i, :n], tokens[i, :n]) and live_e[i, :n].all() and not live_e[i, n:].any()
        assert (tokens_e[i, n:] == eos).all() and (logprobs_e[i, n:] == 0).all()
        if ended:
            assert int(tokens_e[i, n - 1]) == eos
        seq = torch.tensor(p + tokens[i].tolist())[None]
        with torch.no_grad():
            full = model(seq)[0][0, len(p) - 1:-1, :60]
        ref = (full / 0.7).log_softmax(-1).gather(-1, tokens[i][:, None]).squeeze(-1)
        assert torch.allclose(logprobs[i], ref, atol=1e-4)
        assert torch.allclose(logprobs_e[i, :n], ref[:n], atol=1e-4)
    assert int(live_e[1].sum()) <= 3  # row 1 ended at its eos


def test_sample_stops_at_the_context_end_and_refuses_inner_padding():
    model = small()
    idx = torch.randint(0, 101, (1, SMALL["block_size"] - 3))
    tokens, _, _ = gpt2.sample(model, idx, 10, temperature=0)
    assert tokens.shape == (1, 3)
    with pytest.raises(ValueError, match="left padding"):
        gpt2.sample(model, torch.tensor([[5, 6, 7]]), 2, attention_mask=torch.tensor([[1, 0, 1]]))
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):  # not "the prompt leaves no room"
        gpt2.sample(model, torch.tensor([[5, 6, 7]]), 0)
