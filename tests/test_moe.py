"""Tests of moe.py: the MoE layer against the dense MLP and a naive per-token loop, the balancing losses and
the loss-free bias, capacity, checkpoint and exact resume, cached generation through generate.py.
CPU only, offline, tiny models."""

import argparse
import copy
import json
import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn as nn

import generate
import moe as M
from gpt2 import GPT, GPTConfig, lr_at


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def config(**kw):
    return GPTConfig(**{**dict(block_size=64, vocab_size=64, n_layer=2, n_head=2, n_embd=16), **kw})


def layer(seed=0, **kw):
    torch.manual_seed(seed)
    return M.MoE(config(), M.MoEConfig(**kw))


# -----------------------------------------------------------------------------
# the layer's computation


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_one_expert_top1_no_capacity_is_the_dense_model(mlp):
    torch.manual_seed(0)
    dense = GPT(config(mlp=mlp))
    with torch.no_grad():  # larger weights, so the MLP's share of the logits is not lost in the tolerance
        for p in dense.parameters():
            p.mul_(5.0) if p.dim() == 2 else None
    sparse = M.moeify(copy.deepcopy(dense), M.MoEConfig(n_expert=1, top_k=1))
    for d, s in zip(dense.transformer.h, sparse.transformer.h):
        assert isinstance(s.mlp, M.MoE)
        s.mlp.experts[0].load_state_dict(d.mlp.state_dict())  # the dense MLP's weights, as its only expert
    idx = torch.randint(0, 64, (3, 20))
    torch.testing.assert_close(sparse(idx)[0], dense(idx)[0], rtol=1e-5, atol=1e-5)


# -----------------------------------------------------------------------------
# the router


def router_on(logits, bias=None, **kw):
    """A router whose logits are the given (N, E) numbers: n_embd = E and the identity as its weight."""
    E = logits.size(1)
    r = M.Router(E, M.MoEConfig(n_expert=E, **kw))
    with torch.no_grad():
        r.weight.copy_(torch.eye(E))
        if bias is not None:
            r.bias.copy_(torch.tensor(bias))
    return r(logits)


LOGITS = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 1.5], [-1.0, -2.0, 0.5, 0.0]])


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_the_router_learns_from_the_models_loss(router, top_k):
    """Without the auxiliary losses, the router's only gradient comes through the gates: every router, top-1 too."""
    E = 4
    r = M.Router(E, M.MoEConfig(n_expert=E, top_k=top_k, router=router))
    torch.nn.init.normal_(r.weight, std=0.5)
    x = torch.randn(16, E, generator=torch.Generator().manual_seed(0))
    _, _, chosen, gates = r(x)
    (gates * torch.arange(1.0, top_k + 1)).sum().backward()  # a loss that depends on the gates' values
    assert r.weight.grad.abs().sum() > 1e-3


def test_router_gates_on_hand_numbers():
    p = LOGITS.exp() / LOGITS.exp().sum(1, keepdim=True)  # softmax over the experts, per token
    s = 1 / (1 + (-LOGITS).exp())  # sigmoid
    top2 = torch.tensor([[0, 1], [1, 3], [2, 3]])  # the two largest logits of each row, largest first
    _, scores, chosen, gates = router_on(LOGITS, top_k=2)  # Mixtral: softmax, top-2, renormalized
    torch.testing.assert_close(scores, p)
    assert chosen.tolist() == top2.tolist()
    want = p.gather(1, top2)
    torch.testing.assert_close(gates, want / want.sum(1, keepdim=True))
    _, _, chosen, gates = router_on(LOGITS, top_k=1)  # Switch: top-1 keeps its probability (not 1)
    assert chosen.flatten().tolist() == [0, 1, 2]
    torch.testing.assert_close(gates.flatten(), p[[0, 1, 2], [0, 1, 2]])
    _, scores, chosen, gates = router_on(LOGITS, top_k=2, router="sigmoid")  # DeepSeek-V3: sigmoid, renormalized
    torch.testing.assert_close(scores, s)
    assert chosen.tolist() == top2.tolist()
    want = s.gather(1, top2)
    torch.testing.assert_close(gates, want / want.sum(1, keepdim=True))
    _, _, chosen, gates = router_on(LOGITS, top_k=1, router="sigmoid")  # top-1 keeps its score (renormalized,
    assert chosen.flatten().tolist() == [0, 1, 2]                          # it was always 1: no router gradient)
    torch.testing.assert_close(gates.flatten(), s[[0, 1, 2], [0, 1, 2]])
    # a bias on expert 3 puts it first in every row, and the gates still come from the unbiased scores
    _, _, chosen, gates = router_on(LOGITS, bias=[0.0, 0.0, 0.0, 5.0], top_k=2)
    want_chosen = torch.tensor([[3, 0], [3, 1], [3, 2]])
    assert chosen.tolist() == want_chosen.tolist()
    want = p.gather(1, want_chosen)
    torch.testing.assert_close(gates, want / want.sum(1, keepdim=True))


