"""Tests of ppo.py: GAE and whitening, the clipped policy and value losses, both KL estimators, the per-token
rewards and the KL controller on hand numbers; the rollout log-probabilities, entropies and prompts; KL 0 at
the first step; a PPO step's minibatch gradients and stats against the objective, and its value clip around the
rollout's values; greedy evaluation; learning on a toy reward; exact resume with the lr schedule, the KL
controller, --value-lr and --weight-decay; prompt files; the gpt2-polite recipe's code path. CPU only, offline,
tiny models."""

import argparse
import itertools
import json
import math
import os
import types

import pytest
import torch

import bpe
import gpt2
import ppo
from gpt2 import GPT, GPTConfig

BYTES = bpe.byte_tokenizer()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(block_size=64, vocab_size=257, n_layer=2, n_head=2, n_embd=32, pos_emb="rope")
    return GPT(GPTConfig(**{**cfg, **kw})).eval()


def settings(**kw):
    """The flags rollout and ppo_step read, with the task preset's defaults."""
    args = ppo.parse_args(["--device", "cpu"])
    return argparse.Namespace(**{**vars(args), **kw})


# -----------------------------------------------------------------------------
# Hand numbers


def test_gae_and_whitening_against_a_hand_computation():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.1, 2.0, 5.0]])
    values = torch.tensor([[0.5, 0.2, 0.4], [1.0, 1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 2 ended after 2 tokens: its third is junk
    adv, ret = ppo.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 1: deltas 0.2 - 0.5, 0.4 - 0.2, 1 - 0.4; A2 = 0.6, A1 = 0.2 + 0.95 * 0.6, A0 = -0.3 + 0.95 * A1
    # row 2: the value after its last token is 0 (not the junk 9): A1 = 2 - 1, A0 = 0.1 + 1 - 1 + 0.95 * 1
    want = torch.tensor([[-0.3 + 0.95 * 0.77, 0.77, 0.6], [1.05, 1.0, 0.0]])
    assert torch.allclose(adv, want) and torch.allclose(ret, (want + values) * mask)
    adv, _ = ppo.gae(rewards, values, mask, gamma=0.9, lam=1.0)  # lambda 1: discounted return minus value
    assert torch.allclose(adv[0], torch.tensor([0.81 - 0.5, 0.9 - 0.2, 1 - 0.4]))
    w = ppo.whiten(want, mask)
    x = torch.tensor([-0.3 + 0.95 * 0.77, 0.77, 0.6, 1.05, 1.0])
    mean, std = x.mean(), ((x - x.mean()) ** 2).mean().sqrt()  # population std over the 5 real tokens
    assert torch.allclose(w[mask.bool()], (x - mean) / std, atol=1e-6) and w[1, 2] == 0
    assert ppo.whiten(torch.tensor([[1., 3., 9.]]), torch.tensor([[1., 1., 0.]]))[0].tolist() == pytest.approx([-1, 1, 0])


def test_kl_estimators_against_their_formulas():
    torch.manual_seed(0)
    logp, ref = -torch.rand(1000) * 5, -torch.rand(1000) * 5
    assert torch.equal(ppo.kl_estimate(logp, ref, "k1"), logp - ref)
    k3 = ppo.kl_estimate(logp, ref, "k3")
    assert torch.allclose(k3, (ref - logp).exp() - 1 - (ref - logp)) and (k3 >= 0).all()
    assert ppo.kl_estimate(torch.tensor([-1.]), torch.tensor([-2.]), "k3").item() == pytest.approx(math.exp(-1))
    # both estimate KL(pi || ref): on draws from pi, their means agree with the exact KL
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.3, 0.3, 0.4])
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    exact = (p * (p / q).log()).sum().item()
    for how in ("k1", "k3"):
        assert ppo.kl_estimate(p.log()[x], q.log()[x], how).mean().item() == pytest.approx(exact, abs=0.01)
    with pytest.raises(ValueError, match="k1, k3"):
        ppo.kl_estimate(logp, ref, "k2")


def test_clipped_policy_loss_on_hand_numbers():
    # ratios 1.5, 0.5, 1.1 with advantages +1, +1, -2
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]])).requires_grad_()
    old, adv, mask = torch.zeros(1, 3), torch.tensor([[1.0, 1.0, -2.0]]), torch.ones(1, 3)
    loss, clip_frac, approx_kl = ppo.policy_loss(logp, old, adv, mask, clip=0.2)
    # max(-A r, -A clip(r)): -min(1.5, 1.2) = -1.2 (clipped); -min(0.5, 0.8) = -0.5; max(2.2, 2.2) = 2.2
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2) / 3) and clip_frac == pytest.approx(2 / 3)
    assert approx_kl == pytest.approx(sum(0.5 * math.log(r) ** 2 for r in (1.5, 0.5, 1.1)) / 3)
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] != 0 and logp.grad[0, 2] != 0  # clipped: no incentive
    masked, *_ = ppo.policy_loss(logp.detach(), old, adv, torch.tensor([[1.0, 1.0, 0.0]]), clip=0.2)
    assert masked.item() == pytest.approx((-1.2 - 0.5) / 2)
    # ratios 1.3 and 0.9: the first is outside [0.8, 1.2], the second inside
    _, clip_frac, _ = ppo.policy_loss(torch.log(torch.tensor([[1.3, 0.9]])), torch.zeros(1, 2), torch.ones(1, 2),
                                      torch.ones(1, 2), clip=0.2)
    assert clip_frac == pytest.approx(0.5)


def test_clipped_value_loss_on_hand_numbers():
    values = torch.tensor([[1.0, 0.5, 2.0]], requires_grad=True)
    old, returns, mask = torch.tensor([[0.5, 0.4, 2.0]]), torch.tensor([[2.0, 0.0, 1.0]]), torch.ones(1, 3)
    loss, frac = ppo.value_loss(values, old, returns, mask, clip=0.2)
    # token 1: V 1.0 clipped to 0.7: max((1 - 2)^2, (0.7 - 2)^2) = 1.69; token 2: within the clip: 0.25;
    # token 3: unchanged: 1.0
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.25 + 1.0) / 3) and frac == pytest.approx(1 / 3)
    loss.backward()
    assert values.grad[0, 0] == 0 and values.grad[0, 1] != 0  # the clipped branch carries no gradient
    masked, _ = ppo.value_loss(values, old, returns, torch.tensor([[1.0, 1.0, 0.0]]), clip=0.2)
    assert masked.item() == pytest.approx(0.5 * (1.69 + 0.25) / 2)  # a finished response's tail does not count
    assert ppo.explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert ppo.explained_variance(torch.full_like(returns, 1.0), returns, mask) == pytest.approx(0.0)


