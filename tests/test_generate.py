"""Tests for generate.py: tiny random models, offline, on CPU; the tests that take `device` also run on every
device in LLM_SCRATCH_TEST_DEVICES (see conftest.py).

Random models from the default init mostly repeat one token, which would make cache/no-cache equality
trivially true; `diverse` scales the weights and unties the output layer so greedy paths actually vary."""

import builtins
import copy
import math
import os
import re
import sys
import types
from dataclasses import replace

import pytest
import torch
import transformers

import generate as G
from gpt2 import GPT, GPTConfig, save_checkpoint


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models are all per-op overhead: on a shared 2-core machine a second thread only adds contention
    (measured 17 ms vs 0.5 ms per forward of a 2-layer model)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def diverse(model, scale=10.0):
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return model.eval()


def tiny(vocab=64, block=64, n_layer=2, n_embd=32, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = GPTConfig(block_size=block, vocab_size=vocab, n_layer=n_layer, n_head=2, n_embd=n_embd,
                    tie_weights=False, **kw)
    return diverse(GPT(cfg))


def noisy_copy(model, noise, seed=1):
    torch.manual_seed(seed)
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(noise * torch.randn_like(p))
    return m


def record_caches(monkeypatch):
    """The caches stream_tokens decodes with, in the order it makes them."""
    made, make = [], G.make_cache
    monkeypatch.setattr(G, "make_cache", lambda *args: made.append(make(*args)) or made[-1])
    return made


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [20, 21, 22, 23]]
SCHEMES = [dict(pos_emb="learned"), dict(pos_emb="sinusoidal"), dict(pos_emb="rope"),
           dict(pos_emb="rope", n_kv_head=1), dict(pos_emb="rope", window=8, n_sink=2),
           dict(pos_emb="sinusoidal", window=8, n_sink=0)]


# -- sampling filters and penalties on hand-made logits --------------------------------------------------

def test_top_k_keeps_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    out = G.top_k_filter(logits, 2)
    assert torch.isfinite(out).tolist() == [[False, True, False, True, False]]
    assert torch.equal(G.top_k_filter(logits, 10), logits)


def test_top_p_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    logits = probs.log()
    keep = lambda p: torch.isfinite(G.top_p_filter(logits, p))[0].tolist()
    assert keep(0.5) == [True, False, False, False, False]  # 0.5 alone reaches 0.5
    assert keep(0.6) == [True, True, False, False, False]
    assert keep(0.86) == [True, True, True, True, False]  # 0.85 < 0.86: needs the 4th token
    assert keep(0.01) == [True, False, False, False, False]  # the top token always stays
    assert keep(1.0) == [True] * 5
    # order of the vocabulary must not matter
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert torch.isfinite(G.top_p_filter(logits[:, perm], 0.6))[0].tolist() == [False, True, False, True, False]


def test_min_p_relative_to_top():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.06, 0.04]])
    out = G.min_p_filter(probs.log(), 0.25)  # threshold 0.1
    assert torch.isfinite(out)[0].tolist() == [True, True, True, False, False]


def test_penalties_count_the_documented_tokens():
    s = G.Sampling(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, 1.0]])
    seen = torch.tensor([[1.0, 1.0, 0.0, 0.0, 3.0]])  # prompt + generated
    generated = torch.tensor([[0.0, 0.0, 0.0, 0.0, 2.0]])  # generated only
    out = G.apply_penalties(logits, seen, generated, s)
    # token 0: seen, positive -> /2; token 1: seen, negative -> *2; tokens 2, 3 unseen: unchanged;
    # token 4: seen (/2 -> 0.5), generated twice: - 0.5 presence - 0.25 * 2 frequency = -0.5
    assert torch.allclose(out, torch.tensor([[1.0, -4.0, 2.0, -2.0, -0.5]]))


@pytest.mark.parametrize("kwargs, expected", [(dict(repetition_penalty=2.0), [1.0, -2.0, 0.5]),
                                              (dict(presence_penalty=0.5), [2.0, -2.0, 0.5]),
                                              (dict(frequency_penalty=0.3), [2.0, -2.0, 0.4])])
def test_each_penalty_alone_is_applied(kwargs, expected):
    """Any one penalty switched on by itself changes the logits process_logits returns (seen: token 0 once and
    token 2 three times; generated: token 2 twice)."""
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen, generated = torch.tensor([[1.0, 0.0, 3.0]]), torch.tensor([[0.0, 0.0, 2.0]])
    assert torch.allclose(G.process_logits(logits, G.Sampling(**kwargs), seen, generated), torch.tensor([expected]))


@pytest.mark.parametrize("kwargs", [dict(top_k=10), dict(top_p=0.7), dict(min_p=0.1), dict(temperature=0.5, top_p=0.8),
                                    dict(temperature=2.0, min_p=0.2), dict(top_k=5, top_p=0.5),
                                    dict(temperature=0.7, top_k=8, top_p=0.6, min_p=0.3, repetition_penalty=1.5),
                                    dict(min_p=1.0)])  # the cut at the top token's own probability keeps it
def test_process_logits_matches_transformers_processors(kwargs):
    """The same tokens filtered and the same logits kept as HF's processors chained in HF's order: repetition
    penalty, temperature, top-k, top-p, min-p."""
    torch.manual_seed(0)
    logits, ids = 3 * torch.randn(6, 50), torch.randint(0, 50, (6, 12))
    seen = torch.zeros(6, 50).scatter_add_(1, ids, torch.ones(6, 12))
    s = G.Sampling(**kwargs)
    ref = logits.clone()
    for proc in [transformers.RepetitionPenaltyLogitsProcessor(s.repetition_penalty),
                 transformers.TemperatureLogitsWarper(s.temperature),
                 s.top_k and transformers.TopKLogitsWarper(s.top_k), s.top_p and transformers.TopPLogitsWarper(s.top_p),
                 s.min_p and transformers.MinPLogitsWarper(s.min_p)]:
        ref = proc(ids, ref) if proc else ref
    out = G.process_logits(logits, s, seen, torch.zeros_like(seen))
    kept = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), kept) and 0 < kept.sum() < kept.numel()
    assert torch.allclose(out[kept], ref[kept])