def naive_moe(x, m, capacity=None):
    """The definition, one token and one choice at a time; an expert serves its first `capacity` assignments
    in token order."""
    _, _, chosen, gates = m.router(x)
    served, rows = [0] * len(m.experts), []
    for n in range(x.size(0)):
        y = torch.zeros(x.size(1))
        for j in range(chosen.size(1)):
            e = int(chosen[n, j])
            if capacity is None or served[e] < capacity:
                y = y + gates[n, j] * m.experts[e](x[n:n + 1])[0]
            served[e] += 1
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("router,capacity", [("softmax", None), ("sigmoid", None), ("softmax", 4), ("sigmoid", 3)])
def test_sorted_dispatch_equals_a_per_token_loop(router, capacity):
    m = layer(n_expert=4, top_k=2, router=router)
    x = torch.randn(12, 16, requires_grad=True)
    w = torch.randn(12, 16)
    outs, grads = [], []
    for fn in (lambda: M.dispatch(x, *m.router(x)[2:], m.experts, capacity)[0], lambda: naive_moe(x, m, capacity)):
        out = fn()
        x.grad = None
        m.zero_grad()
        (out * w).sum().backward()
        outs.append(out.detach())
        grads.append([x.grad.clone()] + [p.grad.clone() for p in m.parameters() if p.grad is not None])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    assert len(grads[0]) == len(grads[1]) > 1  # the router's weight gets a gradient through the gates
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if capacity is not None:  # the case must actually drop something
        assert M.dispatch(x, *m.router(x)[2:], m.experts, capacity)[2] > 0


def test_capacity_drops_exactly_the_assignments_past_capacity():
    x = torch.arange(1.0, 7.0)[:, None]  # 6 tokens, width 1: token n carries the value n + 1
    experts = [nn.Identity(), nn.Linear(1, 1, bias=False)]
    nn.init.constant_(experts[1].weight, 10.0)
    chosen = torch.tensor([[0], [0], [1], [0], [1], [0]])  # expert 0: tokens 0, 1, 3, 5; expert 1: tokens 2, 4
    y, counts, dropped = M.dispatch(x, chosen, torch.ones(6, 1), experts, capacity=2)
    assert y.flatten().tolist() == [1, 2, 30, 0, 50, 0]  # tokens 3 and 5 were past expert 0's capacity
    assert counts.tolist() == [4, 2] and dropped == 2
    # top-2: token 2 is third in line at both experts and loses both; gates weigh what is kept
    chosen = torch.tensor([[0, 1], [1, 0], [0, 1]])
    gates = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.5, 0.5]])
    y, counts, dropped = M.dispatch(x[:3], chosen, gates, experts, capacity=2)
    assert y.flatten().tolist() == [0.75 * 1 + 0.25 * 10, 0.5 * 20 + 0.5 * 2, 0]
    assert dropped == 2
    # the layer: capacity = ceil(factor * tokens * top_k / n_expert) in training, the eval factor otherwise
    m = layer(n_expert=2, top_k=1, capacity_factor=1.0, eval_capacity_factor=0.0)
    m.router.bias.copy_(torch.tensor([100.0, 0.0]))  # every token picks expert 0
    x = torch.randn(1, 8, 16)
    y = m(x)
    load, dropped = m.take_load()
    assert load.tolist() == [8, 0] and dropped.item() == 4  # capacity ceil(1.0 * 8 * 1 / 2) = 4
    assert (y[0, :4].abs().sum(-1) > 0).all() and (y[0, 4:] == 0).all()
    assert (m.eval()(x)[0].abs().sum(-1) > 0).all()  # evaluation: no capacity, nothing dropped