def test_token_rewards_and_the_kl_controller():
    kl, mask = torch.tensor([[0.5, 1.0, 2.0], [1.0, 3.0, 3.0]]), torch.tensor([[1., 1., 1.], [1., 0., 0.]])
    r = ppo.token_rewards(torch.tensor([2.0, -1.0]), kl, mask, 0.1)
    assert torch.allclose(r, torch.tensor([[-0.05, -0.1, -0.2 + 2.0], [-0.1 - 1.0, 0.0, 0.0]]))
    fixed = ppo.KLController(0.1)
    fixed.update(100.0, 64)
    assert fixed.coef == 0.1
    ctl = ppo.KLController(0.1, target=6.0, horizon=1000)
    ctl.update(12.0, 100)  # KL twice the target: the error clips at +0.2
    assert ctl.coef == pytest.approx(0.1 * (1 + 0.2 * 100 / 1000))
    ctl.update(5.4, 100)  # 10% under the target
    assert ctl.coef == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 0.1))


# -----------------------------------------------------------------------------
# Rollouts and the first step


ROWS = [{"prompt": "What is 3 + 4?", "answer": "7"}, {"prompt": "What is 12 - 5?", "answer": "7"},
        {"prompt": "What is 1 + 1?", "answer": "2"}] * 4  # prompts of 3 lengths: left padding


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_recomputed_logprobs_equal_the_sampling_ones(temperature):
    policy = ppo.Policy(tiny(1)).eval()
    args = settings(max_new_tokens=12, temperature=temperature)
    torch.manual_seed(0)
    b = ppo.rollout(policy, BYTES, ROWS, args, "cpu", torch.float32)
    assert (b["attn"][:, 0] == 0).any() and b["ended"].any() and not b["ended"].all()  # padding, early ends
    with torch.no_grad():
        logp, values, entropy = policy(b["idx"], b["attn"], b["T"], temperature)
    m = b["mask"].bool()
    assert torch.allclose(logp[m], b["logp"][m], atol=1e-5) and (entropy[m] > 0).all() and (values == 0).all()
    with torch.no_grad():  # the entropy is that of the sampling distribution, softmax(logits / temperature)
        h = policy.gpt.hidden_states(b["idx"][:, :-1], attention_mask=b["attn"][:, :-1])[:, b["T"] - 1:]
        want = torch.distributions.Categorical(logits=policy.gpt.lm_head(h) / temperature).entropy()
    assert torch.allclose(entropy[m], want[m], atol=1e-5)
    assert torch.equal(b["attn"][:, b["T"]:], b["mask"].long())  # the tail after an end-of-text is padding
    i = int(b["ended"].float().argmax())  # a response that ended: its last real token is the end-of-text
    assert b["texts"][i].endswith(bpe.ENDOFTEXT) and b["idx"][i, b["T"] + int(b["mask"][i].sum()) - 1] == BYTES.eot_token
    # the reward model reads each row at its last real token: the score of the row alone, without padding
    rm = ppo.RewardModel(tiny(3), {"weight": torch.randn(1, 32), "bias": torch.tensor([0.5])})
    with torch.no_grad():
        batched = rm(b["idx"], b["attn"])
        alone = [rm(row[a.bool()][None], torch.ones(1, int(a.sum()), dtype=torch.long)) for row, a in zip(b["idx"], b["attn"])]
    assert torch.allclose(batched, torch.cat(alone), atol=1e-5)
    with torch.no_grad():  # whatever the padding holds
        assert torch.allclose(rm(b["idx"].masked_fill(b["attn"] == 0, 65), b["attn"]), batched, atol=1e-5)


def test_the_critic_reads_its_own_body():
    """Values come from the critic's hidden states when there is one; with the reward model as critic (its body
    and head), the value of the state before response token t is the reward model's score of prompt + the
    first t tokens."""
    head = {"weight": torch.randn(1, 32, generator=torch.Generator().manual_seed(1)), "bias": torch.tensor([0.3])}
    policy, rm = ppo.Policy(tiny(1), tiny(2), head).eval(), ppo.RewardModel(tiny(2), head)
    idx, attn = gpt2.left_pad([[5, 6, 7, 8, 9], [7, 8, 9]])
    with torch.no_grad():
        _, values, _ = policy(idx, attn, 3, 1.0)  # prompts idx[:, :3], responses of 2 tokens
        want = torch.stack([rm(idx[:, :3 + t], attn[:, :3 + t]) for t in range(2)], 1)
        assert torch.allclose(values, want, atol=1e-5)
        _, shared, _ = ppo.Policy(tiny(1), None, head)(idx, attn, 3, 1.0)
    assert not torch.allclose(shared, want, atol=1e-3)
    wide = {"weight": torch.randn(1, 48), "bias": torch.zeros(1)}  # a critic wider than the policy: its own width
    _, values, _ = ppo.Policy(tiny(1), tiny(2, n_embd=48), wide)(idx, attn, 3, 1.0)
    assert values.shape == (2, 2)


def test_rollouts_never_draw_ids_past_the_tokenizer():
    """A task model's embedding has 320 rows for 257 byte tokens: the 63 extra ids are never sampled, and the
    training pass normalizes over the same 257 ids, so its log-probabilities still equal the sampling ones."""
    model = tiny(3, vocab_size=320)
    with torch.no_grad():
        model.lm_head.weight[257:] += 3 * model.lm_head.weight[:257].std()  # make the extra rows likely
    policy, args = ppo.Policy(model, vocab_size=257).eval(), settings(max_new_tokens=12, temperature=1.0)
    torch.manual_seed(0)
    b = ppo.rollout(policy, BYTES, ROWS, args, "cpu", torch.float32)
    assert (b["idx"] < 257).all()
    with torch.no_grad():
        logp, _, _ = policy(b["idx"], b["attn"], b["T"], 1.0)
    m = b["mask"].bool()
    assert torch.allclose(logp[m], b["logp"][m], atol=1e-5)