def test_penalties_ignore_padding_and_count_prompt_for_repetition_only():
    idx, mask = G.left_pad([[7, 8], [9]], pad_id=3)
    counts = G.TokenCounts(idx, mask.bool(), 10, enabled=True)
    assert counts.seen[1, 3] == 0 and counts.seen[0, 3] == 0  # pad id 3 never counted
    assert counts.seen[0, 7] == 1 and counts.seen[1, 9] == 1
    assert counts.generated.sum() == 0  # the prompt is not "generated"
    counts.add(torch.tensor([7, 7]))
    assert counts.seen[0, 7] == 2 and counts.generated[0, 7] == 1 and counts.generated[1, 7] == 1


def test_temperature_and_greedy():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    assert torch.allclose(G.process_logits(logits, G.Sampling(temperature=2.0)), logits / 2)
    assert G.sample(logits, G.GREEDY).item() == 2
    assert G.logits_to_probs(logits, G.GREEDY).tolist() == [[0.0, 0.0, 1.0]]
    assert torch.allclose(G.logits_to_probs(logits, G.Sampling(temperature=2.0)), (logits / 2).softmax(-1))
    # below 1e-5 it is greedy (as in vLLM): 1e-45 divided 100 into inf, and the draw crashed on NaN
    tiny_t = G.Sampling(temperature=1e-45)
    assert tiny_t.greedy and G.sample(torch.tensor([[100.0, 200.0, -50.0]]), tiny_t).item() == 1
    assert not G.Sampling(temperature=1e-5).greedy
    # sampling at temperature 1 follows softmax: a cheap frequency check with a fixed seed
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([G.sample(logits.repeat(2000, 1), G.Sampling(), generator=g) for _ in range(5)]).flatten()
    freq = torch.bincount(draws, minlength=3).float() / draws.numel()
    assert torch.allclose(freq, logits.softmax(-1)[0], atol=0.02)


def test_draw_follows_probs_per_row_and_never_picks_zero_probability():
    """draw (gpt2.py's inverse CDF) against the exact distribution, rows independent; zero-probability tokens, first
    and last included, never come out; unnormalized rows (a speculative residual) are fine."""
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0], [0.1, 0.0, 0.2, 0.0, 0.0, 0.7]])
    g = torch.Generator().manual_seed(0)
    out = torch.stack([G.draw(probs * 3.0, g) for _ in range(4000)])  # (4000, 2)
    for row in range(2):
        counts = torch.bincount(out[:, row], minlength=6).float()
        assert counts[probs[row] == 0].sum() == 0
        assert chi_square_pvalue(counts, probs[row]) > 1e-3
    assert G.draw(torch.tensor([0.0, 0.0, 1.0]), g).shape == ()


def test_vocab_size_never_draws_padding_ids():
    """A model whose vocabulary is padded past the tokenizer's: the padding ids win every argmax and hold
    almost all the probability, yet Sampling(vocab_size=...) never draws them, with or without penalties."""
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    assert G.process_logits(logits, G.Sampling(vocab_size=2)).tolist() == [[1.0, 2.0, -math.inf]]
    assert G.process_logits(logits, G.Sampling(vocab_size=3)).tolist() == [[1.0, 2.0, 3.0]]
    logits = torch.cat((torch.randn(400, 6), torch.full((400, 2), 30.0)), dim=1)  # ids 6, 7: padding
    g = torch.Generator().manual_seed(0)
    for s in (G.GREEDY, G.Sampling(), G.Sampling(temperature=2.0, top_k=7, top_p=0.99, min_p=0.0),
              G.Sampling(repetition_penalty=1.5, presence_penalty=1.0)):
        seen = torch.ones_like(logits)
        assert G.sample(logits, s, seen, seen, g).min() >= 6  # unmasked: only padding ids come out
        assert G.sample(logits, replace(s, vocab_size=6), seen, seen, g).max() < 6


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(temperature=-1.0), "temperature"),
    (dict(top_k=0), "top_k"), (dict(min_p=2.0), "min_p"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(vocab_size=0), "vocab_size"), (dict(temperature=float("inf")), "finite"),
    (dict(temperature=float("nan")), "temperature"), (dict(presence_penalty=float("nan")), "presence_penalty"),
    (dict(frequency_penalty=float("inf")), "frequency_penalty"), (dict(min_p=-0.1), "min_p"),
    (dict(repetition_penalty=-1.0), "repetition_penalty")])
def test_bad_sampling_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        G.Sampling(**kwargs)


# -- the generate loop --------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: "-".join(f"{v}" for v in s.values()))
def test_cache_equals_no_cache_single_and_padded_batch(scheme, device, monkeypatch):
    model = tiny(**scheme).to(device)
    idx = torch.tensor([PROMPTS[0]], device=device)
    made = record_caches(monkeypatch)
    a = G.generate(model, idx, 20, G.GREEDY)
    assert len(set(a[0, -20:].tolist())) > 3  # the test model does not just repeat a token
    assert torch.equal(a, G.generate(model, idx, 20, G.GREEDY, use_cache=False))
    # the cache that produced `a`: as long as prompt + new tokens (a rolling one: sinks + window + 1 spare)
    c = made[0]
    assert c.size == (c.n_sink + c.window + 1 if c.rolling else 7 + 20)
    pidx, mask = G.left_pad(PROMPTS, device=device)
    b = G.generate(model, pidx, 12, G.GREEDY, attention_mask=mask)
    assert torch.equal(b, G.generate(model, pidx, 12, G.GREEDY, attention_mask=mask, use_cache=False))
    for i, p in enumerate(PROMPTS):  # padding changes nothing: each row equals its prompt alone
        assert torch.equal(b[i, -12:], G.generate(model, torch.tensor([p], device=device), 12, G.GREEDY)[0, -12:])