def test_capacity_counts_every_token_of_the_batch_and_top_k_and_rounds_up():
    # 2 x 3 tokens, top-2 of 4 experts, factor 0.5: capacity = ceil(0.5 * 6 * 2 / 4) = ceil(1.5) = 2
    m = layer(n_expert=4, top_k=2, capacity_factor=0.5)
    m.router.bias.copy_(torch.tensor([100.0, 90.0, 0.0, 0.0]))  # every token picks experts 0 and 1
    x = torch.randn(2, 3, 16)
    m(x)
    m(x)  # the counters add up over forwards until take_load reads them
    load, dropped = m.take_load()
    assert load.tolist() == [12, 12, 0, 0] and dropped.item() == 2 * (2 * (6 - 2))
    load, dropped = m.take_load()  # and it resets both
    assert load.tolist() == [0, 0, 0, 0] and dropped.item() == 0


def test_shared_experts_add_to_the_routed_ones_at_their_summed_width():
    m = layer(n_expert=4, top_k=2, n_shared=2).eval()  # dense width 4 * 16 = 64 over 2 routed + 2 shared
    assert [e.c_proj.in_features for e in m.experts] == [16] * 4 and m.shared.c_proj.in_features == 2 * 16
    x = torch.randn(1, 6, 16)
    torch.testing.assert_close(m(x)[0], naive_moe(x[0], m) + m.shared(x[0]), rtol=1e-5, atol=1e-6)


def test_expert_init_is_gpt2s():
    torch.manual_seed(0)
    m = M.MoE(config(n_layer=8, n_embd=64), M.MoEConfig(n_expert=4, top_k=2))
    cat = lambda name: torch.cat([getattr(e, name).weight.flatten() for e in m.experts])  # noqa: E731
    assert cat("c_fc").std().item() == pytest.approx(0.02, rel=0.05)
    assert cat("c_proj").std().item() == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.05)  # residual projections
    assert m.router.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert all((e.c_fc.bias == 0).all() and (e.c_proj.bias == 0).all() for e in m.experts)


# -----------------------------------------------------------------------------
# balancing


def test_switch_aux_loss_is_alpha_at_uniform_routing_and_larger_when_skewed():
    E, N, alpha = 4, 8, 0.01
    uniform = M.switch_aux_loss(torch.full((N, E), 1 / E), torch.tensor([4, 4, 4, 4]), alpha)
    assert uniform.item() == pytest.approx(alpha, rel=1e-6)
    skewed = M.switch_aux_loss(torch.tensor([[0.4, 0.3, 0.2, 0.1]] * N), torch.tensor([4, 2, 1, 1]), alpha)
    collapsed = M.switch_aux_loss(torch.tensor([[1.0, 0, 0, 0]] * N), torch.tensor([8, 0, 0, 0]), alpha)
    assert alpha < skewed.item() < collapsed.item() == pytest.approx(alpha * E)