def test_kl_is_zero_at_the_first_step_and_the_first_ratio_is_one():
    policy = ppo.Policy(tiny(2)).eval()
    ref = ppo.copy.deepcopy(policy).requires_grad_(False)
    args = settings(max_new_tokens=8, minibatches=1, ppo_epochs=1, kl_coef=0.5, temperature=0.8)
    torch.manual_seed(0)
    b = ppo.rollout(policy, BYTES, ROWS, args, "cpu", torch.float32)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    for est in ("k1", "k3"):
        s = ppo.ppo_step(policy, ref, opt, b, torch.arange(12.) % 3, ppo.KLController(0.5),
                         settings(**{**vars(args), "kl_estimator": est}), 0, "cpu", torch.float32)
        assert s["kl"] == 0.0 and s["reward"] == pytest.approx(1.0)  # mean score (0, 1, 2): no penalty yet
        assert s["clip_frac"] == 0.0 and s["approx_kl"] == 0.0 and s["max_logp_diff"] < 1e-5
        policy.load_state_dict(ref.state_dict())
    # after an update the policy has moved: KL and the penalty appear, and a second epoch's ratio moves
    ppo.ppo_step(policy, ref, opt, b, torch.arange(12.) % 3, ppo.KLController(0.5), args, 0, "cpu", torch.float32)
    s = ppo.ppo_step(policy, ref, opt, b, torch.arange(12.) % 3, ppo.KLController(0.5),
                     settings(**{**vars(args), "ppo_epochs": 2}), 1, "cpu", torch.float32)
    assert s["kl"] > 0 and s["reward"] < 1.0 and s["approx_kl"] > 0


class Recorder(torch.nn.Module):
    """A policy that records the prompt + response ids of each forward pass."""

    def __init__(self, policy):
        super().__init__()
        self.policy, self.calls = policy, []

    def forward(self, idx, attn, T, temperature):
        self.calls.append(idx)
        return self.policy(idx, attn, T, temperature)


class Still:
    """An optimizer that records the gradients of each step and leaves the parameters where they are."""

    def __init__(self, model):
        self.named, self.grads = list(model.named_parameters()), []

    def step(self):
        self.grads.append({k: p.grad.clone() for k, p in self.named if p.grad is not None})

    def zero_grad(self, set_to_none=True):
        for _, p in self.named:
            p.grad = None


def test_ppo_step_follows_the_ppo_objective():
    """At the rollout's own parameters (ratio 1, nothing clipped) each minibatch's gradient is that of
    -mean(A log pi) + vf_coef * 0.5 * mean((V - R)^2) over its response tokens, where the rewards are
    -coef * k1 KL per token plus the score at the last token (coef: the controller's, not --kl-coef),
    A = GAE(gamma, lambda) whitened over the whole batch and R = GAE + V (unwhitened); every epoch visits each
    response once, in a new order, and another step shuffles anew; the stats are KL per response and the
    masked entropy; the controller adapts on the KL per response and the batch size; --grad-clip bounds the
    gradient's norm."""
    gen = torch.Generator().manual_seed(5)
    policy = ppo.Policy(tiny(1), None, {"weight": torch.randn(1, 32, generator=gen), "bias": torch.tensor([0.2])})
    ref = ppo.Policy(tiny(2)).eval().requires_grad_(False)
    args = settings(max_new_tokens=12, temperature=0.7, minibatches=3, ppo_epochs=2, gamma=0.9, lam=0.8,
                    vf_coef=0.5, grad_clip=0.0, kl_coef=0.02, kl_estimator="k1", seed=0)
    torch.manual_seed(0)
    b = ppo.rollout(policy, BYTES, ROWS, args, "cpu", torch.float32)
    idx, attn, mask, T, B = b["idx"], b["attn"], b["mask"], b["T"], len(ROWS)
    assert b["ended"].any() and not b["ended"].all()
    score = torch.linspace(-1, 2, B)
    with torch.no_grad():
        logp, values, _ = policy(idx, attn, T, 0.7)
        ref_logp, _, _ = ref(idx, attn, T, 0.7)
        h = policy.gpt.hidden_states(idx[:, :-1], attention_mask=attn[:, :-1])[:, T - 1:]
        entropy = torch.distributions.Categorical(logits=policy.gpt.lm_head(h) / 0.7).entropy()
    kl = (logp - ref_logp) * mask
    rewards = -0.3 * kl
    rewards[torch.arange(B), mask.sum(1).long() - 1] += score
    adv, ret = ppo.gae(rewards, values, mask, 0.9, 0.8)
    adv = ppo.whiten(adv, mask)
    kl_resp = kl.sum(1).mean().item()
    ctl = ppo.KLController(0.3, target=1.1 * kl_resp, horizon=100)
    rec, opt = Recorder(policy), Still(policy)
    s = ppo.ppo_step(rec, ref, opt, b, score, ctl, args, 0, "cpu", torch.float32)
    assert s["kl"] == pytest.approx(kl_resp, rel=1e-5) and s["kl_coef"] == 0.3
    assert s["entropy"] == pytest.approx(((entropy * mask).sum() / mask.sum()).item(), rel=1e-5)
    assert ctl.coef == pytest.approx(0.3 * (1 + (1 / 1.1 - 1) * B / 100))
    assert s["length"] == pytest.approx(mask.sum(1).mean().item())
    var = lambda x: (((x - (x * mask).sum() / mask.sum()) * mask) ** 2).sum() / mask.sum()
    assert s["explained_var"] == pytest.approx((1 - var(ret - values) / var(ret)).item(), rel=1e-4)
    row_of = lambda x: [next(j for j in range(B) if torch.equal(r, idx[j])) for r in x]
    batches = [row_of(x) for x in rec.calls[1:]]  # calls[0]: the rollout batch's pass before training
    assert [len(i) for i in batches] == [4] * 6 and batches[:3] != batches[3:]
    for e in (0, 3):
        assert sorted(sum(batches[e:e + 3], [])) == list(range(B))
    assert len(opt.grads) == 6
    for i, got in zip(batches, opt.grads):
        policy.zero_grad()
        lp, v, _ = policy(idx[i], attn[i], T, 0.7)
        m = mask[i]
        (-(adv[i] * lp * m).sum() / m.sum() + 0.5 * 0.5 * ((v - ret[i]) ** 2 * m).sum() / m.sum()).backward()
        want = {k: p.grad for k, p in policy.named_parameters() if p.grad is not None}
        assert got.keys() == want.keys()
        for k in want:
            assert torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-6), k
    rec.calls.clear()
    ppo.ppo_step(rec, ref, Still(policy), b, score, ppo.KLController(0.3), args, 1, "cpu", torch.float32)
    assert [row_of(x) for x in rec.calls[1:]] != batches  # step 1 shuffles otherwise than step 0
    s = ppo.ppo_step(policy, ref, Still(policy), b, score, ppo.KLController(0.3),
                     settings(**{**vars(args), "kl_estimator": "k3"}), 0, "cpu", torch.float32)
    d = ref_logp - logp
    assert s["kl"] == pytest.approx(((d.exp() - 1 - d) * mask).sum(1).mean().item(), rel=1e-5)
    opt = Still(policy)
    s = ppo.ppo_step(policy, ref, opt, b, score, ppo.KLController(0.3),
                     settings(**{**vars(args), "grad_clip": 1e-3, "minibatches": 1, "ppo_epochs": 1}), 0, "cpu",
                     torch.float32)
    norm = torch.cat([g.flatten() for g in opt.grads[0].values()]).norm().item()
    assert s["grad_norm"] > 1e-2 and norm == pytest.approx(1e-3, rel=1e-4)


