"""Tests of grpo.py: group advantages, the three loss aggregations, the k3 KL, the importance ratio, the
rollout log-probabilities, learning on a toy reward, exact resume, and the GSM8K recipe's code path.
CPU only, offline, tiny models."""

import argparse
import itertools
import json
import os
import types

import pytest
import torch

import bpe
import gpt2
import grpo
from gpt2 import GPT, GPTConfig

BYTES = bpe.byte_tokenizer()
EOT = BYTES.eot_token


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(block_size=64, vocab_size=257, n_layer=2, n_head=2, n_embd=32, pos_emb="rope")
    return GPT(GPTConfig(**{**cfg, **kw})).eval()


def sharp(seed=0):
    """tiny(seed) with its (tied) embedding scaled by 5: far from uniform, its entropy differs token to token."""
    model = tiny(seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(5)
    return model


def settings(**kw):
    """The flags train_step and rollout read, with the task preset's defaults."""
    args = grpo.parse_args(["--device", "cpu"])
    return argparse.Namespace(**{**vars(args), **kw})


# -----------------------------------------------------------------------------
# Advantages, losses, KL on hand numbers


def test_group_advantages_on_hand_numbers():
    r = torch.tensor([1., 0., 1., 1., 0., 0., 0., 0., 1., 1., 1., 1.])  # 3 groups of 4
    adv, zero = grpo.group_advantages(r, 4)
    # group 1: mean 0.75, unbiased std sqrt(0.75 / 3) = 0.5; groups 2 and 3 all alike: zero advantage, no NaN
    want = torch.tensor([0.25, -0.75, 0.25, 0.25]) / (0.5 + 1e-4)
    assert torch.allclose(adv[:4], want) and (adv[4:] == 0).all() and not adv.isnan().any()
    assert zero.tolist() == [False, True, True]
    adv, _ = grpo.group_advantages(r, 4, scale=False)  # Dr. GRPO: the mean only
    assert torch.allclose(adv[:4], torch.tensor([0.25, -0.75, 0.25, 0.25])) and (adv[4:] == 0).all()
    adv, _ = grpo.group_advantages(r, 4, baseline=False, scale=False)  # no baseline: the reward itself
    assert torch.equal(adv, r)
    adv, _ = grpo.group_advantages(torch.tensor([1., 0.]), 2)
    assert torch.allclose(adv, torch.tensor([0.5, -0.5]) / (0.5 ** 0.5 + 1e-4))
    adv, _ = grpo.group_advantages(r, 4, baseline=False)  # no baseline, scaled: alike groups keep their reward
    assert torch.allclose(adv[:4], r[:4] / (0.5 + 1e-4)) and torch.equal(adv[4:], r[4:])
    for v in (0.1, 0.3, 0.7, 1.1):  # a format bonus alone: the float mean is not exactly v, the group still alike
        adv, zero = grpo.group_advantages(torch.full((8,), v), 8)
        assert zero.tolist() == [True] and (adv == 0).all()


def test_each_aggregation_against_its_formula():
    loss = torch.arange(1., 13.).view(3, 4)
    mask = torch.tensor([[1., 1., 1., 0.], [1., 0., 0., 0.], [1., 1., 0., 0.]])  # answers of 3, 1, 2 tokens
    per_answer = [(1 + 2 + 3) / 3, 5 / 1, (9 + 10) / 2]
    assert grpo.aggregate(loss, mask, "grpo") == pytest.approx(sum(per_answer) / 3)
    total = 1 + 2 + 3 + 5 + 9 + 10
    assert grpo.aggregate(loss, mask, "dapo") == pytest.approx(total / 6)
    assert grpo.aggregate(loss, mask, "dr_grpo", max_len=16) == pytest.approx(total / (3 * 16))
    assert grpo.aggregate(loss, mask, "dr_grpo") == pytest.approx(total / (3 * 4))
    for how in grpo.LOSSES:  # an answer (or a batch) with no tokens adds 0, never NaN
        assert grpo.aggregate(loss, torch.zeros(3, 4), how) == 0
    with pytest.raises(ValueError, match="dr_grpo"):
        grpo.aggregate(loss, mask, "mean")


def test_k3_kl_is_nonnegative_and_zero_at_the_reference():
    torch.manual_seed(0)
    logp, ref = -torch.rand(1000) * 5, -torch.rand(1000) * 5
    kl = grpo.k3_kl(logp, ref)
    assert (kl >= 0).all() and kl.max() > 0.1
    assert (grpo.k3_kl(logp, logp) == 0).all()
    assert torch.allclose(kl, (ref - logp).exp() - (ref - logp) - 1)


def test_clipped_loss_on_hand_numbers():
    # ratio 1.5 with a positive advantage: clipped at 1.28 (no gradient); ratio 0.5 with a negative one: at 0.8
    logp = torch.log(torch.tensor([[1.5, 0.5]])).requires_grad_()
    old, mask = torch.zeros(1, 2), torch.ones(1, 2)
    loss, s = grpo.grpo_loss(logp, old, torch.tensor([1.0]), mask, how="dapo")
    assert loss.item() == pytest.approx(-(1.28 + 0.5) / 2) and s["clip_frac"] == 1.0
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] != 0  # the clip removes the incentive, never adds one
    loss, _ = grpo.grpo_loss(logp.detach(), old, torch.tensor([-1.0]), mask, how="dapo")
    assert float(loss) == pytest.approx((1.5 + 0.8) / 2)
    # the KL term enters with beta
    ref = torch.zeros(1, 2)
    with_kl, s = grpo.grpo_loss(logp.detach(), old, torch.tensor([1.0]), mask, how="dapo", beta=0.5, ref_logp=ref)
    assert float(with_kl) == pytest.approx(-(1.28 + 0.5) / 2 + 0.5 * s["kl"]) and s["kl"] > 0
    # ratios 1.25 and 0.85 lie inside [0.8, 1.28]: unclipped; a third token with ratio 3 is masked out everywhere
    logp = torch.log(torch.tensor([[1.25, 0.85, 3.0]]))
    loss, s = grpo.grpo_loss(logp, torch.zeros(1, 3), torch.tensor([1.0]), torch.tensor([[1., 1., 0.]]), how="dapo")
    assert float(loss) == pytest.approx(-(1.25 + 0.85) / 2) and s["clip_frac"] == 0.0
    assert s["ratio"] == pytest.approx((1.25 + 0.85) / 2) and s["ratio_dev"] == pytest.approx(0.25)