def test_z_loss_matches_its_formula_and_the_layer_adds_both_losses():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0]])
    expected = 1e-3 * sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 2
    assert M.z_loss(logits, 1e-3).item() == pytest.approx(expected, rel=1e-6)
    for router in ("softmax", "sigmoid"):
        m = layer(n_expert=4, top_k=2, router=router, aux_alpha=0.05, z_alpha=0.2)
        x = torch.randn(2, 5, 16)
        m(x)
        logits, scores, chosen, _ = m.router(x.view(-1, 16))
        probs = scores / scores.sum(-1, keepdim=True)
        want = M.switch_aux_loss(probs, chosen.flatten().bincount(minlength=4), 0.05) + M.z_loss(logits, 0.2)
        torch.testing.assert_close(m.aux_loss, want)


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_loss_free_bias_moves_toward_balance_and_never_changes_the_gates(router):
    bias = torch.zeros(2)
    M.update_bias(bias, torch.tensor([30, 10]), 0.25)  # the busy expert down, the idle one up
    assert bias.tolist() == [-0.25, 0.25]
    m = layer(n_expert=4, top_k=2, router=router)
    with torch.no_grad():  # varied scores, expert 0 favoured by every token of x below
        m.router.weight.mul_(10.0)
        m.router.weight[0] += 0.2
    x = torch.randn(256, 16) + 1.0

    def imbalance():
        load = m.router(x)[2].flatten().bincount(minlength=4).float()
        return (load.max() / load.mean()).item()

    before, chosen_unbiased = imbalance(), m.router(x)[2]
    for _ in range(100):
        M.update_bias(m.router.bias, m.router(x)[2].flatten().bincount(minlength=4), 0.01)
    assert before > 1.5 and imbalance() < 1.2 < before
    logits, scores, chosen, gates = m.router(x)
    assert (chosen != chosen_unbiased).any()  # the bias did change which experts are picked...
    unbiased = logits.softmax(-1) if router == "softmax" else logits.sigmoid()
    want = unbiased.gather(-1, chosen)
    torch.testing.assert_close(gates, want / want.sum(-1, keepdim=True))  # ...but not how they are weighed


# -----------------------------------------------------------------------------
# the model and the loop


def test_moeify_every_other_block_and_equal_active_params():
    torch.manual_seed(0)
    dense = GPT(config(n_layer=4, n_embd=32))
    sparse = M.moeify(copy.deepcopy(dense), M.MoEConfig(n_expert=8, top_k=2, every=2))
    assert [isinstance(b.mlp, M.MoE) for b in sparse.transformer.h] == [False, True, False, True]
    total, active = M.param_counts(sparse)
    assert total > 1.5 * dense.num_params()
    assert abs(active - dense.num_params()) < 0.02 * dense.num_params()  # router + a bias per expert apart
    for mlp in ("gelu", "swiglu"):  # a config's own MLP width (pretrained models set one) is kept too
        dense = GPT(config(n_layer=2, n_embd=32, mlp=mlp, mlp_hidden=96))
        _, active = M.param_counts(M.moeify(copy.deepcopy(dense), M.MoEConfig(n_expert=8, top_k=2)))
        assert abs(active - dense.num_params()) < 0.05 * dense.num_params(), mlp  # 4 * n_embd would be +30%
    with pytest.raises(ValueError, match="--moe-every 3: the model has 2 blocks"):
        M.moeify(GPT(config(n_layer=2, n_embd=32)), M.MoEConfig(every=3))


def test_cached_generation_equals_uncached_through_generate_py():
    torch.manual_seed(0)
    model = M.moeify(GPT(config(tie_weights=False, n_embd=32)), M.MoEConfig(n_expert=4, top_k=2, n_shared=1))
    with torch.no_grad():  # larger weights, so that greedy paths vary instead of repeating one token
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10.0)
    model.eval()
    idx = torch.randint(0, 64, (2, 5))
    cached = generate.generate(model, idx, 24, generate.GREEDY, use_cache=True)
    uncached = generate.generate(model, idx, 24, generate.GREEDY, use_cache=False)
    assert torch.equal(cached, uncached)
    assert len(set(cached[0, 5:].tolist())) > 4
    cache = model.new_cache(2)
    steps = [model(idx, cache=cache)[0]] + [model(cached[:, i:i + 1], cache=cache)[0] for i in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), model(cached[:, :12])[0], rtol=1e-4, atol=1e-4)


TRAIN = ["--arch", "moe", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--seq-len", "32", "--batch-size", "4",
         "--max-steps", "6", "--eval-interval", "3", "--eval-tokens", "256", "--lr", "1e-2", "--warmup-steps", "2",
         "--n-expert", "4", "--bias-rate", "0.01", "--capacity-factor", "1.0", "--device", "cpu",
         "--dtype", "float32", "--no-compile", "--log-interval", "100"]