class Drifted(torch.nn.Module):
    """A policy whose value head has moved by `shift` since the rollout: every pass after the first (the rollout
    batch's, before training) adds it to the values, with their gradient kept."""

    def __init__(self, policy, shift):
        super().__init__()
        self.policy, self.shift, self.calls = policy, shift, 0

    def forward(self, idx, attn, T, temperature):
        logp, values, entropy = self.policy(idx, attn, T, temperature)
        self.calls += 1
        return logp, values + (self.shift if self.calls > 1 else 0.0), entropy


def test_ppo_step_clips_the_values_around_the_rollouts():
    """Where the value head has moved further than --clip-value from the rollout's values (V_old), ppo_step's
    value loss is 0.5 * mean of max((V - R)^2, (V_old + clip(V - V_old) - R)^2): the clip is taken around the
    rollout's values, not the current ones, and tokens whose clipped branch is the larger carry no gradient."""
    gen = torch.Generator().manual_seed(7)
    policy = ppo.Policy(tiny(3), None, {"weight": torch.randn(1, 32, generator=gen), "bias": torch.tensor([0.1])})
    ref = ppo.Policy(tiny(4)).eval().requires_grad_(False)
    args = settings(max_new_tokens=10, temperature=0.7, minibatches=1, ppo_epochs=1, gamma=0.9, lam=0.8,
                    vf_coef=1.0, grad_clip=0.0, kl_estimator="k1", clip_value=0.3, whiten=False, seed=0)
    torch.manual_seed(1)
    b = ppo.rollout(policy, BYTES, ROWS, args, "cpu", torch.float32)
    idx, attn, mask, T, B = b["idx"], b["attn"], b["mask"], b["T"], len(ROWS)
    score = torch.linspace(-2, 2, B)
    with torch.no_grad():
        logp, old, _ = policy(idx, attn, T, 0.7)
        ref_logp, _, _ = ref(idx, attn, T, 0.7)
    rewards = -0.3 * (logp - ref_logp) * mask
    rewards[torch.arange(B), mask.sum(1).long() - 1] += score
    adv, ret = ppo.gae(rewards, old, mask, 0.9, 0.8)
    shift = torch.where(torch.arange(mask.size(1)) % 2 == 0, 0.5, -0.5)[None]  # +-0.5 per token, past 0.2
    opt = Still(policy)
    s = ppo.ppo_step(Drifted(policy, shift), ref, opt, b, score, ppo.KLController(0.3), args, 0, "cpu",
                     torch.float32)
    assert s["value_clip_frac"] == pytest.approx(1.0)  # every value moved by 0.5 > 0.3
    policy.zero_grad()
    lp, v, _ = policy(idx, attn, T, 0.7)
    v = v + shift
    vclip = old + shift.clamp(-0.3, 0.3)  # around the rollout's values: a constant here
    vl = 0.5 * (torch.max((v - ret) ** 2, (vclip - ret) ** 2) * mask).sum() / mask.sum()
    assert s["value_loss"] == pytest.approx(vl.item(), rel=1e-5)
    assert ((vclip - ret) ** 2 > (v - ret) ** 2)[mask.bool()].any()  # some tokens take the clipped branch
    (-(adv * lp * mask).sum() / mask.sum() + vl).backward()
    want = {k: p.grad for k, p in policy.named_parameters() if p.grad is not None}
    assert opt.grads[0].keys() == want.keys()
    for k in want:
        assert torch.allclose(opt.grads[0][k], want[k], rtol=1e-4, atol=1e-6), k


def test_rollout_prompts_are_the_sft_template():
    """Each row's prompt is format_prompt(prompt, input, preamble) behind its left padding."""
    rows = [{"prompt": "Say hi.", "input": "to Bob"}, {"prompt": "What is 1 + 1?"}]
    for preamble in (False, True):
        b = ppo.rollout(ppo.Policy(tiny(1, block_size=256)).eval(), BYTES, rows,
                        settings(max_new_tokens=2, temperature=1.0, preamble=preamble), "cpu", torch.float32)
        for r, ids, a in zip(rows, b["idx"][:, :b["T"]], b["attn"][:, :b["T"]]):
            assert BYTES.decode(ids[a.bool()].tolist()) == bpe.format_prompt(r["prompt"], r.get("input", ""), preamble)


def test_evaluation_is_greedy_over_every_row(monkeypatch):
    """Accuracy, mean length and the reward model's raw score (not its batch-standardized one) are over all
    held-out rows, whatever --eval-batch-size chunks them into, with greedy answers."""

    class Scored(torch.nn.Module):
        def forward(self, idx, attn):  # an ensemble's z-scores
            return torch.zeros(idx.size(0))

        def raw(self, idx, attn):
            return torch.full((idx.size(0),), 2.0)

    policy = ppo.Policy(tiny(1)).eval()
    rows = [dict(r) for r in ROWS[:5]]
    greedy = ppo.rollout(policy, BYTES, rows, settings(max_new_tokens=8, temperature=0.0), "cpu", torch.float32)
    for r, t in zip(rows, greedy["texts"]):
        r["answer"] = t
    monkeypatch.setattr(bpe, "reward", lambda text, answer: float(text == answer))
    torch.manual_seed(0)
    out = ppo.evaluate(policy, BYTES, rows, Scored(), settings(max_new_tokens=8, temperature=1.0, eval_batch_size=2),
                       "cpu", torch.float32)
    assert out == pytest.approx({"accuracy": 1.0, "test_score": 2.0, "test_length": greedy["mask"].sum().item() / 5})