# -----------------------------------------------------------------------------
# Rollouts and the ratio


ROWS = [{"prompt": "What is 3 + 4?", "answer": "7"}, {"prompt": "What is 12 - 5?", "answer": "7"},
        {"prompt": "What is 1 + 1?", "answer": "2"}]


def test_score_on_hand_strings():
    """The verifier, plus the format reward only for an answer that both stopped and states an answer."""
    E = bpe.ENDOFTEXT
    assert grpo.score(f"3 + 4 = 7{E}", "7", 0.1) == pytest.approx(1.1)
    assert grpo.score("3 + 4 = 7", "7", 0.1) == 1.0  # did not stop: no format reward
    assert grpo.score(f"3 + 4 = 8{E}", "7", 0.1) == pytest.approx(0.1)  # well-formed, wrong
    assert grpo.score(f"no idea{E}", "7", 0.1) == 0.0  # stopped, states no number
    assert grpo.score("7<|im_end|>", "7", 0.1, stop="<|im_end|>") == pytest.approx(1.1)
    assert grpo.score(f"so \\boxed{{7}}{E}", "7", 0.1, "boxed") == pytest.approx(1.1)
    assert grpo.score(f"so 7{E}", "7", 0.1, "boxed") == 0.0  # the boxed verifier's format is a \boxed{} answer


# answers of 2, 1, 2 tokens to the first prompt (answer 0), 2, 3, 1 tokens to the second (answer 2)
FIXED_ROWS = [{"prompt": "a?", "answer": "0"}, {"prompt": "What is 1 + 1?", "answer": "2"}]
FIXED_ANSWERS = ["0" + bpe.ENDOFTEXT, "0", "5" + bpe.ENDOFTEXT, "2" + bpe.ENDOFTEXT, "zz" + bpe.ENDOFTEXT, "z"]