def test_cache_equals_no_cache_with_penalties_and_sampling(device):
    model = tiny(pos_emb="rope").to(device)
    pidx, mask = G.left_pad(PROMPTS, device=device)
    s = G.Sampling(temperature=0.9, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3, presence_penalty=0.4,
                   frequency_penalty=0.2)
    a = G.generate(model, pidx, 15, s, attention_mask=mask, generator=torch.Generator(device).manual_seed(3))
    b = G.generate(model, pidx, 15, s, attention_mask=mask, generator=torch.Generator(device).manual_seed(3),
                   use_cache=False)
    assert torch.equal(a, b)


def test_per_row_eos_stop():
    """A row that produced eos_id keeps emitting it; the loop ends at the step the last row ends, and runs to
    max_new_tokens while any row has not."""
    model = tiny()
    pidx, mask = G.left_pad(PROMPTS)
    T = pidx.size(1)
    free = G.generate(model, pidx, 15, G.GREEDY, attention_mask=mask)[:, T:].tolist()
    first = lambda t: [row.index(t) if t in row else None for row in free]
    # an end-of-text every row reaches, each at its own step; and one that row 0 never produces
    every = min((t for t in range(64) if None not in first(t) and len(set(first(t))) == 3), key=lambda t: max(first(t)))
    some = next(t for t in range(64) if first(t)[0] is None and first(t)[1] is not None)
    for eos in (every, some):
        out = G.generate(model, pidx, 15, G.GREEDY, attention_mask=mask, eos_id=eos)[:, T:]
        stops = [15 if i is None else i for i in first(eos)]
        assert out.size(1) == min(15, max(stops) + 1)
        for i, stop in enumerate(stops):
            assert out[i, :stop + 1].tolist() == free[i][:stop + 1][:out.size(1)]  # same tokens up to the eos
            assert (out[i, stop:] == eos).all()  # then only eos
    assert max(first(every)) + 1 < 15  # the first case did end early


def test_greedy_matches_transformers(tmp_path, device):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(block_size=64, vocab_size=96, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():  # tied weights (HF GPT-2 ties them): scale to get variety
            if p.dim() == 2 and "wte" not in name:
                p.mul_(8)
    ours.save_pretrained(tmp_path)
    ours = ours.to(device)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).to(device).eval()
    hf_kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)
    idx = torch.tensor([[5, 17, 33, 2, 9]], device=device)
    a = G.generate(ours, idx, 20, G.GREEDY)
    assert len(set(a[0, -20:].tolist())) > 3
    assert torch.equal(a, hf.generate(idx, attention_mask=torch.ones_like(idx), **hf_kw))
    pidx, mask = G.left_pad(PROMPTS, device=device)
    assert torch.equal(G.generate(ours, pidx, 20, G.GREEDY, attention_mask=mask),
                       hf.generate(pidx, attention_mask=mask, **hf_kw))
    assert torch.equal(G.generate(ours, idx, 20, G.Sampling(temperature=0, repetition_penalty=1.5)),
                       hf.generate(idx, attention_mask=torch.ones_like(idx), repetition_penalty=1.5, **hf_kw))


# -- past the context window ----------------------------------------------------------------------------

@pytest.mark.parametrize("pos_emb", ["rope", "sinusoidal"])
def test_streaming_past_the_context_with_rolling_cache(pos_emb, monkeypatch):
    model = tiny(block=16, pos_emb=pos_emb, window=8, n_sink=2)
    idx = torch.tensor([PROMPTS[0]])
    made = record_caches(monkeypatch)
    a = G.generate(model, idx, 60, G.GREEDY)  # 67 tokens, four times block_size
    assert a.shape == (1, 67)
    (cache,) = made
    assert int(cache.next_pos[0]) == 66  # every token but the last went through this one cache
    assert cache.k[0].size(2) == 2 + 8 + 1  # and its memory stayed at sinks + window (+ the spare slot)
    assert torch.equal(a, G.generate(model, idx, 60, G.GREEDY, use_cache=False))  # full recompute


@pytest.mark.parametrize("window", [None, 6])
def test_learned_positions_crop_past_the_context(window):
    """Learned position embeddings end at block_size, sliding window or not (a windowed model's rolling cache
    would otherwise step on past it)."""
    model = tiny(block=16, window=window)
    idx = torch.tensor([PROMPTS[0]])
    with pytest.warns(UserWarning, match="context full"):
        a = G.generate(model, idx, 30, G.GREEDY)
    b = G.generate(model, idx, 30, G.GREEDY, use_cache=False)
    assert torch.equal(a, b)
    # the token after the context fills is what the model says about the last block_size tokens alone
    ctx = a[:, 17 - 16:17]
    assert a[0, 17] == model(ctx)[0][0, -1].argmax()


def test_prompt_longer_than_context_is_an_error():
    with pytest.raises(ValueError, match="longer than the context"):
        G.generate(tiny(block=16), torch.zeros(1, 17, dtype=torch.long), 2)


@pytest.mark.parametrize("idx, match", [(torch.zeros(1, 0, dtype=torch.long), "empty"),
                                        (torch.tensor([[1.0, 2.0]]), "LongTensor"),
                                        (torch.tensor([1, 2]), "LongTensor")])
def test_bad_prompt(idx, match):
    with pytest.raises(ValueError, match=match):
        G.generate(tiny(), idx, 2)