def test_ppo_learns_a_toy_reward():
    """Score = the fraction of response characters that are digits. A random model writes ~4% digits; 30
    rollout batches of PPO make it write mostly digits."""
    policy = ppo.Policy(tiny(4)).eval()
    ref = ppo.copy.deepcopy(policy).requires_grad_(False)
    args = settings(max_new_tokens=6, lr=1e-2, kl_coef=0.01, eos_penalty=0.0, temperature=1.0)
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr)
    ctl = ppo.KLController(args.kl_coef)
    torch.manual_seed(0)
    digits = lambda t: sum(c.isdigit() for c in t.replace(bpe.ENDOFTEXT, "")) / max(1, len(t))
    history = []
    for step in range(30):
        b = ppo.rollout(policy, BYTES, ROWS[:8], args, "cpu", torch.float32)
        score = torch.tensor([digits(t) for t in b["texts"]])
        s = ppo.ppo_step(policy, ref, opt, b, score, ctl, args, step, "cpu", torch.float32)
        history.append(s["score"])
    assert history[0] < 0.15 and sum(history[-5:]) / 5 > 0.5, history
    assert s["kl"] > 0.1  # it got there by moving away from the reference


# -----------------------------------------------------------------------------
# The script: exact resume, bad input, the gpt2-polite recipe's code path


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def task_inputs(tmp_path):
    """A tiny SFT model (its embedding table rounded up past the 257 byte tokens, as train_gpt2.py writes it), a
    tiny reward model (random value head) and 36 prompts, as the pipeline writes them."""
    sft, rm = str(tmp_path / "sft.pt"), str(tmp_path / "rm.pt")
    gpt2.save_checkpoint(sft, tiny(5, vocab_size=320), tokenizer=BYTES.dumps(), template={"preamble": False})
    head = {"weight": torch.randn(1, 32, generator=torch.Generator().manual_seed(0)), "bias": torch.zeros(1)}
    gpt2.save_checkpoint(rm, tiny(6), tokenizer=BYTES.dumps(), template={"preamble": False}, value_head=head)
    rows = [{"prompt": bpe.task_text(a, "+", b)[0], "answer": bpe.task_text(a, "+", b)[2]}
            for a in range(6) for b in range(6)]
    bpe.write_rows(tmp_path / "rl.jsonl", rows)
    return sft, rm, str(tmp_path / "rl.jsonl")


RUN = ["--device", "cpu", "--dtype", "float32", "--batch-size", "8", "--max-new-tokens", "6",
       "--lr", "1e-3", "--eval-interval", "2", "--minibatches", "2", "--ppo-epochs", "2"]


def test_the_sft_models_template_is_the_default(tmp_path):
    """The policy is asked in the template its checkpoint records; one that records none gets the preset's (task:
    no preamble, as sft.py's task preset trains); --preamble / --no-preamble win over both."""
    data = task_inputs(tmp_path)[2]
    pre, plain = str(tmp_path / "pre.pt"), str(tmp_path / "plain.pt")
    gpt2.save_checkpoint(pre, tiny(5, block_size=256), tokenizer=BYTES.dumps(), template={"preamble": True})
    gpt2.save_checkpoint(plain, tiny(5, block_size=256), tokenizer=BYTES.dumps())
    for init, flags, want in ((pre, [], True), (plain, [], False), (plain, ["--preamble"], True)):
        ppo.main(["--init", init, "--reward", "verifier", "--data", data, "--max-steps", "1", "--eval-limit", "4",
                  "--out-dir", str(tmp_path / "out"), *RUN, *flags])
        assert gpt2.load_checkpoint(str(tmp_path / "out" / "ckpt.pt"))["template"] == {"preamble": want}, (init, flags)


def test_float16_scales_the_loss_and_resumes_the_scale(tmp_path):
    """--dtype float16: every minibatch step goes through the loss scaler, whose state is saved and resumed."""
    sft, rm, data = task_inputs(tmp_path)
    common = ["--init", sft, "--reward-model", rm, "--data", data, "--max-steps", "4", *RUN, "--dtype", "float16"]
    ppo.main([*common, "--out-dir", str(tmp_path / "straight")])
    ppo.main([*common, "--out-dir", str(tmp_path / "split"), "--stop-after", "2"])
    ppo.main(["--resume", "--out-dir", str(tmp_path / "split"), "--dtype", "float16"])  # where it runs: a flag
    a, b = (gpt2.load_checkpoint(str(tmp_path / d / "ckpt.pt")) for d in ("straight", "split"))
    assert a["scaler"]["_growth_tracker"] == 4 * 2 * 2  # steps x --ppo-epochs x --minibatches, every one finite
    assert a["scaler"] == b["scaler"] and a["scaler"]["scale"] == 2.0 ** 16
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_resume_is_exact(tmp_path, monkeypatch, capsys):
    """A run stopped and resumed logs and saves what the straight run does; along the way: the lr schedule, the
    adaptive KL controller, the separate critic, --value-lr and --weight-decay, and the verifier reward."""
    sft, rm, data = task_inputs(tmp_path)
    common = ["--init", sft, "--reward-model", rm, "--data", data, "--max-steps", "4", "--target-kl", "0.01",
              "--kl-horizon", "20", "--kl-estimator", "k3", "--critic", "sft", "--value-lr", "3e-3",
              "--warmup-steps", "2", "--min-lr-ratio", "0.5", *RUN]
    ppo.main([*common, "--out-dir", str(tmp_path / "straight")])
    with monkeypatch.context() as m:  # the first part's clock reads 1,000 s more at every look
        m.setattr(ppo, "time", types.SimpleNamespace(time=itertools.count(0, 1000).__next__))
        ppo.main([*common, "--out-dir", str(tmp_path / "split"), "--stop-after", "2"])
    ppo.main(["--resume", "--out-dir", str(tmp_path / "split")])
    # train_s counts the stopped part's seconds too
    assert [r["train_s"] for r in metrics(tmp_path / "split") if "train_s" in r][-1] >= 1000
    capsys.readouterr()
    ppo.main(["--resume", "--out-dir", str(tmp_path / "split"), "--lr", "0.5"])  # finished: trains nothing
    assert "--resume goes on with the run's own settings; not used: --lr 0.5 (the run's: " in capsys.readouterr().out
    keys = ("step", "score", "kl", "kl_coef", "policy_loss", "value_loss", "accuracy", "test_score")
    rows = lambda d: [{k: r.get(k) for k in keys} for r in metrics(d) if "train_s" not in r]
    assert rows(tmp_path / "split") == rows(tmp_path / "straight") and len(rows(tmp_path / "split")) == 4 + 3
    a = gpt2.load_checkpoint(str(tmp_path / "straight" / "ckpt.pt"))
    b = gpt2.load_checkpoint(str(tmp_path / "split" / "ckpt.pt"))
    assert a["step"] == b["step"] == 4 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["value_head"]["weight"], b["value_head"]["weight"]) and a["value_head"]["weight"].abs().sum() > 0
    assert all(torch.equal(a["critic"][k], b["critic"][k]) for k in a["critic"])  # the separate value body
    assert not torch.equal(a["critic"]["lm_head.weight"], a["model"]["lm_head.weight"])
    assert a["kl_controller"] == b["kl_controller"] and a["kl_controller"]["coef"] != 0.02  # it adapted
    logged = metrics(tmp_path / "straight")[1]
    assert {"score", "correct", "kl", "entropy", "clip_frac", "approx_kl", "value_loss", "explained_var",
            "grad_norm", "length"} <= set(logged)
    train = [r for r in metrics(tmp_path / "straight") if "score" in r]
    # warmup over 2 steps, then a cosine from 1e-3 to 0.5e-3 over the remaining 2: halfway at step 3
    assert [r["lr"] for r in train] == pytest.approx([0.5e-3, 1e-3, 1e-3, 0.75e-3])
    # Ziegler et al.'s controller on each batch's KL per response, 8 responses of a horizon of 20, target 0.01
    coefs = [r["kl_coef"] for r in train] + [a["kl_controller"]["coef"]]
    for r, coef, after in zip(train, coefs, coefs[1:]):
        assert after == pytest.approx(coef * (1 + min(max(r["kl"] / 0.01 - 1, -0.2), 0.2) * 8 / 20), rel=1e-3)
    # the training pass normalizes over the tokenizer's ids, as sampling does, though the model has 320 rows
    assert all(r["max_logp_diff"] < 1e-4 for r in train)
    # the verifier reward needs no reward model
    ppo.main(["--init", sft, "--reward", "verifier", "--data", data, "--max-steps", "1",
              *RUN, "--lr", "1e-9", "--value-lr", "1e-2", "--weight-decay", "1e9",
              "--out-dir", str(tmp_path / "verifier")])
    assert metrics(tmp_path / "verifier")[1]["score"] == metrics(tmp_path / "verifier")[1]["correct"] - 1.0 * (
        1 - metrics(tmp_path / "verifier")[1]["ended"])
    # --value-lr moves the value head and its critic body (--critic sft: a copy of the SFT model), --lr the
    # policy; AdamW's decoupled decay, p *= 1 - lr * weight_decay = 0, zeroes the policy's matrices at its first
    # step and leaves its vectors and the value side alone (4 Adam steps of 1e-2 move them less than 0.1)
    init, v = gpt2.load_checkpoint(sft)["model"], gpt2.load_checkpoint(str(tmp_path / "verifier" / "ckpt.pt"))
    assert max((v["model"][k] - (0 if init[k].dim() > 1 else init[k])).abs().max().item() for k in init) < 1e-6
    assert 1e-3 < max((v["critic"][k] - init[k]).abs().max().item() for k in init) < 0.1
    assert v["value_head"]["weight"].abs().max() > 1e-3