def fixed_rollout(monkeypatch, args, rows=FIXED_ROWS, answers=FIXED_ANSWERS):
    """grpo.rollout with the sampler replaced by fixed answers, row by row (G = len(answers) // len(rows))."""
    ids = [BYTES.encode(a, allowed_special="all") for a in answers]
    N = max(map(len, ids))

    def fake_sample(model, idx, max_new_tokens, **kw):
        assert idx.size(0) == len(ids) and N <= max_new_tokens
        tokens = torch.tensor([a + [EOT] * (N - len(a)) for a in ids])
        mask = torch.tensor([[True] * len(a) + [False] * (N - len(a)) for a in ids])
        return tokens, mask, torch.zeros(len(ids), N)
    monkeypatch.setattr(grpo, "sample", fake_sample)
    return grpo.rollout(tiny(), BYTES, rows, len(answers) // len(rows), args, "cpu", torch.float32)


def test_rollout_lays_out_groups_and_scores_each_answer(monkeypatch):
    """Rows 0..G-1 of the batch ask the first prompt and are scored against its answer; the reward adds the
    format reward, `correct` is the verifier alone; attn covers the prompt (not its left padding) and the
    answer up to its end-of-text."""
    b = fixed_rollout(monkeypatch, settings(format_reward=0.5, max_new_tokens=8))
    T = b["T"]
    for k in range(6):
        prompt = [t for t, m in zip(b["idx"][k, :T].tolist(), b["attn"][k, :T].tolist()) if m]
        assert prompt == bpe.prompt_ids(BYTES, FIXED_ROWS[k // 3]["prompt"], "alpaca", False)
    assert b["texts"] == FIXED_ANSWERS
    assert b["rewards"].tolist() == [1.5, 1.0, 0.5, 1.5, 0.0, 0.0] and b["correct"].tolist() == [1, 1, 0, 1, 0, 0]
    assert b["mask"].sum(1).tolist() == [2, 1, 2, 2, 3, 1] and torch.equal(b["attn"][:, T:], b["mask"].long())
    assert b["attn"][0, :T].sum() < b["attn"][3, :T].sum()  # the shorter prompt is left-padded


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_recomputed_logprobs_equal_the_sampling_ones(temperature):
    """The training pass reproduces the sampler's numbers, on a model whose embedding table has rows past the
    tokenizer's 257 ids (as train_gpt2.py pads GPT-2's): both normalize over the tokenizer's ids only."""
    model = tiny(1, vocab_size=320)
    args = settings(max_new_tokens=12, temperature=temperature)
    torch.manual_seed(0)
    b = grpo.rollout(model, BYTES, ROWS, 4, args, "cpu", torch.float32)
    assert b["idx"].shape[0] == 12 and b["mask"].sum(1).min() < b["mask"].size(1)  # some answers ended early
    with torch.no_grad():
        logp, entropy = grpo.token_logprobs(model, b["idx"], b["attn"], b["T"], temperature, b["V"])
    m = b["mask"].bool()
    assert torch.allclose(logp[m], b["logp"][m], atol=1e-5) and (entropy[m] > 0).all()
    assert b["texts"][0] == BYTES.decode([t for t, k in zip(b["idx"][0, b["T"]:].tolist(), m[0].tolist()) if k])


def test_ratio_is_one_on_the_first_on_policy_step():
    model = tiny(2)
    args = settings(max_new_tokens=8, group_size=4, beta=0.04)
    torch.manual_seed(0)
    b = grpo.rollout(model, BYTES, ROWS, 4, args, "cpu", torch.float32)
    b["rewards"] = torch.arange(12.) % 3  # every group has signal
    opt = model.configure_optimizer(0.0, 1e-3)
    s = grpo.train_step(model, grpo.copy.deepcopy(model), opt, b, args, "cpu", torch.float32)
    assert s["ratio"] == 1.0 and s["ratio_dev"] == 0.0 and s["clip_frac"] == 0.0 and s["kl"] == 0.0 and s["max_logp_diff"] < 1e-5
    # a second update on the same batch is off-policy: the ratio moves and the KL to the start appears
    b2 = {**b, "logp": b["logp"]}
    s = grpo.train_step(model, grpo.copy.deepcopy(tiny(2)), opt, b2, settings(**{**vars(args), "updates": 3}),
                        "cpu", torch.float32)
    assert s["ratio_dev"] > 1e-3 and s["kl"] > 0


def test_a_rows_input_follows_its_prompt():
    """An RL row's "input" (Alpaca's second field) is part of the prompt the policy answers (it was dropped)."""
    args = settings(max_new_tokens=2, group_size=2)
    rows = [{"prompt": "Add them.", "input": "2 and 3", "answer": "5"}]
    b = grpo.rollout(tiny(block_size=128), BYTES, rows, 2, args, "cpu", torch.float32)
    want = bpe.prompt_ids(BYTES, rows[0]["prompt"], "alpaca", args.preamble, input="2 and 3")
    assert "2 and 3" in BYTES.decode(want) and b["idx"][0, :b["T"]].tolist()[-len(want):] == want


def test_zero_signal_groups_are_counted_and_dropped():
    model = tiny(3)
    args = settings(max_new_tokens=4, group_size=2)
    torch.manual_seed(0)
    b = grpo.rollout(model, BYTES, ROWS, 2, args, "cpu", torch.float32)
    b["rewards"] = torch.tensor([1., 1., 0., 1., 0., 0.])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = grpo.train_step(model, None, model.configure_optimizer(0.0, 1e-3), b, args, "cpu", torch.float32)
    assert s["zero_signal"] == pytest.approx(2 / 3) and s["skipped"] == 0
    b["rewards"] = torch.tensor([1., 1., 0., 0., 1., 1.])
    model.load_state_dict(before)
    s = grpo.train_step(model, None, model.configure_optimizer(0.0, 1e-3), b, settings(**{**vars(args),
                        "drop_zero_signal": True}), "cpu", torch.float32)
    assert s["zero_signal"] == 1.0 and s["skipped"] == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing learned
    # dropping: only the answers of the one group with signal (rows 2 and 3) go through the training pass
    seen = []
    hook = model.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0]))
    b["rewards"] = torch.tensor([1., 1., 0., 1., 0., 0.])
    s = grpo.train_step(model, None, model.configure_optimizer(0.0, 1e-3), b, settings(**{**vars(args),
                        "drop_zero_signal": True}), "cpu", torch.float32)
    hook.remove()
    assert s["skipped"] == 0 and len(seen) == 1 and torch.equal(seen[0], b["idx"][2:4, :-1])
    model.load_state_dict(before)
    # without dropping, a batch of zero-signal groups is skipped too: Adam's momentum alone would move the weights
    opt = model.configure_optimizer(0.0, 1e-3)
    b["rewards"] = torch.tensor([1., 0., 0., 1., 1., 0.])
    grpo.train_step(model, None, opt, b, args, "cpu", torch.float32)
    after_one = {k: v.clone() for k, v in model.state_dict().items()}
    b["rewards"] = torch.tensor([1., 1., 0., 0., 1., 1.])
    s = grpo.train_step(model, None, opt, b, args, "cpu", torch.float32)
    assert s["skipped"] == 1 and all(torch.equal(after_one[k], v) for k, v in model.state_dict().items())
    # with --beta the KL term still pulls toward the reference on such a batch: a step (it was skipped too)
    s = grpo.train_step(model, tiny(4), opt, b, settings(**{**vars(args), "beta": 0.5}), "cpu", torch.float32)
    assert s["skipped"] == 0 and s["kl"] > 0 and s["loss"] > 0
    assert not all(torch.equal(after_one[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("how", grpo.LOSSES)
def test_train_step_loss_is_the_objective(monkeypatch, how):
    """train_step on a fixed batch against the objective written out: advantages = reward - group mean (unscaled),
    the k3 KL to the reference at the rollout temperature with beta, --loss's aggregation with dr_grpo's constant
    --max-new-tokens (8, longer than every answer). The first update is on-policy (ratio 1); the second takes
    its ratio against the first's policy, clipped to [1 - clip_low, 1 + clip_high]. No gradient is left behind."""
    args = settings(loss=how, beta=0.1, temperature=0.7, scale_rewards=False, clip_low=0.05, clip_high=0.3,
                    max_new_tokens=8, format_reward=0.5, group_size=3)
    b = fixed_rollout(monkeypatch, args)
    adv = torch.tensor([0.5, 0.0, -0.5, 1.0, -0.5, -0.5])  # rewards (1.5, 1, 0.5), (1.5, 0, 0) minus their mean
    ref, model, once = tiny(7), sharp(6), sharp(6)
    s1 = grpo.train_step(once, ref, torch.optim.SGD(once.parameters(), lr=0.02), b,
                         settings(**{**vars(args), "updates": 1}), "cpu", torch.float32)
    s2 = grpo.train_step(model, ref, torch.optim.SGD(model.parameters(), lr=0.02), b,
                         settings(**{**vars(args), "updates": 2}), "cpu", torch.float32)
    assert all(p.grad is None or not p.grad.any() for net in (model, once) for p in net.parameters())
    m, L = b["mask"], b["mask"].sum(1)
    with torch.no_grad():
        (p0, entropy), (p1, _), (pr, _) = [grpo.token_logprobs(net, b["idx"], b["attn"], b["T"], 0.7, b["V"])
                                           for net in (sharp(6), once, ref)]
    mean = lambda x: float((x * m).sum() / m.sum())
    k3 = lambda logp: (pr - logp).exp() - (pr - logp) - 1

    def objective(logp, old):
        r = (logp - old).exp()
        per = (-torch.min(r * adv[:, None], r.clamp(0.95, 1.3) * adv[:, None]) + 0.1 * k3(logp)) * m
        return {"grpo": (per.sum(1) / L).mean(), "dr_grpo": per.sum() / (6 * 8), "dapo": per.sum() / L.sum()}[how]
    assert s1["loss"] == pytest.approx(float(objective(p0, p0)), rel=1e-5, abs=1e-7)
    assert s1["kl"] == pytest.approx(mean(k3(p0)), rel=1e-5) and s1["clip_frac"] == 0.0
    assert s1["entropy"] == pytest.approx(mean(entropy), rel=1e-5) and s1["length"] == pytest.approx(11 / 6)
    r = (p1 - p0).exp()
    assert 0 < mean((r < 0.95) | (r > 1.3)) < 1  # the second update has ratios inside and outside the clip
    assert s2["loss"] == pytest.approx(float(objective(p1, p0)), rel=1e-5, abs=1e-7)
    assert s2["kl"] == pytest.approx(mean(k3(p1)), rel=1e-5)
    assert s2["clip_frac"] == pytest.approx(mean((r < 0.95) | (r > 1.3)))


def test_grad_clip_bounds_the_update(monkeypatch):
    """Under plain SGD at lr 1 the update is the gradient: --grad-clip 0.01 caps its norm at 0.01, 0 leaves it."""
    args = settings(format_reward=0.5, max_new_tokens=8, group_size=3)
    b = fixed_rollout(monkeypatch, args)

    def step_norm(clip):
        model = tiny(6)
        before = [p.detach().clone() for p in model.parameters()]
        grpo.train_step(model, None, torch.optim.SGD(model.parameters(), lr=1.0), b,
                        settings(**{**vars(args), "grad_clip": clip}), "cpu", torch.float32)
        return float(torch.cat([(p.detach() - q).flatten() for p, q in zip(model.parameters(), before)]).norm())
    assert step_norm(0.0) > 0.05 and step_norm(0.01) == pytest.approx(0.01, rel=1e-3)


def second_process(monkeypatch):
    """Fakes torch.distributed for --fsdp on 2 processes: the other one has signal (MAX -> 1) and 4 answers (or
    answer tokens) of its own (SUM + 4)."""
    def all_reduce(t, op=None):
        t.fill_(1) if op is not None else t.add_(4)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)


@pytest.mark.parametrize("how", ["grpo", "dapo"])
def test_fsdp_weights_each_process_by_its_share(monkeypatch, how):
    """--fsdp: FSDP averages the processes' gradients, so a process's loss is scaled by world size x its share of
    the answers (grpo), or of the answer tokens (dapo); the other process has 4. The raw reward is the advantage
    here: on-policy, the loss is minus its mean."""
    args = settings(loss=how, group_size=3, format_reward=0.5, max_new_tokens=8, baseline=False, scale_rewards=False)
    b = fixed_rollout(monkeypatch, args)  # rewards 1.5, 1, 0.5, 1.5, 0, 0 on answers of 2, 1, 2, 2, 3, 1 tokens
    model = tiny(6)
    alone = grpo.train_step(model, None, torch.optim.SGD(model.parameters()), b, args, "cpu", torch.float32)
    n, want = (6, -4.5 / 6) if how == "grpo" else (11, -(1.5 * 2 + 1 + 0.5 * 2 + 1.5 * 2) / 11)
    assert alone["loss"] == pytest.approx(want)
    second_process(monkeypatch)
    model = tiny(6)
    shared = grpo.train_step(model, None, torch.optim.SGD(model.parameters()), b,
                             settings(**{**vars(args), "fsdp": True}), "cpu", torch.float32)
    assert shared["loss"] == pytest.approx(want * 2 * n / (n + 4))


def test_fsdp_process_with_every_group_dropped_still_steps_at_weight_zero(monkeypatch):
    """--fsdp --drop-zero-signal: when this process drops every group but another has signal, it must still run
    the forward and backward passes (FSDP gathers each layer's weights from every process), contributing 0 (its KL
    term included). torch.distributed is faked: the other process has signal and 4 answers of its own."""
    second_process(monkeypatch)
    model = tiny(3)
    args = settings(max_new_tokens=4, group_size=2, drop_zero_signal=True, fsdp=True, beta=0.04)
    torch.manual_seed(0)
    b = grpo.rollout(model, BYTES, ROWS, 2, args, "cpu", torch.float32)
    b["rewards"] = torch.tensor([1., 1., 0., 0., 1., 1.])  # every group alike here
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    s = grpo.train_step(model, tiny(4), model.configure_optimizer(0.0, 1e-3), b, args, "cpu", torch.float32)
    assert s["skipped"] == 0 and s["loss"] == 0.0 and len(calls) == 1  # the policy's pass ran, weighted 0
    assert s["kl"] > 0.01  # to a reference other than the policy: unweighted, the loss would not be 0


def test_grpo_learns_a_toy_reward():
    """Reward = the fraction of answer characters that are digits. A random model writes ~4% digits; 40
    rollout batches of GRPO make it write mostly digits (measured: 0.04 -> 1.0)."""
    model = tiny(4)
    args = settings(max_new_tokens=6, group_size=8, lr=1e-2, temperature=1.0)
    opt = model.configure_optimizer(0.0, args.lr)
    torch.manual_seed(0)
    digits = lambda t: sum(c.isdigit() for c in t.replace("<|endoftext|>", "")) / max(1, len(t))
    first = last = None
    for step in range(40):
        b = grpo.rollout(model, BYTES, ROWS[:2], 8, args, "cpu", torch.float32)
        b["rewards"] = torch.tensor([digits(t) for t in b["texts"]])
        grpo.train_step(model, None, opt, b, args, "cpu", torch.float32)
        r = float(b["rewards"].mean())
        first, last = (r if first is None else first), r
    assert first < 0.15 and last > 0.5, (first, last)


# -----------------------------------------------------------------------------
# The script: exact resume, data formats, the GSM8K recipe's code path


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def task_folder(path):
    rows = [{"prompt": bpe.task_text(a, "+", b)[0], "answer": bpe.task_text(a, "+", b)[2]}
            for a in range(6) for b in range(6)]
    bpe.write_rows(path / "rl.jsonl", rows)
    bpe.write_rows(path / "test.jsonl", rows[::5])
    return str(path)


RUN = ["--device", "cpu", "--dtype", "float32", "--prompts", "3", "--group-size", "4", "--max-new-tokens", "8",
       "--lr", "1e-3", "--eval-interval", "2"]


def test_resume_is_exact(tmp_path, monkeypatch, capsys):
    """4 steps straight = 2 steps, stop, --resume for 2 more: the same metrics and weights. A toy reward (the byte
    sum of the answer mod 7) gives every batch signal, so the policy, Adam's state and the schedule (2 warmup
    steps, then cosine to 0.1) have all moved at the stop; the KL is taken to the starting model throughout."""
    monkeypatch.setattr(grpo, "score", lambda text, *a: sum(text.encode()) % 7 / 6)
    lrs, train_step = [], grpo.train_step

    def recording(model, ref, optimizer, *a):  # the learning rate the optimizer steps with
        lrs.append([g["lr"] for g in optimizer.param_groups])
        return train_step(model, ref, optimizer, *a)
    monkeypatch.setattr(grpo, "train_step", recording)
    init = str(tmp_path / "sft.pt")
    gpt2.save_checkpoint(init, tiny(5), tokenizer=BYTES.dumps())
    common = ["--init", init, "--data", task_folder(tmp_path), "--max-steps", "4", "--beta", "0.04", "--updates",
              "2", "--warmup-steps", "2", "--min-lr-ratio", "0.1", *RUN]
    grpo.main([*common, "--out-dir", str(tmp_path / "straight")])
    with monkeypatch.context() as m:  # the first part's clock reads 1,000 s more at every look
        m.setattr(grpo, "time", types.SimpleNamespace(time=itertools.count(0, 1000).__next__))
        grpo.main([*common, "--out-dir", str(tmp_path / "split"), "--stop-after", "2"])
    grpo.main(["--resume", "--out-dir", str(tmp_path / "split")])
    # train_s counts the stopped part's seconds too
    assert [r["train_s"] for r in metrics(tmp_path / "split") if "train_s" in r][-1] >= 1000
    capsys.readouterr()
    grpo.main(["--resume", "--out-dir", str(tmp_path / "split"), "--lr", "0.5"])  # finished: trains nothing
    assert "--resume goes on with the run's own settings; not used: --lr 0.5 (the run's: " in capsys.readouterr().out
    # lr 1e-3: warmup (1/2, 2/2), then cosine from the peak: 0.1 + 0.9 * (1 + cos(pi * 1/2)) / 2 = 0.55 of it
    assert all(len(set(lr)) == 1 for lr in lrs)  # every parameter group
    assert [lr[0] for lr in lrs] == pytest.approx([5e-4, 1e-3, 1e-3, 5.5e-4] * 2)  # straight, then split + resume
    assert [r["skipped"] for r in metrics(tmp_path / "straight") if "skipped" in r] == [0, 0, 0, 0]
    keys = ("step", "lr", "reward", "loss", "kl", "clip_frac", "entropy", "accuracy")
    rows = lambda d: [{k: r.get(k) for k in keys} for r in metrics(d) if "train_s" not in r]
    assert rows(tmp_path / "split") == rows(tmp_path / "straight") and len(rows(tmp_path / "split")) == 4 + 3
    a = gpt2.load_checkpoint(str(tmp_path / "straight" / "ckpt.pt"))
    b = gpt2.load_checkpoint(str(tmp_path / "split" / "ckpt.pt"))
    assert a["step"] == b["step"] == 4 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert not torch.equal(a["model"]["lm_head.weight"], tiny(5).state_dict()["lm_head.weight"])
    logged = [r for r in metrics(tmp_path / "straight") if r.get("skipped") == 0]
    assert logged and {"reward", "train_accuracy", "zero_signal", "kl", "clip_frac", "entropy", "length"} <= set(logged[0])


def test_the_sft_models_template_is_the_default(tmp_path, monkeypatch):
    """A policy SFT-trained with the preamble is asked with it: its checkpoint's template wins over the preset's
    (for a model that records none), and --preamble / --no-preamble over both."""
    pre, plain = str(tmp_path / "pre.pt"), str(tmp_path / "plain.pt")
    gpt2.save_checkpoint(pre, tiny(5, block_size=256), tokenizer=BYTES.dumps(), template={"preamble": True})
    gpt2.save_checkpoint(plain, tiny(5, block_size=256), tokenizer=BYTES.dumps())
    seen = []
    monkeypatch.setattr(grpo, "accuracy", lambda model, tok, rows, args, *a: seen.append(args.preamble) or 0.0)
    for init, flags, want in ((pre, [], True), (pre, ["--no-preamble"], False), (plain, [], False),
                              (plain, ["--preamble"], True)):
        grpo.main(["--init", init, "--data", task_folder(tmp_path), "--max-steps", "1", "--out-dir",
                   str(tmp_path / "out"), *RUN, *flags])
        assert seen[-1] is want and gpt2.load_checkpoint(str(tmp_path / "out" / "ckpt.pt"))["template"] == {
            "preamble": want}, (init, flags)


def test_a_chat_template_needs_its_tokens(tmp_path):
    """--template chatml with the task's byte tokens: the error names the missing token (it was a traceback from
    deep inside, or, with a short context, a misleading "prompts are too long")."""
    init = str(tmp_path / "sft.pt")
    gpt2.save_checkpoint(init, tiny(5), tokenizer=BYTES.dumps())
    with pytest.raises(SystemExit, match=r"--template chatml: .* needs the special token <\|im_end\|>"):
        grpo.main(["--init", init, "--data", task_folder(tmp_path), "--template", "chatml", *RUN])


def test_float16_scales_the_loss_and_resumes_the_scale(tmp_path, monkeypatch):
    """--dtype float16 (a GPU without bf16 gets it from --dtype auto; it runs on the CPU too): every gradient step
    goes through the loss scaler, whose state is saved and resumed with the run, as in sft.py and train_gpt2.py."""
    monkeypatch.setattr(grpo, "score", lambda text, *a: sum(text.encode()) % 7 / 6)
    init = str(tmp_path / "sft.pt")
    gpt2.save_checkpoint(init, tiny(5), tokenizer=BYTES.dumps())
    common = ["--init", init, "--data", task_folder(tmp_path), "--max-steps", "4", "--updates", "2", *RUN,
              "--dtype", "float16"]
    grpo.main([*common, "--out-dir", str(tmp_path / "straight")])
    grpo.main([*common, "--out-dir", str(tmp_path / "split"), "--stop-after", "2"])
    grpo.main(["--resume", "--out-dir", str(tmp_path / "split"), "--dtype", "float16"])  # where it runs: a flag
    a, b = (gpt2.load_checkpoint(str(tmp_path / d / "ckpt.pt")) for d in ("straight", "split"))
    stepped = sum(1 - r["skipped"] for r in metrics(tmp_path / "straight") if "skipped" in r)
    assert stepped > 0 and a["scaler"]["_growth_tracker"] == 2 * stepped  # one scaled, finite step per update
    assert a["scaler"] == b["scaler"] and a["scaler"]["scale"] == 2.0 ** 16
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_accuracy_is_greedy_over_every_row(monkeypatch):
    """Each test row answered once, scored against its own answer, by greedy decoding: the same text whatever
    the random state, and the argmax continuation step by step; the fraction is over all rows across batches."""
    seen = []
    monkeypatch.setitem(bpe.VERIFIERS, "number", lambda text, answer: seen.append((text, answer)) or float(answer == "0"))
    model, args = tiny(8), settings(max_new_tokens=6, eval_batch_size=2, temperature=1.0)
    rows = [{"prompt": p, "answer": a} for p, a in (("a?", "0"), ("b?", "1"), ("c?", "2"))]
    torch.manual_seed(0)
    assert grpo.accuracy(model, BYTES, rows, args, "cpu", torch.float32) == pytest.approx(1 / 3)
    first, seen[:] = list(seen), []
    torch.manual_seed(1)
    grpo.accuracy(model, BYTES, rows, args, "cpu", torch.float32)
    assert [a for _, a in first] == ["0", "1", "2"] and seen == first
    ids = bpe.prompt_ids(BYTES, "a?", "alpaca", False)
    new = []
    with torch.no_grad():
        while len(new) < 6 and EOT not in new:
            new.append(int(model(torch.tensor([ids + new]))[0][0, -1, :BYTES.n_vocab].argmax()))
    assert first[0][0] == BYTES.decode(new)


def test_mean_over_processes_averages_and_keeps_the_worst_logp_diff(monkeypatch):
    """--fsdp's log: each statistic averaged over the processes, max_logp_diff (a worst case) their maximum.
    torch.distributed is faked: a second process reports max_logp_diff 3e-5 and reward 0 (keys sorted)."""
    other = torch.tensor([3e-5, 0.0], dtype=torch.float64)

    def all_reduce(t, op=None):
        t.add_(other) if op is None else t.copy_(torch.maximum(t, other))
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    out = grpo.mean_over_processes({"reward": 1.0, "max_logp_diff": 1e-5})
    assert out == pytest.approx({"reward": 0.5, "max_logp_diff": 3e-5})


def test_gsm8k_recipe_code_path(tmp_path):
    """The gpt2-gsm8k preset on a tiny random GPT-2-vocabulary model and a small file in GSM8K's format."""
    GPT(GPTConfig(block_size=256, vocab_size=50257, n_layer=1, n_head=2, n_embd=16)).save_pretrained(str(tmp_path / "hf"))
    gsm = [{"question": f"Tom has {a} apples and buys {a + 1}. How many now?",
            "answer": f"He has {a} + {a + 1} = <<{a}+{a + 1}={2 * a + 1}>>{2 * a + 1} apples.\n#### {2 * a + 1}"}
           for a in range(6)]
    (tmp_path / "gsm").mkdir()
    for split in ("train", "test"):
        (tmp_path / "gsm" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gsm))
    assert grpo.gsm8k_rows(tmp_path / "gsm" / "test.jsonl")[1] == {"prompt": gsm[1]["question"], "answer": "3"}
    grpo.main(["--preset", "gpt2-gsm8k", "--init", str(tmp_path / "hf"), "--data", str(tmp_path / "gsm"),
               "--out-dir", str(tmp_path / "run"), "--max-steps", "1", "--prompts", "2", "--group-size", "2",
               "--max-new-tokens", "4", "--eval-limit", "2", "--device", "cpu"])
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows if "accuracy" in r] == [0, 1] and rows[1]["length"] > 0
    ckpt = gpt2.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))
    assert ckpt["template"] == {"preamble": True} and ckpt["args"]["lr"] == 1e-6