@pytest.mark.parametrize("mask, match", [([[1, 0, 1]], "left padding"), ([[1, 1]], "shape")])
def test_bad_attention_mask(mask, match):
    with pytest.raises(ValueError, match=match):
        G.generate(tiny(), torch.tensor([[1, 2, 3]]), 2, attention_mask=torch.tensor(mask))


# -- speculative decoding -------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3, 6])
def test_speculative_greedy_equals_target_greedy(k):
    target = tiny(n_layer=3)
    draft = noisy_copy(target, 0.05)
    idx = torch.tensor([PROMPTS[0]])
    ref = G.generate(target, idx, 30, G.GREEDY)
    stats = {}
    out = G.speculative_generate(target, draft, idx, 30, G.GREEDY, num_draft=k, stats=stats)
    assert torch.equal(out, ref)
    assert 0 < stats["accepted"] < stats["proposed"]  # some rejections: the rollback path is exercised
    assert stats["target_passes"] < 30 or k == 1


def test_speculative_greedy_with_penalties_and_unrelated_draft():
    target = tiny(n_layer=3)
    idx = torch.tensor([PROMPTS[0]])
    s = G.Sampling(temperature=0, repetition_penalty=1.4, presence_penalty=0.5, frequency_penalty=0.2)
    ref = G.generate(target, idx, 25, s)
    for draft in (noisy_copy(target, 0.02), tiny(n_layer=1, n_embd=16, seed=5)):
        assert torch.equal(G.speculative_generate(target, draft, idx, 25, s, num_draft=4), ref)


def test_speculative_rows_past_the_tokenizer():
    # one tokenizer of 64 ids; the target pads its vocabulary to 80 rows (as train_gpt2.py rounds up to a
    # multiple of 64), the draft has 64: allowed once Sampling(vocab_size=64) says which ids can be drawn
    target, draft = tiny(vocab=80, n_layer=3), tiny(vocab=64, n_layer=1, n_embd=16, seed=5)
    idx = torch.tensor([PROMPTS[0]])
    s = G.Sampling(temperature=0, repetition_penalty=1.3, vocab_size=64)
    ref = G.generate(target, idx, 25, s)
    assert torch.equal(G.speculative_generate(target, draft, idx, 25, s, num_draft=4), ref)
    assert torch.equal(G.speculative_generate(draft, target, idx, 25, s, num_draft=4), G.generate(draft, idx, 25, s))
    with pytest.raises(ValueError, match="vocabulary"):  # without it, ids 64-79 of the target could be drawn
        G.speculative_generate(target, draft, idx, 25, G.GREEDY)


def greedy_text(model, prompt, generated, k, s):
    """k greedy tokens after prompt + generated, the whole text recomputed per token, the penalties' counts
    taken by hand (seen: all of it; generated: what follows the prompt)."""
    out, V = [], model.config.vocab_size
    for _ in range(k):
        seq = prompt + generated + out
        seen = torch.bincount(torch.tensor(seq), minlength=V).float()[None]
        gen = torch.bincount(torch.tensor(generated + out, dtype=torch.long), minlength=V).float()[None]
        out.append(int(G.process_logits(model(torch.tensor([seq]))[0][:, -1], s, seen, gen).argmax()))
    return out


PENALIZED = G.Sampling(temperature=0, repetition_penalty=2.0, presence_penalty=3.0, frequency_penalty=2.0)


@pytest.mark.parametrize("noise, s", [(0.0, G.GREEDY), (0.05, G.GREEDY), (0.0, PENALIZED), (0.01, PENALIZED)])
@torch.no_grad()
def test_speculative_greedy_stats_follow_the_drafts_own_greedy_text(noise, s):
    """Each round the draft proposes its own greedy continuation of the accepted text (k = 4, fewer at the end
    so nothing runs past max_new_tokens), penalties counting its own proposals; the target keeps the longest
    prefix that matches its greedy text, plus one token. An identical draft has every proposal accepted."""
    target = tiny(n_layer=3)
    draft = noisy_copy(target, noise)
    prompt, N, K = PROMPTS[0], 20, 4
    ref = greedy_text(target, prompt, [], N, s)
    pos, want = 0, dict(proposed=0, accepted=0, target_passes=0)
    while pos < N:
        k = min(K, N - pos - 1)
        proposal = greedy_text(draft, prompt, ref[:pos], k, s)
        n = next((i for i, t in enumerate(proposal) if t != ref[pos + i]), k)
        want["proposed"] += k
        want["accepted"] += n
        want["target_passes"] += 1
        pos += n + 1
    stats = {}
    out = G.speculative_generate(target, draft, torch.tensor([prompt]), N, s, num_draft=K, stats=stats)
    assert out[0, len(prompt):].tolist() == ref
    assert stats == want
    assert (want["accepted"] == want["proposed"]) == (noise == 0)


@pytest.mark.parametrize("prompt", [[5], [5, 6], [5, 6, 7]])
def test_speculative_greedy_short_prompts(prompt):
    target = tiny(n_layer=3)
    idx = torch.tensor([prompt])
    out = G.speculative_generate(target, noisy_copy(target, 0.05), idx, 15, G.GREEDY, num_draft=3)
    assert torch.equal(out, G.generate(target, idx, 15, G.GREEDY))


def test_speculative_generation_may_end_exactly_past_the_context():
    """The last new token is never fed back, so T + max_new_tokens = block_size + 1 fits, as in generate() (it
    was refused); one more token is refused with the number that fits; a sliding-window model is named as such."""
    target = tiny(n_layer=3, block=16)
    idx = torch.tensor([list(range(5, 17))])  # 12 tokens
    out = G.speculative_generate(target, noisy_copy(target, 0.05), idx, 5, G.GREEDY, num_draft=3)
    assert torch.equal(out, G.generate(target, idx, 5, G.GREEDY))
    with pytest.raises(ValueError, match="12 prompt \\+ 6 new tokens - 1 > block_size 16; generate at most 5"):
        G.speculative_generate(target, noisy_copy(target, 0.05), idx, 6, G.GREEDY)
    with pytest.raises(ValueError, match="the draft has a sliding window \\(8 tokens\\)"):
        G.speculative_generate(target, tiny(block=16, window=8), idx, 2, G.GREEDY)