def test_checkpoint_and_exact_resume(tmp_path, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    M.main(TRAIN + ["--out-dir", a])
    M.main(TRAIN + ["--out-dir", b, "--stop-after", "4"])
    with pytest.raises(SystemExit):  # a run resumes with the flags it started with, or not at all
        M.main(TRAIN + ["--out-dir", b, "--resume", "--warmup-steps", "3"])
    assert "--warmup-steps is 3, the checkpoint used 2" in capsys.readouterr().err
    M.main(TRAIN + ["--out-dir", b, "--resume"])
    ma, _ = M.load_model(os.path.join(a, "moe", "ckpt.pt"))
    mb, vocab = M.load_model(os.path.join(b, "moe", "ckpt.pt"))
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert sa["transformer.h.0.mlp.router.bias"].abs().sum() > 0  # the balancing bias is saved and resumed
    rows = [[json.loads(line) for line in open(os.path.join(d, "moe", "metrics.jsonl"))] for d in (a, b)]
    keep = ("step", "train_loss", "aux_loss", "load", "dropped")  # not the times, nor the extra eval at step 4
    train_rows = [[{k: r[k] for k in keep} for r in rs if "train_loss" in r] for rs in rows]
    assert len(train_rows[0]) == 6 and train_rows[0] == train_rows[1]
    assert rows[0][-1]["val_loss"] == rows[1][-1]["val_loss"]
    assert any(r.get("dropped", 0) > 0 for r in rows[0])  # capacity 1.0 drops some tokens early in training
    assert len(vocab) == 11706 and vocab == sorted(vocab)  # the GPT-2 ids tiny Shakespeare uses
    assert ma.config.vocab_size == 11712  # rounded up to a multiple of 64
    train_rows = [r for r in rows[0] if "train_loss" in r]
    assert [r["lr"] for r in train_rows] == [lr_at(r["step"] - 1, 1e-2, 2, 6) for r in train_rows]
    for layer_i in range(2):  # each layer's bias: the sum of its own steps, 0.01 * sign(mean share - share)
        shares = torch.tensor([r["load"][layer_i] for r in train_rows])  # (steps, E), each row sums to 1
        torch.testing.assert_close(shares.sum(1), torch.ones(6), atol=1e-3, rtol=0)
        want = (0.01 * torch.sign(0.25 - shares)).sum(0)
        torch.testing.assert_close(sa[f"transformer.h.{layer_i}.mlp.router.bias"], want, atol=1e-6, rtol=0)


def test_balancing_losses_reach_the_gradient(tmp_path):
    # the same 2 steps with and without a z-loss: only the term added to the loss differs
    short = TRAIN + ["--max-steps", "2", "--eval-interval", "2", "--eval-tokens", "64", "--bias-rate", "0"]
    routers = []
    for z in ("0", "1.0"):
        M.main(short + ["--z-alpha", z, "--out-dir", str(tmp_path / z)])
        model, _ = M.load_model(os.path.join(str(tmp_path / z), "moe", "ckpt.pt"))
        routers.append(model.transformer.h[0].mlp.router.weight)
    assert not torch.equal(*routers)


def test_batches_are_windows_shifted_by_one_and_differ_by_step():
    shards = [np.arange(50, dtype=np.uint16), np.arange(100, 140, dtype=np.uint16)]
    x, y = M.get_batch(shards, 16, 8, seed=0, step=3, device="cpu")
    assert x.shape == y.shape == (16, 8)
    assert torch.equal(y, x + 1) and torch.equal(x[:, 1:], x[:, :-1] + 1)  # contiguous windows, targets shifted
    again, _ = M.get_batch(shards, 16, 8, seed=0, step=3, device="cpu")
    other, _ = M.get_batch(shards, 16, 8, seed=0, step=4, device="cpu")
    assert torch.equal(x, again) and not torch.equal(x, other)


def test_evaluate_is_the_token_mean_over_disjoint_windows():
    torch.manual_seed(0)
    model = GPT(config())
    val = [np.random.default_rng(0).integers(0, 64, 50).astype(np.uint16)]
    args = argparse.Namespace(seq_len=4, eval_tokens=40, batch_size=3)  # 10 windows: batches of 3, 3, 3, 1
    got = M.evaluate(model, val, args, "cpu", torch.float32)
    windows = torch.from_numpy(val[0][:41].astype(np.int64))
    with torch.no_grad():
        losses = [model(windows[None, j * 4:j * 4 + 4], windows[None, j * 4 + 1:j * 4 + 5])[1] for j in range(10)]
    assert got == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)