def test_bad_input_is_a_clear_error(tmp_path, monkeypatch):
    sft, rm, data = task_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)  # no out/task-sft here: the error says how to make it
    with pytest.raises(SystemExit, match="python sft.py"):
        ppo.main(["--device", "cpu"])
    with pytest.raises(SystemExit, match="python reward_model.py"):
        ppo.main(["--device", "cpu", "--init", sft])
    # the columns task: its own inputs and the commands that make them; longer answers
    with pytest.raises(SystemExit, match=r"(?s)out/task-columns-sft/ckpt.pt.*python sft.py --preset task-columns   "
                                         r"\(after: python train_gpt2.py --preset task-columns\)"):
        ppo.main(["--preset", "task-columns", "--device", "cpu"])
    with pytest.raises(SystemExit, match=r"(?s)out/task-columns-rm/ckpt.pt.*python reward_model.py --preset "
                                         r"task-columns"):
        ppo.main(["--preset", "task-columns", "--device", "cpu", "--init", sft])
    columns, task = ppo.parse_args(["--preset", "task-columns"]), ppo.parse_args([])
    assert (columns.data, columns.max_new_tokens, columns.out_dir) == ("task-columns", 64, "out/task-columns-ppo")
    assert {k: v for k, v in vars(columns).items() if k not in ("preset", "init", "reward_model", "data",
                                                                 "max_new_tokens", "out_dir")} == \
        {k: v for k, v in vars(task).items() if k not in ("preset", "init", "reward_model", "data",
                                                          "max_new_tokens", "out_dir")}
    with pytest.raises(SystemExit, match="not a reward model"):
        ppo.main(["--device", "cpu", "--init", sft, "--reward-model", sft, "--data", data])
    gpt2.save_checkpoint(str(tmp_path / "ppo.pt"), tiny(), value_head={}, tokenizer=BYTES.dumps(),
                         args=vars(ppo.parse_args([])))  # a PPO checkpoint also has a value head: its critic's
    with pytest.raises(SystemExit, match="not a reward model"):
        ppo.main(["--device", "cpu", "--init", sft, "--reward-model", str(tmp_path / "ppo.pt"), "--data", data])
    gpt2.save_checkpoint(str(tmp_path / "other.pt"), tiny(), value_head={}, tokenizer=bpe.Tokenizer("gpt4").dumps())
    with pytest.raises(SystemExit, match="another tokenizer"):
        ppo.main(["--device", "cpu", "--init", sft, "--reward-model", str(tmp_path / "other.pt"), "--data", data])
    (tmp_path / "p.json").write_text(json.dumps([{"instruction": "Say hi."}, {"instruction": "Say no."}]))
    with pytest.raises(SystemExit, match="needs an 'answer'"):
        ppo.main(["--device", "cpu", "--init", sft, "--reward", "verifier", "--data", str(tmp_path / "p.json")])
    rows = bpe.read_rows(data, "rl")
    bpe.write_rows(tmp_path / "mixed.jsonl", rows[:-1] + [{"prompt": "Say hi."}])  # only the last lacks one
    with pytest.raises(SystemExit, match="needs an 'answer'"):
        ppo.main(["--device", "cpu", "--init", sft, "--reward", "verifier", "--data", str(tmp_path / "mixed.jsonl")])
    for flags, msg in ((["--temperature", "0"], "temperature above 0"), (["--minibatches", "0"], "at least 1"),
                       (["--ppo-epochs", "0"], "at least 1")):
        with pytest.raises(SystemExit, match=msg):
            ppo.main(flags)
    with pytest.raises(SystemExit, match="ensemble standardizes"):
        ppo.main(["--device", "cpu", "--init", sft, "--reward-model", f"{rm},{rm}", "--data", data,
                  "--batch-size", "1", "--minibatches", "1"])
    with pytest.raises(SystemExit, match="multiple of --minibatches"):
        ppo.main(["--batch-size", "6", "--minibatches", "4"])
    with pytest.raises(SystemExit, match="no checkpoint"):
        ppo.main(["--resume", "--out-dir", str(tmp_path / "nothing")])