def test_speculative_stops_at_eos():
    """The text ends with the first eos_id, as generate() ends a batch of one."""
    target = tiny(n_layer=3)
    idx = torch.tensor([PROMPTS[0]])
    free = G.generate(target, idx, 25, G.GREEDY)[0, 7:].tolist()
    eos = next(t for t in free[5:] if t not in free[:5])  # first produced at step >= 6
    stop = free.index(eos)
    out = G.speculative_generate(target, noisy_copy(target, 0.05), idx, 25, G.GREEDY, num_draft=4, eos_id=eos)
    assert out[0, 7:].tolist() == free[:stop + 1]
    assert torch.equal(out, G.generate(target, idx, 25, G.GREEDY, eos_id=eos))


def test_speculative_accept_rule_gives_target_distribution():
    """The acceptance rule alone, on hand-made p and q: the first emitted token must follow p[0]."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    N = 10000
    first = torch.empty(N, dtype=torch.long)
    for i in range(N):
        d = torch.multinomial(q[0], 1, generator=g)
        n, nxt = G.speculative_accept(p, q, d, g)
        first[i] = d[0] if n >= 1 else nxt
    freq = torch.bincount(first, minlength=4).float() / N
    assert (freq - p[0]).abs().max() < 0.02  # 4 standard deviations at N = 10000
    assert (freq - q[0]).abs().max() > 0.2  # sanity: the draft's own distribution would fail


def chi_square_pvalue(counts, probs):
    """Pearson chi-square with the Wilson-Hilferty normal approximation of the tail (no scipy)."""
    if counts[probs == 0].sum() > 0:
        return 0.0  # an outcome of probability 0 happened: impossible under this distribution
    counts, probs = counts[probs > 0], probs[probs > 0]
    n = counts.sum()
    keep = probs * n >= 5  # merge rare cells into one, as the test requires expected counts >= 5
    obs = torch.cat((counts[keep], counts[~keep].sum()[None])) if (~keep).any() else counts
    exp = torch.cat((probs[keep] * n, (probs[~keep] * n).sum()[None])) if (~keep).any() else probs * n
    stat, dof = float(((obs - exp) ** 2 / exp).sum()), len(obs) - 1
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


@torch.no_grad()
def test_speculative_sampling_follows_target_distribution():
    """End to end on a vocabulary of 8: the joint distribution of the first two generated tokens, from
    speculative sampling with top-k and temperature (k=3 drafted per round), against the target's exact
    one (enumerated)."""
    V = 8
    target = tiny(vocab=V, n_layer=2, n_embd=16)
    draft = tiny(vocab=V, n_layer=1, n_embd=16, seed=7)
    s = G.Sampling(temperature=1.5, top_k=6)
    idx = torch.tensor([[1, 2, 3]])
    probs = lambda m, x: G.logits_to_probs(m(x)[0][:, -1], s)[0]
    p1 = probs(target, idx)
    joint = torch.stack([p1[a] * probs(target, torch.cat((idx, torch.tensor([[a]])), 1)) for a in range(V)]).flatten()
    draft_joint = torch.stack([probs(draft, idx)[a] * probs(draft, torch.cat((idx, torch.tensor([[a]])), 1))
                               for a in range(V)]).flatten()
    g, N, stats = torch.Generator().manual_seed(0), 2000, {}
    counts = torch.zeros(V * V)
    for _ in range(N):
        out = G.speculative_generate(target, draft, idx, 4, s, num_draft=3, generator=g, stats=stats)
        counts[out[0, 3] * V + out[0, 4]] += 1
    assert chi_square_pvalue(counts, joint) > 1e-3
    assert stats["accepted"] > 0 and stats["accepted"] < stats["proposed"]
    assert chi_square_pvalue(counts, draft_joint) < 1e-6  # the test can tell the draft from the target


def test_speculative_bad_input():
    target = tiny()
    with pytest.raises(ValueError, match="vocabulary"):
        G.speculative_generate(target, tiny(vocab=32), torch.tensor([[1, 2]]), 4)
    with pytest.raises(ValueError, match="batch 1"):
        G.speculative_generate(target, target, torch.tensor([[1, 2], [3, 4]]), 4)
    with pytest.raises(ValueError, match="context"):
        G.speculative_generate(target, target, torch.tensor([[1, 2]]), 100)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        G.speculative_generate(target, target, torch.tensor([[1, 2]]), 0)


def test_left_pad():
    idx, mask = G.left_pad([[1, 2, 3], [4]], pad_id=9)
    assert idx.tolist() == [[1, 2, 3], [9, 9, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="at least one token"):
        G.left_pad([[1], []])


# -- compiled decode: the static-shape cache, and (slow, opt-in) torch.compile itself --------------------

@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_static_cache_matches_gpt2_cache(pos_emb, device):
    model = tiny(pos_emb=pos_emb).to(device)
    pidx, mask = G.left_pad(PROMPTS, device=device)
    with torch.no_grad():
        ref, static = model.new_cache(3, 30), G.StaticKVCache(model.config, 3, 30, device=device)
        a = model(pidx, cache=ref, attention_mask=mask)[0][:, -1]
        b = model(pidx, cache=static, attention_mask=mask)[0][:, -1]
        assert torch.allclose(a, b, atol=1e-5)
        for _ in range(5):
            tok = a.argmax(-1, keepdim=True)
            a, b = model(tok, cache=ref)[0][:, -1], model(tok, cache=static)[0][:, -1]
            assert torch.allclose(a, b, atol=1e-5)
        assert static.length == ref.length == pidx.size(1) + 5 and int(static.col) == static.length


@pytest.mark.parametrize("scheme", [dict(pos_emb="learned"), dict(pos_emb="rope", window=8, n_sink=2)])
def test_compile_path_with_compiler_stubbed_matches_eager(scheme, device, monkeypatch):
    """generate(compile=True) with torch.compile replaced by the identity: the decode step is handed to
    torch.compile once, and the static cache (the rolling one for a sliding-window model) and the step's
    wrapper, run eagerly (cheap), give the tokens of the plain path."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compiled.append(fn) or fn)
    model = tiny(block=32, **scheme).to(device)
    pidx, mask = G.left_pad(PROMPTS, device=device)
    made = record_caches(monkeypatch)
    out = G.generate(model, pidx, 20, G.GREEDY, attention_mask=mask, compile=True)
    assert len(compiled) == 1
    if "window" in scheme:
        assert type(made[0]) is not G.StaticKVCache and made[0].rolling
    else:
        assert type(made[0]) is G.StaticKVCache and made[0].length == pidx.size(1) + 19
    assert torch.equal(out, G.generate(model, pidx, 20, G.GREEDY, attention_mask=mask))