def test_bad_input_is_named(tmp_path, capsys):
    for k in (0, 5):
        with pytest.raises(ValueError, match="top_k"):
            M.MoEConfig(n_expert=4, top_k=k)
    for name in ("bias_rate", "aux_alpha", "z_alpha"):  # a negative rate would push load onto the busiest expert
        with pytest.raises(ValueError, match=f"{name}=-0.001 must be >= 0"):
            M.MoEConfig(**{name: -1e-3})
    with pytest.raises(SystemExit):
        M.main(TRAIN + ["--eval-tokens", "16", "--out-dir", str(tmp_path / "e")])
    assert "one window of --seq-len 32" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        M.main(["--router", "softplus", "--device", "cpu"])
    assert "unknown router 'softplus'" in capsys.readouterr().err
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9".encode("latin1"))
    for argv, match in (  # each was a traceback, torch's message or a silent run
            (["--resume", "--out-dir", str(tmp_path / "typo")], "--resume: no checkpoint at"),  # started afresh
            (["--init", str(tmp_path / "missing.pt")], "--init '.*missing.pt': no such checkpoint file"),
            (["--data", str(tmp_path / "latin1.txt")], "latin1.txt is not UTF-8 text"),
            (["--lr", "-1"], "--lr must be positive"), (["--grad-clip", "-1"], "--grad-clip must be >= 0"),
            (["--stop-after", "0"], "--stop-after must be a step >= 1"),  # 0 ran the whole schedule
            (["--arch", "both", "--init", str(tmp_path / "latin1.txt")], "give --arch dense or --arch moe"),
            (["--arch", "both", "--moe-every", "3"], "--moe-every 3: the model has 2 blocks")):  # after the dense run
        with pytest.raises(SystemExit):
            M.main(TRAIN + ["--out-dir", str(tmp_path / "o")] + argv)
        assert re.search(match, capsys.readouterr().err), match
    assert not os.path.exists(tmp_path / "typo") and not os.path.exists(tmp_path / "o")  # refused before training


def test_resume_keeps_the_runs_dtype(tmp_path):
    """A bf16 run resumed without --dtype goes on in bf16 (it went on in the default, float32: another run)."""
    bf16 = [a for a in TRAIN if a not in ("--dtype", "float32")] + ["--max-steps", "4", "--eval-interval", "2"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    M.main(bf16 + ["--dtype", "bfloat16", "--out-dir", a])
    M.main(bf16 + ["--dtype", "bfloat16", "--out-dir", b, "--stop-after", "2"])
    M.main(bf16 + ["--out-dir", b, "--resume"])
    losses = [[json.loads(line).get("train_loss") for line in open(os.path.join(d, "moe", "metrics.jsonl"))
               if "train_loss" in line] for d in (a, b)]
    assert len(losses[0]) == 4 and losses[0] == losses[1]


def test_grad_clip_0_is_off_not_a_zero_gradient(tmp_path):
    run = TRAIN + ["--max-steps", "2", "--eval-interval", "2", "--weight-decay", "0"]
    M.main(run + ["--out-dir", str(tmp_path / "off"), "--grad-clip", "0"])
    M.main(run + ["--out-dir", str(tmp_path / "huge"), "--grad-clip", "1e9"])  # far above the norm: no clipping
    off, huge = (M.load_model(str(tmp_path / d / "moe" / "ckpt.pt"))[0].state_dict() for d in ("off", "huge"))
    assert all(torch.equal(off[k], huge[k]) for k in off)  # clipping to 0 zeroed every gradient: nothing learned