@pytest.mark.parametrize("flags,words", [
    (["--max-steps", "0"], "--max-steps 0: must be at least 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: must be at least 1"),
    (["--eval-batch-size", "0"], "--eval-batch-size 0: must be at least 1"),
    (["--lr", "0"], "--lr 0.0: give a learning rate above 0"),
    (["--value-lr", "-1"], "--value-lr -1.0: must be at least 0"),
    (["--kl-coef", "-1"], "--kl-coef -1.0: must be at least 0"),
    (["--target-kl", "-1"], "--target-kl -1.0: must be at least 0"),
    (["--clip", "-0.1"], "--clip -0.1: must be at least 0"),
    (["--clip-value", "-1"], "--clip-value -1.0: must be at least 0"),
    (["--grad-clip", "-1"], "--grad-clip -1.0: must be at least 0"),
    (["--eval-limit", "-1"], "--eval-limit -1: must be at least 0"),  # dropped the last test prompt
    (["--stop-after", "0"], "--stop-after 0: must be at least 1"),  # ran every step
    (["--min-lr-ratio", "-1"], "--min-lr-ratio -1.0: must be at least 0"),  # the schedule's end: a negative lr
    (["--vf-coef", "-1"], "--vf-coef -1.0: must be at least 0"),  # the value loss, maximised
    (["--warmup-steps", "-1"], "--warmup-steps -1: must be at least 0"),  # started part-way down the cosine
    (["--kl-horizon", "0"], "--kl-horizon 0: must be at least 1")])  # a ZeroDivisionError with --target-kl
def test_out_of_range_flags_are_refused(tmp_path, monkeypatch, flags, words):
    """Refused where they are parsed: not a ZeroDivisionError (--lr 0), a run of no steps, or a run that
    silently does the opposite (a negative KL coefficient rewards drifting away, a negative clip inverts the
    clamp, a negative --grad-clip reverses the gradient)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=words):
        ppo.main(flags)


@pytest.mark.parametrize("case", ["cuda", "reward_model_as_init", "resume_other", "null_answer", "bad_line",
                                  "latin1", "long_prompt"])
def test_wrong_inputs_are_clear_errors(tmp_path, monkeypatch, case):
    """A mistaken device, model, run directory or data file: a SystemExit naming it (the file and line of bad
    data) and the fix, never a traceback from deep inside nor a silent run (an answer null scored as 'None')."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine
    sft, rm, data = task_inputs(tmp_path)
    rm_ckpt = gpt2.load_checkpoint(rm)
    gpt2.save_checkpoint(str(tmp_path / "rm2.pt"), tiny(6), tokenizer=BYTES.dumps(), value_head=rm_ckpt["value_head"],
                         method="rm", args={"method": "rm"})  # as reward_model.py writes it
    gpt2.save_checkpoint(str(tmp_path / "grpo" / "ckpt.pt"), tiny(), tokenizer=BYTES.dumps(), args={"group_size": 8})
    lines = open(data).read().splitlines()
    (tmp_path / "null.jsonl").write_text("\n".join(lines[:3] + ['{"prompt": "What is 9 + 9?", "answer": null}']))
    (tmp_path / "bad.jsonl").write_text("\n".join(lines[:2] + ['{"prompt": "What is 9 + 9?",'] + lines[2:]))
    latin1 = "\n".join(lines + ['{"prompt": "caf\xe9?", "answer": "1"}'])
    (tmp_path / "latin1.jsonl").write_bytes(latin1.encode("latin-1"))
    bpe.write_rows(tmp_path / "long.jsonl", [{"prompt": "What is " + "1 + " * 20 + "1?", "answer": "21"}] * 20)
    argv, words = {
        "cuda": (["--device", "cuda"], "--device cuda asked for, but no CUDA GPU"),
        "reward_model_as_init": (["--init", str(tmp_path / "rm2.pt")], "is a reward model"),
        "resume_other": (["--resume", "--out-dir", str(tmp_path / "grpo")], "was not written by ppo.py"),
        "null_answer": (["--data", str(tmp_path / "null.jsonl")], "item 3: 'answer' must be a non-empty string"),
        "bad_line": (["--data", str(tmp_path / "bad.jsonl")], "bad.jsonl:3: not valid JSON"),
        "latin1": (["--data", str(tmp_path / "latin1.jsonl")], "latin1.jsonl: not UTF-8"),
        "long_prompt": (["--data", str(tmp_path / "long.jsonl"), "--max-new-tokens", "8"],
                        r"20 prompts .* longer than the 56 tokens the model's 64-token context leaves"),
    }[case]
    with pytest.raises(SystemExit, match=words):
        ppo.main(["--init", sft, "--reward-model", rm, "--data", data, "--device", "cpu", "--batch-size", "8",
                  "--minibatches", "2", *argv])