@pytest.mark.skipif(not os.environ.get("GENERATE_TEST_COMPILE"),
                    reason="torch.compile takes 20-60 s on a 2-core CPU; set GENERATE_TEST_COMPILE=1 to run")
@pytest.mark.parametrize("scheme", [dict(pos_emb="learned"), dict(pos_emb="rope", window=8, n_sink=2)])
def test_compiled_decode_matches_eager(scheme, device, monkeypatch):
    model = tiny(block=32, **scheme).to(device)
    idx = torch.tensor([PROMPTS[0]], device=device)
    made = record_caches(monkeypatch)
    out = G.generate(model, idx, 20, G.GREEDY, compile=True)
    assert isinstance(made[0], G.StaticKVCache) == ("window" not in scheme)  # the rolling cache is static already
    assert torch.equal(out, G.generate(model, idx, 20, G.GREEDY))


# -- the command line, with a stand-in byte tokenizer (the CLI only needs encode / decode / eot_token / n_vocab)

class ByteTokenizer:
    n_vocab = 50257

    def __init__(self, eot_token=50256):
        self.eot_token = eot_token

    def encode(self, text, allowed_special=()):
        return list(text.encode())

    def decode(self, ids):
        return bytes(i % 256 for i in ids).decode("utf-8", errors="replace")


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    """run(*argv, tok=...) -> captured (out, err) of generate.py's main on a 1-layer random model (run.model)."""
    torch.manual_seed(0)
    path = str(tmp_path / "m.pt")
    model = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=16)).eval()
    save_checkpoint(path, model)

    def run(*argv, tok=None):
        monkeypatch.setitem(sys.modules, "bpe", types.SimpleNamespace(load_gpt2=lambda: tok or ByteTokenizer()))
        G.main(["--model", path, "--max-new-tokens", "8", "--device", "cpu", "--seed", "3", *argv])
        return capsys.readouterr()
    run.model, run.path = model, path
    return run


def cli_reference(cli, text, sampling, n, max_new=8):
    """What generate() makes of the CLI's prompt: n rows of new token ids, with the CLI's --seed 3."""
    idx = torch.tensor([list(text.encode())] * n)
    out = G.generate(cli.model, idx, max_new, sampling, generator=torch.Generator().manual_seed(3))
    return out[:, idx.size(1):].tolist()


@pytest.mark.parametrize("argv, sampling", [(["--temperature", "0"], G.GREEDY),
                                            (["--temperature", "0.7", "--top-k", "5"], G.Sampling(0.7, top_k=5))])
def test_cli_streams_what_generate_returns(cli, argv, sampling):
    (new,) = cli_reference(cli, "hi", sampling, 1)
    out = cli("--prompt", "hi", "--ignore-eos", *argv)
    assert out.out == "hi" + ByteTokenizer().decode(new) + "\n" and "8 tokens" in out.err
    assert cli("--prompt", "hi", "--ignore-eos", "--no-cache", *argv).out == out.out
    rows = cli_reference(cli, "hi", sampling, 2)  # --num-samples 2: one batch, printed at the end
    out = cli("--prompt", "hi", "--ignore-eos", "--num-samples", "2", *argv)
    assert out.out == "".join(f"{'-' * 20} sample {i + 1}\nhi{ByteTokenizer().decode(r)}\n" for i, r in enumerate(rows))


def test_cli_stops_at_the_tokenizers_end_of_text(cli):
    (new,) = cli_reference(cli, "hi", G.GREEDY, 1)
    eot = next(t for t in new[2:] if t not in new[:2])  # a token first produced at step >= 3
    stop = new.index(eot)
    out = cli("--prompt", "hi", "--temperature", "0", tok=ByteTokenizer(eot_token=eot))
    assert out.out == "hi" + ByteTokenizer().decode(new[:stop]) + "\n"
    out = cli("--prompt", "hi", "--temperature", "0", "--num-samples", "2", tok=ByteTokenizer(eot_token=eot))
    assert out.out.count("hi" + ByteTokenizer().decode(new[:stop]) + "\n") == 2


def test_cli_speculative_prints_the_targets_greedy_text(cli):
    """--draft-model (here the model itself) with --num-samples 2: one speculative run per sample, each the
    target's greedy text, and the acceptance line."""
    (new,) = cli_reference(cli, "hi", G.GREEDY, 1)
    out = cli("--prompt", "hi", "--temperature", "0", "--ignore-eos", "--draft-model", cli.path, "--num-samples", "2")
    assert out.out == "".join(f"{'-' * 20} sample {i + 1}\nhi{ByteTokenizer().decode(new)}\n" for i in range(2))
    assert out.err.count("[speculative:") == 2