def test_batch_size_is_the_prompts_per_rollout_batch():
    """The common flag vocabulary: --batch-size counts prompts per rollout batch, as in ppo.py (--prompts too)."""
    assert grpo.parse_args(["--batch-size", "4"]).prompts == grpo.parse_args(["--prompts", "4"]).prompts == 4
    assert grpo.parse_args([]).prompts == grpo.PRESETS["task"]["prompts"]


def test_gsm8k_is_downloaded_into_data_gsm8k(tmp_path, monkeypatch):
    """--data gsm8k on a fresh checkout (no data/gsm8k yet): both splits are fetched from GSM8K's URLs, then read."""
    monkeypatch.chdir(tmp_path)
    fetched = []

    def fake_download(url, path, **kwargs):
        fetched.append((url, os.path.relpath(path)))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(json.dumps({"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"}) + "\n")
    monkeypatch.setattr(grpo, "download", fake_download)
    train, test = grpo.load_rows("gsm8k")
    assert fetched == [(grpo.GSM8K_URL.format(s), os.path.join("data", "gsm8k", f"{s}.jsonl"))
                       for s in ("train", "test")]
    assert train == test == [{"prompt": "What is 2 + 2?", "answer": "4"}]
    fetched.clear()
    assert grpo.load_rows("gsm8k") == (train, test) and fetched == []  # the second time: from the folder