def test_gpt2_polite_recipe_code_path(tmp_path):
    """The gpt2-polite preset on tiny random GPT-2-vocabulary models written in sft.py's and reward_model.py's
    checkpoint formats, and a small file in the preference data's format."""
    tok = bpe.load_gpt2().dumps()
    cfg = GPTConfig(block_size=256, vocab_size=50257, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    gpt2.save_checkpoint(str(tmp_path / "sft.pt"), GPT(cfg), tokenizer=tok, template={"preamble": True})
    head = {"weight": torch.randn(1, 16), "bias": torch.zeros(1)}
    gpt2.save_checkpoint(str(tmp_path / "rm.pt"), GPT(cfg), tokenizer=tok, template={"preamble": True},
                         value_head=head, method="rm")
    pairs = [{"instruction": f"Rewrite politely: give me item {i}.", "input": "" if i % 2 else f"item {i}",
              "output": "Please give me it.", "chosen": "Could you please give it to me?", "rejected": "Give it."}
             for i in range(20)]
    (tmp_path / "pref.json").write_text(json.dumps(pairs))
    ppo.main(["--preset", "gpt2-polite", "--init", str(tmp_path / "sft.pt"), "--reward-model", str(tmp_path / "rm.pt"),
              "--data", str(tmp_path / "pref.json"), "--out-dir", str(tmp_path / "run"), "--max-steps", "1",
              "--batch-size", "4", "--max-new-tokens", "4", "--device", "cpu"])
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows if "test_score" in r] == [0, 1] and "accuracy" not in rows[0]
    assert rows[1]["length"] > 0 and "correct" not in rows[1] and rows[1]["kl_coef"] == 0.05
    ckpt = gpt2.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))
    assert ckpt["template"] == {"preamble": True} and ckpt["args"]["lr"] == 1e-6 and ckpt["args"]["target_kl"] == 6.0
    assert set(ckpt["critic"]) == set(ckpt["model"])  # InstructGPT's critic: the reward model's body and head
    assert not torch.equal(ckpt["value_head"]["weight"], head["weight"])  # trained from the reward model's head
    # ... and body: 16 Adam steps at 1e-5 move them less than 1e-3 from the reward model's weights
    assert torch.allclose(ckpt["value_head"]["weight"], head["weight"], atol=1e-3)
    rm, sft = (gpt2.load_checkpoint(str(tmp_path / f))["model"] for f in ("rm.pt", "sft.pt"))
    assert all(torch.allclose(ckpt["critic"][k], rm[k], atol=1e-3) for k in rm)
    assert not all(torch.allclose(ckpt["critic"][k], sft[k], atol=1e-3) for k in sft)
    moved = [k for k in rm if not torch.equal(ckpt["critic"][k], rm[k])]  # the body learns too (was frozen)
    assert "transformer.h.0.mlp.c_fc.weight" in moved and len(moved) > len(rm) // 2
    assert ckpt["kl_controller"]["coef"] < 0.05  # adaptive: KL 0 is under the target of 6 nats, so it relaxes


def test_prompts_from_a_task_folder(tmp_path):
    """--data <folder>: a task's rl.jsonl trains and its test.jsonl is held out, as in grpo.py and sft.py."""
    sizes = {"pretrain": 10, "sft": 10, "sft_val": 10, "preference": 10, "rl": 12, "test": 5}
    paths = bpe.task_files(tmp_path / "task", seed=0, sizes=sizes, max_digits=2)
    train, held = ppo.load_prompts(str(tmp_path / "task"))
    assert train == bpe.read_rows(paths["rl"], "rl") and held == bpe.read_rows(paths["test"], "rl")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        ppo.load_prompts(str(tmp_path / "missing"))


def test_prompts_from_a_file(tmp_path):
    """A .json list or a .jsonl file of rows: the prompt (or Alpaca instruction) with its input and its answer
    as text; the last 10% of the rows, in file order, are held out."""
    items = [{"instruction": f"Add {i} and 1.", "input": f"x{i}" if i % 2 else "", "answer": i + 1} for i in range(20)]
    want = [{"prompt": f"Add {i} and 1.", "input": f"x{i}" if i % 2 else "", "answer": str(i + 1)} for i in range(20)]
    (tmp_path / "p.json").write_text(json.dumps(items))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": r["instruction"], "input": r["input"],
                                                          "answer": r["answer"]}) + "\n" for r in items))
    for name in ("p.json", "p.jsonl"):
        assert ppo.load_prompts(str(tmp_path / name)) == (want[:18], want[18:])


def test_compile_flag_compiles_the_training_passes(tmp_path, monkeypatch, counting_compile):
    """--compile must reach the policy's and the reference's training forward passes (it was once accepted and
    ignored); counting_compile stands in for torch.compile."""
    fake, calls = counting_compile
    monkeypatch.setattr(ppo, "maybe_compile", fake)
    sft, rm, data = task_inputs(tmp_path)
    ppo.main(["--init", sft, "--reward-model", rm, "--data", data, "--max-steps", "1", "--compile", *RUN,
              "--out-dir", str(tmp_path / "c")])
    # policy: 1 pass before training + ppo_epochs x minibatches; reference: 1 pass
    assert sorted(calls) == [1, 1 + 2 * 2]


def test_reward_ensemble_scores_by_its_least_convinced_member(tmp_path):
    """Each model's scores are standardized over the batch, then the minimum is taken: on hand numbers, and
    through ppo.main with two reward model checkpoints (comma-separated)."""

    class Fixed(torch.nn.Module):
        def __init__(self, s):
            super().__init__()
            self.s = torch.tensor(s)

        def forward(self, idx, attn):
            return self.s

    a, b = [1.0, 2.0, 3.0, 6.0], [10.0, 50.0, 30.0, 10.0]  # b has its own scale, and dislikes the last answer
    ens = ppo.RewardEnsemble([Fixed(a), Fixed(b)])
    z = lambda s: (torch.tensor(s) - torch.tensor(s).mean()) / (torch.tensor(s).std() + 1e-6)
    want = torch.minimum(z(a), z(b))
    assert torch.allclose(ens(None, None), want) and ens(None, None).argmax() == 2  # not the last: b rejects it
    assert torch.equal(ens.each(None, None), torch.tensor([a, b]))
    assert torch.allclose(ens.raw(None, None), (torch.tensor(a) + torch.tensor(b)) / 2)  # evaluation's score
    sft, rm, data = task_inputs(tmp_path)
    rm2 = str(tmp_path / "rm2.pt")
    head = {"weight": torch.randn(1, 32, generator=torch.Generator().manual_seed(1)), "bias": torch.zeros(1)}
    gpt2.save_checkpoint(rm2, tiny(7), tokenizer=BYTES.dumps(), template={"preamble": False}, value_head=head)
    ppo.main(["--init", sft, "--reward-model", f"{rm},{rm2}", "--data", data, "--max-steps", "2", *RUN,
              "--critic", "rm", "--out-dir", str(tmp_path / "ens")])
    rows = metrics(tmp_path / "ens")
    assert all(abs(r["score"]) < 3 for r in rows if "score" in r)  # standardized scores, not either model's raw ones
    assert "test_score" in rows[0]
    # --critic rm starts from the first reward model: 8 Adam steps at the preset's value lr 1e-4 stay near it
    critic, first, second = (gpt2.load_checkpoint(f)[k] for f, k in (
        (str(tmp_path / "ens" / "ckpt.pt"), "critic"), (rm, "model"), (rm2, "model")))
    assert all(torch.allclose(critic[k], first[k], atol=2e-3) for k in first)
    assert not all(torch.equal(critic[k], first[k]) for k in first)  # its body trains, not only the head
    assert not all(torch.allclose(critic[k], second[k], atol=2e-3) for k in second)
    with pytest.raises(SystemExit, match="no value head"):
        ppo.main(["--device", "cpu", "--init", sft, "--reward-model", f"{rm},{sft}", "--data", data])