class LetterTokenizer(ByteTokenizer):
    """Every id decodes to one letter, so that any piece of the output is a clean stop string."""

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


@pytest.mark.parametrize("n", ["1", "2"])
def test_cli_stop_string_ends_the_text(cli, n):
    """The text is printed up to the first occurrence of a --stop string, streamed or not."""
    (new,) = cli_reference(cli, "hi", G.GREEDY, 1)
    body = LetterTokenizer().decode(new)
    stop = body[-2:]
    out = cli("--prompt", "hi", "--temperature", "0", "--ignore-eos", "--num-samples", n, "--stop", stop,
              tok=LetterTokenizer())
    text = "hi" + body[:body.index(stop)] + "\n"
    assert out.out == (text if n == "1" else "".join(f"{'-' * 20} sample {i + 1}\n{text}" for i in range(2)))


@pytest.mark.parametrize("n", ["1", "2"])
def test_cli_the_stop_string_complete_first_wins_streamed_or_not(cli, n):
    """Two stop strings, the longer starting first but complete later: the text ends before the one complete
    first, whether it is streamed (one sample) or printed per sample (the batch cut at the longer one)."""
    (new,) = cli_reference(cli, "hi", G.GREEDY, 1)
    body = LetterTokenizer().decode(new)
    i = next(i for i in range(len(body) - 4)  # long = body[i:i+4] first seen at i, short = body[i+2] at i+2
             if body.find(body[i:i + 4]) == i and body.find(body[i + 2]) == i + 2)
    out = cli("--prompt", "hi", "--temperature", "0", "--ignore-eos", "--num-samples", n, "--stop", body[i:i + 4],
              "--stop", body[i + 2], tok=LetterTokenizer())
    text = "hi" + body[:i + 2] + "\n"
    assert out.out == (text if n == "1" else "".join(f"{'-' * 20} sample {k + 1}\n{text}" for k in range(2)))
    assert G.stream_text(LetterTokenizer(), [0, 1, 2, 3, 4], ["abcd", "c"]) == "ab"  # the docstring's example


def test_cli_names_compile_where_it_is_not_used(cli, monkeypatch):
    """--compile compiles generate()'s cached decode step: with --no-cache (and --draft-model) it is not used,
    and the CLI says so (it was ignored in silence); with the cache it says nothing."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    assert "note: --compile is not used with --no-cache" in cli("--compile", "--no-cache", "--temperature", "0").err
    assert "note:" not in cli("--compile", "--temperature", "0").err
    out = cli("--compile", "--draft-model", cli.path, "--temperature", "0")
    assert "note: --compile is not used with --draft-model" in out.err


@pytest.mark.parametrize("argv, match", [(["--top-p", "0"], "top_p"), (["--temperature", "-1"], "temperature"),
                                         (["--num-samples", "0"], "--num-samples"),
                                         (["--max-new-tokens", "0"], "--max-new-tokens"),
                                         (["--chat"], "--chat needs a Llama"),
                                         (["--draft-model", "d.pt", "--no-cache"], "needs the KV cache"),
                                         (["--model", "no-such-model"], "unknown model")])
def test_cli_bad_input(cli, capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        cli(*argv)
    assert e.value.code not in (0, None)
    assert re.search(match, f"{e.value.code} {capsys.readouterr().err}")


def test_cli_unavailable_device_is_a_usage_error(cli, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:  # was a ValueError traceback
        cli("--device", "cuda")
    assert e.value.code == 2 and "no CUDA GPU is visible; use --device cpu" in capsys.readouterr().err


def test_cli_refuses_a_vocabulary_smaller_than_the_tokenizers(cli, tmp_path):
    small = str(tmp_path / "small.pt")
    save_checkpoint(small, GPT(GPTConfig(block_size=64, vocab_size=300, n_layer=1, n_head=2, n_embd=16)))
    with pytest.raises(SystemExit, match="vocabulary of 300"):
        cli("--model", small)


def test_cli_speaks_the_tokenizer_a_checkpoint_recorded(tmp_path, capsys):
    """A checkpoint of train_gpt2.py --tokenizer bytes (here: 256 bytes + <|endoftext|>, a 320-id vocabulary)
    is prompted and decoded with its own tokenizer, not GPT-2's, and stops at that tokenizer's end of text."""
    import bpe
    tok = bpe.byte_tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=320, n_layer=1, n_head=2, n_embd=16)).eval()
    path = str(tmp_path / "bytes.pt")
    save_checkpoint(path, model, tokenizer=tok.dumps())
    idx = torch.tensor([tok.encode("Q: 1 + 2?")])
    out = G.generate(model, idx, 12, replace(G.GREEDY, vocab_size=tok.n_vocab), generator=torch.Generator())
    new = out[0, idx.size(1):].tolist()
    G.main(["--model", path, "--prompt", "Q: 1 + 2?", "--max-new-tokens", "12", "--temperature", "0",
            "--ignore-eos", "--device", "cpu"])
    assert capsys.readouterr().out == tok.decode(tok.encode("Q: 1 + 2?") + new) + "\n"
    with torch.no_grad():  # the end-of-text id wins every step: the CLI stops before printing anything new
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.transformer.wte.weight.zero_()
        model.transformer.wte.weight[tok.eot_token, 0] = 1.0
    save_checkpoint(path, model, tokenizer=tok.dumps())
    G.main(["--model", path, "--prompt", "hi", "--temperature", "0", "--device", "cpu"])
    assert capsys.readouterr().out == "hi\n"
    plain = bpe.Tokenizer("gpt2")  # 256 bytes, no <|endoftext|>: nothing to stop at, the text runs its length
    save_checkpoint(path, model, tokenizer=plain.dumps())
    G.main(["--model", path, "--prompt", "hi", "--temperature", "0", "--max-new-tokens", "3", "--device", "cpu"])
    out = capsys.readouterr()
    assert out.out.startswith("hi") and "3 tokens" in out.err
    with pytest.raises(SystemExit, match="the prompt is empty, and this tokenizer has no <\\|endoftext\\|> token "
                                         "to start a document with; give a prompt"):  # it blamed the tokenizer
        G.main(["--model", path, "--prompt", "", "--temperature", "0", "--device", "cpu"])
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0, got -3"):  # "KV cache full"
        G.generate(model, torch.tensor([[1, 2, 3]]), -3)


def test_cli_refuses_a_draft_with_another_tokenizer(tmp_path):
    """Speculative decoding with a draft whose checkpoint records another tokenizer of the same size (here the
    256 bytes + <|endoftext|> vs 256 bytes with one merge): a clear error, not a draft proposing wrong tokens."""
    import bpe
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=320, n_layer=1, n_head=2, n_embd=16)).eval()
    target, draft = str(tmp_path / "target.pt"), str(tmp_path / "draft.pt")
    save_checkpoint(target, model, tokenizer=bpe.byte_tokenizer().dumps())
    other = bpe.Tokenizer("gpt2")
    other.train("aaaa " * 50, 257)
    save_checkpoint(draft, model, tokenizer=other.dumps())
    argv = ["--model", target, "--prompt", "hi", "--temperature", "0", "--max-new-tokens", "4", "--device", "cpu"]
    with pytest.raises(SystemExit, match="--draft-model speaks another tokenizer"):
        G.main([*argv, "--draft-model", draft])
    G.main([*argv, "--draft-model", target])  # the same tokenizer: runs


class StrictTokenizer(ByteTokenizer):
    """Refuses ids past its vocabulary, like tiktoken's GPT-2 encoding."""

    def decode(self, ids):
        assert all(0 <= i < self.n_vocab for i in ids), f"id past the vocabulary: {max(ids)}"
        return super().decode(ids)