def test_bad_input_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no out/task-sft here: the error says how to make it
    with pytest.raises(SystemExit, match="python sft.py"):
        grpo.main(["--device", "cpu"])
    with pytest.raises(SystemExit, match="python sft.py --preset gpt2-alpaca"):  # the GSM8K recipe's input
        grpo.main(["--preset", "gpt2-gsm8k", "--device", "cpu"])
    with pytest.raises(SystemExit, match=r"(?s)out/task-columns-sft/ckpt.pt.*python sft.py --preset task-columns   "
                                         r"\(after: python train_gpt2.py --preset task-columns\)"):
        grpo.main(["--preset", "task-columns", "--device", "cpu"])
    columns = grpo.parse_args(["--preset", "task-columns"])  # the columns' answers: up to 48 bytes + the end
    assert (columns.data, columns.max_new_tokens, columns.out_dir) == ("task-columns", 64, "out/task-columns-grpo")
    with pytest.raises(SystemExit, match="at least 2"):
        grpo.main(["--group-size", "1"])
    with pytest.raises(SystemExit, match="give a temperature above 0"):
        grpo.main(["--temperature", "0"])
    with pytest.raises(SystemExit, match="no checkpoint"):
        grpo.main(["--resume", "--out-dir", str(tmp_path / "nothing")])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train.jsonl").write_text('{"question": "q", "answer": "no final"}\n')
    (tmp_path / "bad" / "test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
    init = str(tmp_path / "m.pt")
    gpt2.save_checkpoint(init, tiny(), tokenizer=BYTES.dumps())
    with pytest.raises(SystemExit, match="train.jsonl:1"):
        grpo.main(["--init", init, "--data", str(tmp_path / "bad"), "--device", "cpu"])
    (tmp_path / "bad" / "rl.jsonl").write_text('{"prompt": "What is 1 + 1?", "answer": "2"}\n' * 16)
    (tmp_path / "bad" / "test.jsonl").write_text("")  # else a ZeroDivisionError at the first evaluation
    with pytest.raises(SystemExit, match="test.jsonl holds no rows"):
        grpo.main(["--init", init, "--data", str(tmp_path / "bad"), "--device", "cpu"])
    (tmp_path / "bad" / "test.jsonl").write_text('{"prompt": "What is 1 + 1?", "answer": "2"}\n')
    with pytest.raises(SystemExit, match="--max-new-tokens 100 leaves no room for a prompt in the model's "
                                         "64-token context; lower it"):  # was: 17 prompts longer than -36 tokens
        grpo.main(["--init", init, "--data", str(tmp_path / "bad"), "--device", "cpu", "--max-new-tokens", "100"])


@pytest.mark.parametrize("flags,words", [
    (["--prompts", "0"], "--prompts 0: must be at least 1"),
    (["--max-steps", "0"], "--max-steps 0: must be at least 1"),
    (["--updates", "0"], "--updates 0: must be at least 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: must be at least 1"),
    (["--eval-batch-size", "0"], "--eval-batch-size 0: must be at least 1"),
    (["--lr", "-1"], "--lr -1.0: must be at least 0"),
    (["--beta", "-0.1"], "--beta -0.1: must be at least 0"),
    (["--clip-low", "-0.1"], "--clip-low -0.1: must be at least 0"),
    (["--clip-high", "-0.5"], "--clip-high -0.5: must be at least 0"),
    (["--grad-clip", "-1"], "--grad-clip -1.0: must be at least 0"),
    (["--eval-limit", "-1"], "--eval-limit -1: must be at least 0"),  # dropped the last test problem
    (["--stop-after", "0"], "--stop-after 0: must be at least 1"),  # ran every step
    (["--min-lr-ratio", "-1"], "--min-lr-ratio -1.0: must be at least 0"),  # the schedule's end: a negative lr
    (["--warmup-steps", "-1"], "--warmup-steps -1: must be at least 0")])  # started part-way down the cosine
def test_out_of_range_flags_are_refused(tmp_path, monkeypatch, flags, words):
    """Refused where they are parsed: not a ZeroDivisionError (--prompts 0), a run of no steps or updates, or
    one that silently does the opposite (a negative --beta rewards drifting away, a negative clip inverts the
    clamp, a negative --grad-clip reverses the gradient)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=words):
        grpo.main(flags)


@pytest.mark.parametrize("case", ["cuda", "reward_model", "char_gpt", "resume_other", "data_file", "long_prompt"])
def test_wrong_inputs_are_clear_errors(tmp_path, monkeypatch, case):
    """A mistaken device, model, run directory or --data: a SystemExit naming it and the fix, never a traceback
    from deep inside (nor, for a reward model as --init, a silent run)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine
    init, data = str(tmp_path / "sft.pt"), task_folder(tmp_path)
    gpt2.save_checkpoint(init, tiny(), tokenizer=BYTES.dumps())
    head = {"weight": torch.zeros(1, 32), "bias": torch.zeros(1)}
    gpt2.save_checkpoint(str(tmp_path / "rm.pt"), tiny(), tokenizer=BYTES.dumps(), value_head=head, method="rm")
    gpt2.save_checkpoint(str(tmp_path / "ppo" / "ckpt.pt"), tiny(), tokenizer=BYTES.dumps(), args={"kl_coef": 0.02})
    torch.save({"model": {}, "config": {"vocab_size": 65, "batch_size": 32}}, tmp_path / "char.pt")
    (tmp_path / "long").mkdir()
    long = [{"prompt": "What is " + "1 + " * 20 + "1?", "answer": "21"}] * 4
    for split in ("rl", "test"):
        bpe.write_rows(tmp_path / "long" / f"{split}.jsonl", long)
    argv, words = {
        "cuda": (["--device", "cuda"], "--device cuda asked for, but no CUDA GPU"),
        "reward_model": (["--init", str(tmp_path / "rm.pt")], "is a reward model"),
        "char_gpt": (["--init", str(tmp_path / "char.pt")], "not a gpt2.py model checkpoint"),
        "resume_other": (["--resume", "--out-dir", str(tmp_path / "ppo")], "was not written by grpo.py"),
        "data_file": (["--data", str(tmp_path / "rl.jsonl")], "a file; give a folder with rl.jsonl"),
        "long_prompt": (["--data", str(tmp_path / "long")],
                        r"8 prompts .* longer than the 56 tokens the model's 64-token context leaves"),
    }[case]
    with pytest.raises(SystemExit, match=words):
        grpo.main(["--init", init, "--data", data, "--device", "cpu", "--prompts", "2", "--max-new-tokens", "8",
                   *argv])


@pytest.mark.parametrize("how", grpo.LOSSES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_equals_trl(how, beta):
    """TRL's GRPOTrainer._compute_loss (loss_type grpo / dapo / dr_grpo, epsilon low / high, the k3 KL at beta > 0)
    on the same hand-made log-probabilities, advantages and masks: the loss, its gradient and the KL. TRL's method
    runs on a stand-in for the trainer holding only what it reads; its model forward returns the hand-made numbers."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl import GRPOTrainer
    g = torch.Generator().manual_seed(0)
    B, N, max_len, lo, hi = 6, 5, 8, 0.15, 0.3
    mask = (torch.arange(N)[None] < torch.tensor([5, 1, 3, 2, 5, 4])[:, None]).float()  # answers of 1 to 5 tokens
    old = -torch.rand(B, N, generator=g) * 3
    logp0 = old + torch.randn(B, N, generator=g) * 0.4  # off-policy: ratios on both sides of both clips
    ratio = (logp0 - old).exp()[mask.bool()]
    assert (ratio < 1 - lo).any() and (ratio > 1 + hi).any() and ((ratio > 1 - lo) & (ratio < 1 + hi)).any()
    ref = old + torch.randn(B, N, generator=g) * 0.3
    adv = torch.tensor([1.2, -0.7, 0.4, -1.5, 0.0, 0.9])

    logp = logp0.clone().requires_grad_()
    ours, s = grpo.grpo_loss(logp, old, adv, mask, clip_low=lo, clip_high=hi, beta=beta, ref_logp=ref, how=how,
                             max_len=max_len)
    ours.backward()

    their_logp = logp0.clone().requires_grad_()
    same = lambda x, **kw: x
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **kw: (their_logp, torch.ones(B, N), None),
        loss_type=how, beta=beta, epsilon_low=lo, epsilon_high=hi, max_completion_length=max_len,
        importance_sampling_level="token", top_entropy_quantile=1.0, off_policy_mask_threshold=None, use_vllm=False,
        vllm_importance_sampling_correction=False, aux_loss_enabled=False, _entropy_bonus_enabled=False,
        current_gradient_accumulation_steps=1, model=SimpleNamespace(training=True), _metrics={"train": defaultdict(list)},
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        accelerator=SimpleNamespace(num_processes=1, gather=same, reduce=same))
    inputs = {"prompt_ids": torch.zeros(B, 3, dtype=torch.long), "prompt_mask": torch.ones(B, 3, dtype=torch.long),
              "completion_ids": torch.zeros(B, N, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": mask.sum()}
    theirs = GRPOTrainer._compute_loss(trainer, None, inputs)
    theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)
    torch.testing.assert_close(logp.grad, their_logp.grad, rtol=1e-5, atol=1e-7)
    assert (logp.grad != 0).any() and (logp.grad[~mask.bool()] == 0).all()
    if beta:
        assert s["kl"] == pytest.approx(trainer._metrics["train"]["kl"][-1], abs=1e-6) and s["kl"] > 0.01


def test_compile_flag_compiles_the_training_passes(tmp_path, monkeypatch, counting_compile):
    """--compile must reach the policy's and the reference's training forward passes (it was once accepted and
    ignored); counting_compile stands in for torch.compile."""
    fake, calls = counting_compile
    monkeypatch.setattr(grpo, "maybe_compile", fake)
    init = str(tmp_path / "sft.pt")
    gpt2.save_checkpoint(init, tiny(5), tokenizer=BYTES.dumps())
    grpo.main(["--init", init, "--data", task_folder(tmp_path), "--max-steps", "3", "--updates", "2", "--compile",
               *RUN, "--out-dir", str(tmp_path / "c")])
    trained = [r for r in metrics(tmp_path / "c") if r.get("skipped") == 0]
    assert trained, "no step had a learning signal"
    assert sorted(calls) == [len(trained), 2 * len(trained)]  # reference once, policy once per update


def test_offline_init_is_an_error_naming_the_files(tmp_path, offline):
    """An HF hub model (--init owner/name) without network: the script's one-line error names the download and where
    to put it."""
    with pytest.raises(SystemExit) as e:
        grpo.main(["--init", "Qwen/Qwen2.5-Math-1.5B", "--out-dir", str(tmp_path / "out")])
    assert str(e.value.code).startswith("grpo.py: error: --init Qwen/Qwen2.5-Math-1.5B: cannot reach "
                                        "https://huggingface.co to list")
    assert "pass its directory" in str(e.value.code)