@pytest.mark.parametrize("argv", [["--temperature", "0"], ["--temperature", "0.7"],
                                  ["--temperature", "0.7", "--num-samples", "2"]])
def test_cli_never_samples_the_padding_of_a_padded_vocabulary(cli, tmp_path, argv):
    """A vocabulary padded to 50,304 (train_gpt2.py's multiple of 64): the model is built so that the 47
    padding ids get almost all the probability (the final norm outputs one vector b, and their rows of
    lm_head are b); the CLI must still print only the tokenizer's ids: those generate() picks with
    vocab_size=50257, the constant argmax of the real ids when greedy."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=1, n_head=2, n_embd=16)).eval()
    with torch.no_grad():
        b = torch.randn(16)
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(b)
        model.lm_head.weight[50257:] = b
    padded = str(tmp_path / "padded.pt")
    save_checkpoint(padded, model)
    idx = torch.tensor([list(b"hi")])
    assert G.generate(model, idx, 4, G.Sampling(temperature=0.7))[0, 2:].min() >= 50257  # padding wins unmasked
    out = cli("--model", padded, "--prompt", "hi", "--ignore-eos", *argv, tok=StrictTokenizer())
    if argv[1] == "0":
        new = G.generate(model, idx, 8, G.Sampling(temperature=0, vocab_size=50257))[0, 2:].tolist()
        assert out.out == "hi" + ByteTokenizer().decode(new) + "\n"
    assert "8 tokens" in out.err or "16 tokens" in out.err


def typed(lines):
    """A stand-in for input(): the given lines, then EOF (Ctrl-D)."""
    lines = iter(lines)

    def read(prompt=""):
        line = next(lines, None)
        if line is None:
            raise EOFError
        return line
    return read


def test_cli_prompt_longer_than_the_context(cli, capsys, monkeypatch):
    """Refused before anything is printed; in --interactive mode the error is shown and the session goes on."""
    with pytest.raises(SystemExit, match="prompt of 65 tokens is longer than the context"):
        cli("--prompt", "x" * 65)
    assert capsys.readouterr().out == ""
    assert cli("--prompt", "x" * 64, "--max-new-tokens", "1").out.startswith("x" * 64)  # 64 fits
    monkeypatch.setattr(builtins, "input", typed(["x" * 65, "hi"]))
    out = cli("--interactive", "--temperature", "0", "--ignore-eos")
    assert "longer than the context" in out.err
    (new,) = cli_reference(cli, "hi", G.GREEDY, 1)
    assert "hi" + ByteTokenizer().decode(new) in out.out


def test_text_stream_holds_back_split_characters_and_stop_strings():
    s = G.TextStream(ByteTokenizer())
    pieces = [s.push(b) for b in "é ok".encode()]  # é is two bytes: nothing printed after the first
    assert pieces[0] == "" and "".join(pieces) + s.finish() == "é ok"
    s, shown = G.TextStream(ByteTokenizer(), ["###"]), ""
    for b in b"abc###def":
        shown += s.push(b)
        assert "#" not in shown
        if s.stopped:
            break
    assert shown + s.finish() == "abc" and s.text == "abc###"


def test_text_stream_holds_back_exactly_len_stop_minus_one():
    s = G.TextStream(ByteTokenizer(), ["###"])
    assert [s.push(b) for b in b"ab###"] == ["", "", "a", "b", ""] and s.stopped
    assert s.finish() == ""


def test_find_stop_returns_the_earliest_stop():
    assert G.find_stop("ab##c", ["##"]) == 2
    assert G.find_stop("abcXYdefZ", ["Z", "XY"]) == 3
    assert G.find_stop("abc", ["Z", ""]) is None
