"""Tests of reward_model.py: the Bradley-Terry and DPO losses on hand-made numbers, the reward read at the last
real token whatever the padding, DPO's response-only log-probabilities, bad pairs, exact resume, a learning run,
and the gpt2-dpo recipe's code path. CPU only, offline, tiny models."""

import argparse
import copy
import itertools
import json
import math
import os
import types

import pytest
import torch

import bpe
import gpt2
import reward_model as rm
from gpt2 import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BYTES = bpe.byte_tokenizer()
EOT = BYTES.eot_token
LN2 = math.log(2)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(block_size=96, vocab_size=257, n_layer=2, n_head=2, n_embd=32, pos_emb="rope")
    return GPT(GPTConfig(**{**cfg, **kw})).eval()


def logsig(x):
    return -math.log(1 + math.exp(-x))


# -----------------------------------------------------------------------------
# The losses


def test_bradley_terry_loss_on_hand_made_rewards():
    c, r = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 1.0, -1.0])
    assert rm.bt_loss(c, r).item() == pytest.approx(-(logsig(2) + logsig(-1) + logsig(0)) / 3, abs=1e-6)
    margin = torch.tensor([1.0, 0.5, 0.0])
    assert rm.bt_loss(c, r, margin).item() == pytest.approx(-(logsig(1) + logsig(-1.5) + logsig(0)) / 3, abs=1e-6)
    centered = rm.bt_loss(c, r, margin, center=0.1).item()
    assert centered == pytest.approx(-(logsig(1) + logsig(-1.5) + logsig(0)) / 3 + 0.1 * (4 + 1 + 4) / 3, abs=1e-6)
    # the loss sees only differences; centering is what moves the mean
    assert rm.bt_loss(c + 5, r + 5).item() == pytest.approx(rm.bt_loss(c, r).item(), abs=1e-6)
    assert rm.bt_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(LN2, abs=1e-7)


def test_dpo_loss_on_hand_made_logprobs():
    pi_c, pi_r, ref_c, ref_r = (torch.tensor([v]) for v in (-5.0, -9.0, -6.0, -7.0))
    loss, r_c, r_r = rm.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.5)
    assert r_c.item() == pytest.approx(0.5) and r_r.item() == pytest.approx(-1.0)
    assert loss.item() == pytest.approx(-logsig(1.5), abs=1e-6)
    # the chosen log-probability falls (-6 -> -8) and yet the margin is positive: the rejected fell further
    loss, r_c, r_r = rm.dpo_loss(torch.tensor([-8.0]), torch.tensor([-12.0]), ref_c, ref_r, beta=0.1)
    assert r_c.item() < 0 and (r_c - r_r).item() == pytest.approx(0.3) and loss.item() < LN2


# -----------------------------------------------------------------------------
# The reward model: the last real token, whatever the padding


def reward_model(seed=0, **kw):
    model = rm.RewardModel(tiny(seed, **kw)).eval()
    with torch.no_grad():
        model.value_head.weight.normal_(0, 1.0)
    return model


def test_reward_does_not_depend_on_padding():
    model = reward_model()
    seqs = [[5, 9, 200, 31, 7, 7, 64, EOT], [12, EOT], [100, 3, 250, 40, EOT]]
    alone = torch.cat([model(torch.tensor([s])) for s in seqs])
    assert alone.std() > 0.1  # the rewards differ, so a wrong row or position would show
    for s, r in zip(seqs, alone):  # the value head on the final hidden state of the last token, the end-of-text
        assert r.item() == pytest.approx(model.value_head(model.gpt.hidden_states(torch.tensor([s]))[0, -1]).item(),
                                         abs=1e-5)
    idx, attn = gpt2.left_pad(seqs, pad_id=EOT)
    torch.testing.assert_close(model(idx, attn), alone, rtol=1e-5, atol=1e-5)
    for pad in (0, EOT, 99):
        T = max(map(len, seqs))
        right = torch.tensor([s + [pad] * (T - len(s)) for s in seqs])
        mask = rm.right_mask(torch.tensor([len(s) for s in seqs]), T)
        torch.testing.assert_close(model(right, mask), alone, rtol=1e-5, atol=1e-5)
    # the batches reward_model.py builds: chosen rows first, then rejected, right-padded with the end-of-text
    pairs = rm.encode_pairs([{"prompt": "What is 2 + 3?", "chosen": "2 + 3 = 5", "rejected": "2 + 3 = 15"},
                             {"prompt": "What is 9 - 1?", "chosen": "9 - 1 = 8", "rejected": "9 - 1 = 7"}], BYTES, False, 96)
    ids, mask, lengths, _ = rm.pad_pairs(pairs, EOT)
    seqs = [c[0] for c, _, _ in pairs] + [j[0] for _, j, _ in pairs]
    torch.testing.assert_close(model(ids, rm.right_mask(lengths, ids.size(1))),
                               torch.cat([model(torch.tensor([s])) for s in seqs]), rtol=1e-5, atol=1e-5)


def test_untrained_reward_model_on_symmetric_data_gives_ln2():
    rows = [{"prompt": f"What is {a} + {b}?", "chosen": f"{a} + {b} = {a + b}", "rejected": f"{a} + {b} = {a + b + 1}"}
            for a in range(4) for b in range(3)]
    rows += [{"prompt": r["prompt"], "chosen": r["rejected"], "rejected": r["chosen"]} for r in rows]  # each both ways
    pairs = rm.encode_pairs(rows, BYTES, False, 96)
    model = rm.RewardModel(tiny())  # a fresh value head: every reward 0
    loss, r_c, r_r, _ = rm.pair_scores(model, None, rm.pad_pairs(pairs, EOT), "rm", None, 0.0, "cpu")
    assert loss.item() == pytest.approx(LN2, abs=1e-7) and (r_c == 0).all()
    model = reward_model()  # a random head: on data given both ways, the margins cancel
    loss, r_c, r_r, _ = rm.pair_scores(model, None, rm.pad_pairs(pairs, EOT), "rm", None, 0.0, "cpu")
    assert (r_c - r_r).abs().max() > 0.01 and (r_c - r_r).mean().abs() < 1e-5 and loss.item() > LN2


def test_held_out_metrics_cover_every_pair():
    """evaluate_pairs in batches of 2 over 5 pairs: the rewards of all 5, the loss their mean Bradley-Terry loss,
    accuracy the share with r_c > r_r, and the margin the signed mean of r_c - r_r."""
    model = reward_model(seed=3)
    rows = [{"prompt": f"What is {a} + {b}?", "chosen": f"{a} + {b} = {a + b}", "rejected": f"{a} + {b} = {a * b + 3}"}
            for a, b in ((3, 4), (12, 5), (1, 1), (7, 0), (9, 9))]
    pairs = rm.encode_pairs(rows, BYTES, False, 96)
    args = argparse.Namespace(eval_batch_size=2, pad_id=EOT, method="rm", beta=None, center_rewards=0.0, rpo_alpha=0.0)
    row, chosen, rejected = rm.evaluate_pairs(model, None, pairs, args, "cpu", torch.float32)
    want_c = [model(torch.tensor([c[0]])).item() for c, _, _ in pairs]  # each answer alone
    want_r = [model(torch.tensor([j[0]])).item() for _, j, _ in pairs]
    assert chosen == pytest.approx(want_c, abs=1e-5) and rejected == pytest.approx(want_r, abs=1e-5)
    diffs = [c - r for c, r in zip(want_c, want_r)]
    wins = sum(d > 0 for d in diffs)
    assert 0 < wins < 5  # the random head ranks some pairs wrong, so a margin's sign shows
    assert row["accuracy"] == pytest.approx(wins / 5) and row["margin"] == pytest.approx(sum(diffs) / 5, abs=1e-5)
    assert row["val_loss"] == pytest.approx(-sum(logsig(d) for d in diffs) / 5, abs=1e-5)


# -----------------------------------------------------------------------------
# DPO


def test_dpo_is_ln2_with_zero_margin_when_policy_is_reference():
    policy = tiny(dropout=0.0)
    ref = copy.deepcopy(policy)
    rows = [{"prompt": "What is 3 + 4?", "chosen": "3 + 4 = 7", "rejected": "3 + 4 = 8"},
            {"prompt": "What is 12 - 5?", "chosen": "12 - 5 = 7", "rejected": "12 - 5 = 13, I think"}]
    batch = rm.pad_pairs(rm.encode_pairs(rows, BYTES, False, 96), EOT)
    loss, r_c, r_r, logp_c = rm.pair_scores(policy, ref, batch, "dpo", 0.1, 0.0, "cpu")
    assert loss.item() == LN2 or loss.item() == pytest.approx(LN2, abs=1e-7)
    assert (r_c == 0).all() and (r_r == 0).all() and (logp_c < 0).all()
    loss.backward()  # and the gradient reaches the policy, not the reference
    assert policy.lm_head.weight.grad.abs().sum() > 0 and ref.lm_head.weight.grad is None


def test_held_out_dpo_loss_is_the_dpo_loss_alone():
    """With --rpo-alpha the held-out loss stays DPO's own (the mean of -log sigmoid(r_c - r_r) over the pairs): the
    RPO term is normalized per batch, so with it the number would change with --eval-batch-size."""
    policy, ref = tiny(dropout=0.0), tiny(dropout=0.0, seed=7)
    rows = [{"prompt": f"What is {a} + {b}?", "chosen": f"{a} + {b} = {a + b}", "rejected": f"{a} + {b} = {a * b + 3}"
             + "!" * a} for a, b in ((3, 4), (12, 5), (1, 1), (7, 0), (9, 9))]  # uneven lengths
    pairs = rm.encode_pairs(rows, BYTES, False, 96)
    losses = []
    for bs in (2, 5):
        args = argparse.Namespace(eval_batch_size=bs, pad_id=EOT, method="dpo", beta=0.1, center_rewards=0.0,
                                  rpo_alpha=1.0)
        row, chosen, rejected = rm.evaluate_pairs(policy, ref, pairs, args, "cpu", torch.float32)
        assert row["val_loss"] == pytest.approx(-sum(logsig(c - r) for c, r in zip(chosen, rejected)) / 5, abs=1e-6)
        losses.append(row["val_loss"])
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)


def test_dpo_logprobs_count_response_tokens_only():
    model = tiny()
    rows = [{"prompt": "What is 3 + 4?", "chosen": "3 + 4 = 7", "rejected": "no idea"},
            {"prompt": "Add 1 and 2, please, quickly.", "chosen": "3", "rejected": "1 + 2 = 4"}]
    pairs = rm.encode_pairs(rows, BYTES, False, 96)
    ids, mask, _, _ = rm.pad_pairs(pairs, EOT)
    got = rm.sequence_logprobs(model, ids, mask)
    for row, (s, m) in enumerate([c for c, _, _ in pairs] + [j for _, j, _ in pairs]):
        logp = model(torch.tensor([s]))[0][0].log_softmax(-1)  # (T, V), this row alone
        want = sum(logp[i - 1, s[i]].item() for i in range(1, len(s)) if m[i])
        assert got[row].item() == pytest.approx(want, abs=1e-4)
        n_resp = len(BYTES.encode(rows[row % 2]["chosen" if row < 2 else "rejected"])) + 1  # + its end-of-text
        assert sum(m) == n_resp
    # the same response after another prompt: only its conditional log-probabilities change, not its token count
    assert got[0].item() > -len(BYTES.encode("3 + 4 = 7")) * 10


def test_rpo_adds_the_chosen_answers_token_nll():
    """--rpo-alpha: DPO + alpha x the mean negative log-likelihood per chosen response token (TRL's rpo_alpha)."""
    policy, ref = tiny(seed=1), tiny(seed=2)
    rows = [{"prompt": "What is 3 + 4?", "chosen": "3 + 4 = 7", "rejected": "3 + 4 = 8"},
            {"prompt": "What is 12 - 5?", "chosen": "12 - 5 = 7, I think", "rejected": "12 - 5 = 13"}]
    pairs = rm.encode_pairs(rows, BYTES, False, 96)
    batch = rm.pad_pairs(pairs, EOT)
    dpo = rm.pair_scores(policy, ref, batch, "dpo", 0.1, 0.0, "cpu")[0]
    rpo = rm.pair_scores(policy, ref, batch, "dpo", 0.1, 0.0, "cpu", rpo_alpha=0.5)[0]
    nll, n = 0.0, 0
    for s, m in (c for c, _, _ in pairs):  # each chosen answer alone, its response tokens only
        logp = policy(torch.tensor([s]))[0][0].log_softmax(-1)
        nll -= sum(logp[i - 1, s[i]].item() for i in range(1, len(s)) if m[i])
        n += sum(m[1:])
    assert n == len("3 + 4 = 7") + len("12 - 5 = 7, I think") + 2  # + each end-of-text
    assert rpo.item() == pytest.approx(dpo.item() + 0.5 * nll / n, abs=1e-5)


def test_lm_alpha_adds_the_chosen_answers_token_nll():
    """rm --lm-alpha: the Bradley-Terry loss + alpha x the mean next-token NLL per chosen response token, from the
    GPT's own lm_head; the rewards themselves do not change."""
    model = reward_model(seed=1)
    rows = [{"prompt": "What is 3 + 4?", "chosen": "3 + 4 = 7", "rejected": "3 + 4 = 8"},
            {"prompt": "What is 12 - 5?", "chosen": "12 - 5 = 7, I think", "rejected": "12 - 5 = 13"}]
    pairs = rm.encode_pairs(rows, BYTES, False, 96)
    batch = rm.pad_pairs(pairs, EOT)
    bt, r_c, r_r, none = rm.pair_scores(model, None, batch, "rm", None, 0.0, "cpu")
    both, r_c2, r_r2, logp = rm.pair_scores(model, None, batch, "rm", None, 0.0, "cpu", lm_alpha=0.5)
    nll, n = 0.0, 0
    for s, m in (c for c, _, _ in pairs):  # each chosen answer alone, its response tokens only
        logits = model.gpt(torch.tensor([s]))[0][0].log_softmax(-1)
        nll -= sum(logits[i - 1, s[i]].item() for i in range(1, len(s)) if m[i])
        n += sum(m[1:])
    assert n == len("3 + 4 = 7") + len("12 - 5 = 7, I think") + 2  # + each end-of-text
    assert both.item() == pytest.approx(bt.item() + 0.5 * nll / n, abs=1e-5) and none is None
    assert logp.item() == pytest.approx(-nll / n, abs=1e-5)
    torch.testing.assert_close((r_c2, r_r2), (r_c, r_r))
    both.backward()  # the LM term reaches the body through the (tied) token embedding and output head
    assert model.gpt.lm_head.weight.grad.abs().sum() > 0


def test_head_lr_mult_scales_the_value_heads_learning_rate(tmp_path):
    """--head-lr-mult 10: the first step of Adam moves each weight by about its learning rate, whatever the
    gradient's size, so the zero-initialised value head comes out at 10 x --lr; the body keeps --lr. Weight
    decay shrinks matrices only, as in the DPO path (gpt2's configure_optimizer): not biases or norm gains."""
    init, data = base_checkpoint(tmp_path / "base.pt"), task_folder(tmp_path / "task", preference=60, test=5)
    rm.main(["--init", init, "--data", data, "--val-pairs", "20", "--max-steps", "1", "--batch-size", "8",
             "--warmup-steps", "1", "--lr", "1e-3", "--head-lr-mult", "10", "--weight-decay", "0.1",
             "--out-dir", str(tmp_path / "run"), *RUN])
    ckpt = gpt2.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))
    assert ckpt["value_head"]["weight"].abs().max().item() == pytest.approx(1e-2, rel=0.01)
    groups = ckpt["optimizer"]["param_groups"]  # body matrices, body vectors, head weight, head bias
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-3, 1e-2, 1e-2])
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0, 0.1, 0.0] and [len(g["params"]) for g in groups][2:] == [1, 1]


# -----------------------------------------------------------------------------
# Bad input


def test_bad_pairs_are_dropped_counted_or_refused(tmp_path, capsys):
    rows = [{"prompt": "p", "chosen": "same", "rejected": "same"},
            {"prompt": "p", "chosen": "a" * 200, "rejected": "b"},
            {"prompt": "p", "chosen": "yes", "rejected": "no"}]
    pairs = rm.encode_pairs(rows, BYTES, False, 96)
    assert len(pairs) == 1 and "dropped 1 of 3 pairs whose chosen and rejected answers are equal and 1 longer " \
                                "than 96 tokens" in capsys.readouterr().out
    with pytest.raises(ValueError, match="none of the 2 pairs"):
        rm.encode_pairs(rows[:2], BYTES, False, 96)
    with pytest.raises(ValueError, match="'margin' must be a number"):
        rm.encode_pairs([{"prompt": "p", "chosen": "y", "rejected": "n", "margin": "big"}], BYTES, False, 96)
    assert rm.encode_pairs([{"prompt": "p", "chosen": "y", "rejected": "n", "margin": 2}], BYTES, False, 96)[0][2] == 2.0
    (tmp_path / "bad.json").write_text(json.dumps([{"instruction": "i", "chosen": "c", "rejected": "r"},
                                                   {"instruction": "i", "chosen": "c"}]))
    with pytest.raises(ValueError, match=r"bad.json: item 1: field 'rejected' is missing"):
        rm.read_pairs(tmp_path / "bad.json")
    shipped = rm.read_pairs(os.path.join(ROOT, "data", "instruction_preference_data.json"))
    assert len(shipped) == 1100 and shipped[0]["prompt"].startswith("Evaluate") and shipped[0]["input"]
    assert sum(r["chosen"] == r["rejected"] for r in shipped) == 6  # the real file has some: they are dropped


def test_length_limit_whitespace_and_input():
    """A pair is kept when its longer side fills max_len exactly and dropped one token over, whichever side is the
    longer; answers equal but for surrounding whitespace teach nothing; an Alpaca row's input is in both prompts."""
    n = len(BYTES.encode(bpe.format_prompt("p", "", False)))  # prompt tokens
    fit = "y" * (96 - n - 1)  # + the end-of-text: 96 tokens
    rows = [{"prompt": "p", "chosen": fit, "rejected": "n"}, {"prompt": "p", "chosen": "y", "rejected": fit},
            {"prompt": "p", "chosen": fit + "y", "rejected": "n"}, {"prompt": "p", "chosen": "y", "rejected": fit + "n"},
            {"prompt": "p", "chosen": "same", "rejected": " same\n"}]
    pairs = rm.encode_pairs(rows, BYTES, False, 96)
    assert [(len(c[0]), len(j[0])) for c, j, _ in pairs] == [(96, n + 2), (n + 2, 96)]
    row = {"prompt": "Translate", "input": "chat", "chosen": "cat", "rejected": "dog"}
    (c, _), (j, _), _ = rm.encode_pairs([row], BYTES, True, 1000)[0]
    prompt = BYTES.encode(bpe.format_prompt("Translate", "chat", True))
    assert c[:len(prompt)] == prompt == j[:len(prompt)] and c[len(prompt):] == BYTES.encode("cat") + [EOT]


def test_loader_epochs_are_seeded_permutations():
    """Each epoch serves every pair at most once in steps_per_epoch full batches (10 pairs, batches of 3: 9 of them),
    in a shuffled order that changes from epoch to epoch and depends on the seed and the step alone."""
    pairs = [(([1, 2], [0, 1]), ([1, 3], [0, 1]), float(i)) for i in range(10)]  # the margin names the pair
    served = lambda loader, step: loader.get(step)[3].int().tolist()
    loader = rm.Loader(pairs, 3, seed=0, pad_id=EOT)
    assert loader.steps_per_epoch == 3
    epochs = [sum((served(loader, s) for s in range(3 * e, 3 * e + 3)), []) for e in range(3)]
    assert all(len(set(e)) == 9 and set(e) <= set(range(10)) for e in epochs)
    assert epochs[0] != list(range(9)) and epochs[0] != epochs[1] != epochs[2]
    again = rm.Loader(pairs, 3, seed=0, pad_id=EOT)  # any step, in any order: the same batch
    assert [served(again, 7), served(again, 0)] == [epochs[2][3:6], epochs[0][:3]]
    assert sum((served(rm.Loader(pairs, 3, seed=1, pad_id=EOT), s) for s in range(3)), []) != epochs[0]


def test_a_pairs_file_is_split_in_order(tmp_path):
    """--data file --split 85/5/10 on 20 pairs: the first 17 train, the next 2 are the test part (unused), the last
    one is the validation pair."""
    bpe.write_rows(tmp_path / "p.jsonl", [{"prompt": f"q{i}", "chosen": "y", "rejected": "n"} for i in range(20)])
    train, val, test = rm.load_splits(argparse.Namespace(data=str(tmp_path / "p.jsonl"), split="85/5/10", val_pairs=None))
    assert [r["prompt"] for r in train] == [f"q{i}" for i in range(17)] and [r["prompt"] for r in val] == ["q19"]
    assert test == []


# -----------------------------------------------------------------------------
# The script


def test_bad_splits_and_sizes_are_clear_errors(tmp_path):
    """Holding out every pair (or none of a small set), or a zero batch / step count, fails with the flag to
    change instead of training on nothing."""
    init, data = base_checkpoint(tmp_path / "base.pt"), task_folder(tmp_path / "task", preference=10, test=5)
    with pytest.raises(SystemExit, match="--val-pairs 10 holds out all 10"):
        rm.main(["--init", init, "--data", data, "--val-pairs", "10", *RUN])
    args = argparse.Namespace(data=data, val_pairs=0)  # 10 // 20 = 0 held out: at least one is
    train, val, _ = rm.load_splits(args)
    assert (len(train), len(val)) == (9, 1)
    bpe.write_rows(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "y", "rejected": "n"}] * 20)
    with pytest.raises(SystemExit, match="train and val above 0"):
        rm.main(["--init", init, "--data", str(tmp_path / "p.jsonl"), "--split", "90/0/10", *RUN])
    for flag in ("--batch-size", "--max-steps"):
        with pytest.raises(SystemExit, match=f"{flag} 0: must be at least 1"):
            rm.main([flag, "0"])


def base_checkpoint(path, **kw):
    gpt2.save_checkpoint(str(path), tiny(**kw), tokenizer=BYTES.dumps(), template={"preamble": False})
    return str(path)


def task_folder(path, **sizes):
    bpe.task_files(path, seed=0, sizes={"pretrain": 10, "sft": 10, "sft_val": 10, "rl": 10, **sizes}, max_digits=1)
    return str(path)


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


RUN = ["--device", "cpu", "--dtype", "float32", "--eval-batch-size", "50"]


@pytest.mark.parametrize("method", [["--method", "rm"], ["--method", "dpo"], ["--method", "rm", "--lora"],
                                    ["--method", "rm", "--margin", "0.5", "--center-rewards", "0.01"],
                                    ["--method", "rm", "--lm-alpha", "0.5", "--head-lr-mult", "5"]])
def test_resume_is_exact(tmp_path, method, monkeypatch, capsys):
    init, data = base_checkpoint(tmp_path / "base.pt", dropout=0.1), task_folder(tmp_path / "task", preference=120, test=10)
    common = ["--init", init, "--data", data, "--val-pairs", "20", "--max-steps", "6", "--batch-size", "8",
              "--eval-interval", "3", "--warmup-steps", "2", "--lr", "3e-3", "--max-new-tokens", "6", *RUN, *method]
    rm.main([*common, "--out-dir", str(tmp_path / "straight")])
    with monkeypatch.context() as m:  # the first part's clock reads 1,000 s more at every look
        m.setattr(rm, "time", types.SimpleNamespace(time=itertools.count(0, 1000).__next__))
        rm.main([*common, "--out-dir", str(tmp_path / "split"), "--stop-after", "3"])
    rm.main(["--resume", "--out-dir", str(tmp_path / "split")])
    # train_s counts the stopped part's seconds too
    assert [r["train_s"] for r in metrics(tmp_path / "split") if "train_s" in r][-1] >= 1000
    capsys.readouterr()
    rm.main(["--resume", "--out-dir", str(tmp_path / "split"), "--lr", "0.5"])  # finished: trains nothing
    assert "--resume goes on with the run's own settings; not used: --lr 0.5 (the run's: " in capsys.readouterr().out
    train = lambda d: [(r["step"], r["train_loss"]) for r in metrics(d) if "train_loss" in r]
    assert train(tmp_path / "split") == train(tmp_path / "straight") and len(train(tmp_path / "split")) == 6
    a = gpt2.load_checkpoint(str(tmp_path / "straight" / "ckpt.pt"))
    b = gpt2.load_checkpoint(str(tmp_path / "split" / "ckpt.pt"))
    assert a["step"] == b["step"] == 6 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["template"] == {"preamble": False} and bpe.Tokenizer.loads(a["tokenizer"]).encode("7") == BYTES.encode("7")
    val = [r for r in metrics(tmp_path / "split") if "val_loss" in r]
    assert [r["step"] for r in val] == [0, 3, 6]
    if "dpo" in method:
        assert "value_head" not in a and val[0]["val_loss"] == pytest.approx(LN2, abs=1e-6) and val[0]["margin"] == 0
        assert "task_accuracy" in val[0] and "chosen_logp" in metrics(tmp_path / "split")[1]
    else:  # what ppo.py loads: a plain GPT and the value head
        assert a["value_head"]["weight"].shape == (1, 32) and torch.equal(a["value_head"]["weight"], b["value_head"]["weight"])
        assert a["value_head"]["weight"].abs().sum() > 0
        loaded = rm.RewardModel(GPT.from_checkpoint(str(tmp_path / "split" / "ckpt.pt")))
        loaded.value_head.load_state_dict(a["value_head"])
        if "--margin" not in method:
            assert val[0]["val_loss"] == pytest.approx(LN2, abs=1e-6)
        assert "chosen_token_logp" in metrics(tmp_path / "split")[1]  # the task preset's --lm-alpha is 1


def polite_pairs(path, n, seed=0):
    """Pairs like the real polite / impolite file: the same answer, the rejected one with a rude phrase."""
    rng = __import__("random").Random(seed)
    rude = ["you fool", "obviously", "stop asking", "ugh"]
    rows = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        rows.append({"prompt": f"What is {a} + {b}?", "chosen": f"{a} + {b} = {a + b}",
                     "rejected": f"{a} + {b} = {a + b}, {rng.choice(rude)}"})
    bpe.write_rows(path / "preference.jsonl", rows)
    return str(path)


@pytest.mark.parametrize("method", ["rm", "dpo"])
def test_learns_the_preference(tmp_path, method):
    """From a random model: held-out pair accuracy rises from 0 (every pair a tie: an untrained reward model
    scores every answer 0; DPO's policy starts equal to its reference) to well above 50%."""
    data = polite_pairs(tmp_path, 400)
    rm.main(["--init", base_checkpoint(tmp_path / "base.pt"), "--data", data, "--val-pairs", "100", "--method", method,
             "--out-dir", str(tmp_path / "run"), "--max-steps", "40", "--batch-size", "16", "--lr", "3e-3",
             "--beta", "0.5", "--warmup-steps", "5", "--eval-interval", "0", *RUN])
    rows = [r for r in metrics(tmp_path / "run") if "accuracy" in r]
    assert rows[0]["accuracy"] == 0.0 and rows[0]["val_loss"] == pytest.approx(LN2, abs=1e-6)
    assert rows[-1]["accuracy"] >= 0.9 and rows[-1]["margin"] > 1.0 and rows[-1]["val_loss"] < 0.4, rows
    assert (tmp_path / "run" / "rewards.png").exists()  # the held-out rewards at the last step


def test_gpt2_dpo_preset_code_path(tmp_path):
    """The real recipe's settings, and its code path (HF weights, GPT-2 tokenizer, the shipped preference data,
    the preamble) on a tiny random GPT-2-vocabulary model."""
    preset = rm.PRESETS["gpt2-dpo"]
    assert (preset["init"], preset["method"], preset["epochs"], preset["lr"]["dpo"], preset["beta"]) == \
        ("out/gpt2-alpaca/ckpt.pt", "dpo", 1, 5e-6, 0.1)  # the notebook starts from chapter 7's SFT model
    assert os.path.samefile(os.path.join(ROOT, preset["data"]), os.path.join(ROOT, "data", "instruction_preference_data.json"))
    torch.manual_seed(0)
    GPT(GPTConfig(block_size=1024, vocab_size=50257, n_layer=1, n_head=2, n_embd=16)).save_pretrained(str(tmp_path / "hf"))
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        rm.main(["--preset", "gpt2-dpo", "--init", str(tmp_path / "hf"), "--out-dir", str(tmp_path / "run"),
                 "--max-steps", "2", "--eval-limit", "8", "--lr", "1e-3", *RUN])
    finally:
        os.chdir(cwd)
    rows = metrics(tmp_path / "run")
    assert rows[0]["step"] == 0 and rows[0]["val_loss"] == pytest.approx(LN2, abs=1e-6) and rows[0]["margin"] == 0
    assert [r["lr"] for r in rows if "lr" in r] == pytest.approx([1e-3, 1e-3 * 0.55])
    assert rows[-2]["margin"] != 0 and "task_accuracy" not in rows[-2]
    assert gpt2.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))["template"] == {"preamble": True}  # the preset's
    args = rm.parse_args(["--preset", "gpt2-dpo"])
    assert args.preamble is None and args.out_dir == "out/gpt2-dpo" and args.split == "85/5/10"  # None: see main
    assert rm.parse_args([]).out_dir == "out/task-rm" and rm.parse_args(["--method", "dpo"]).out_dir == "out/task-dpo"


def test_stopped_run_keeps_its_schedule_and_logs_each_steps_batch(tmp_path, monkeypatch, capsys):
    """rm --lora with no --lr: the task preset's LoRA rate, 3e-3; stopped after 2 of 4 steps, the schedule is still
    that of 4 (no warmup: cosine from 1 to --min-lr-ratio 0.2); every step clips the trainable gradients at
    --grad-clip; --max-len is capped at the model's context; the checkpoint names its method. The resumed step 3
    logs the loss and margin of the checkpointed model on the Loader's batch 2."""
    init, data = base_checkpoint(tmp_path / "base.pt"), task_folder(tmp_path / "task", preference=60, test=5)
    pref = os.path.join(data, "preference.jsonl")
    long = {"prompt": "What is 1 + 1?", "chosen": "2" * 100, "rejected": "3"}  # over the 96-token context
    bpe.write_rows(pref, [long] + bpe.read_rows(pref, "preference"))
    clip, clipped = torch.nn.utils.clip_grad_norm_, []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda ps, norm: clipped.append(norm) or clip(ps, norm))
    out = str(tmp_path / "run")
    rm.main(["--init", init, "--data", data, "--val-pairs", "20", "--lora", "--max-steps", "4", "--stop-after", "2",
             "--batch-size", "8", "--warmup-steps", "0", "--min-lr-ratio", "0.2", "--grad-clip", "0.5",
             "--max-len", "1000", "--eval-interval", "0", "--out-dir", out, *RUN])
    assert "dropped 0 of 41 pairs whose chosen and rejected answers are equal and 1 longer than 96" in capsys.readouterr().out
    assert [r["lr"] for r in metrics(out) if "lr" in r] == pytest.approx([3e-3, 3e-3 * (0.2 + 0.4 * (1 + 0.5 ** 0.5))])
    assert clipped == [0.5, 0.5]
    ckpt = gpt2.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["method"] == ckpt["args"]["method"] == "rm" and ckpt["step"] == 2
    model = rm.RewardModel(GPT.from_checkpoint(os.path.join(out, "ckpt.pt")))
    model.value_head.load_state_dict(ckpt["value_head"])
    train, _, _ = rm.load_splits(argparse.Namespace(data=data, val_pairs=20))
    batch = rm.Loader(rm.encode_pairs(train, BYTES, False, 96), 8, ckpt["args"]["seed"], EOT).get(2)
    with torch.no_grad():  # the preset's --lm-alpha 1 is part of the training loss
        loss, r_c, r_r, _ = rm.pair_scores(model, None, batch, "rm", None, 0.0, "cpu", lm_alpha=1.0)
    margins = r_c - r_r
    assert margins.min() < 0 < margins.max()  # a margin's sign shows in the mean
    rm.main(["--resume", "--out-dir", out, "--stop-after", "3"])
    step3 = [r for r in metrics(out) if r.get("step") == 3 and "train_loss" in r][-1]
    assert step3["train_loss"] == pytest.approx(loss.item(), abs=1e-5)
    assert step3["train_margin"] == pytest.approx(margins.mean().item(), abs=1e-6)


def test_dpo_takes_the_presets_steps_and_rate(tmp_path):
    """--method dpo with no --max-steps or --lr: the task preset's DPO settings, 300 steps at 1e-4 (the first step at
    1/20 of it: 20 warmup steps), not the reward model's 3,300 at 5e-4."""
    init, data = base_checkpoint(tmp_path / "base.pt"), task_folder(tmp_path / "task", preference=60, test=5)
    out = str(tmp_path / "run")
    rm.main(["--init", init, "--data", data, "--val-pairs", "20", "--method", "dpo", "--stop-after", "1",
             "--batch-size", "8", "--max-new-tokens", "4", "--out-dir", out, *RUN])
    ckpt = gpt2.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert (ckpt["args"]["max_steps"], ckpt["args"]["lr"], ckpt["method"]) == (300, 1e-4, "dpo")
    assert [r["lr"] for r in metrics(out) if "lr" in r] == pytest.approx([1e-4 / 20])


def test_task_accuracy_scores_greedy_answers_of_every_test_row(monkeypatch):
    """DPO's task accuracy: the verifier on greedy answers (temperature 0) to every test row, in batches."""
    monkeypatch.setattr(rm, "sample", fake_sampler(lambda q, i: "so 7", temperature=0))
    rows = [{"prompt": f"What is {a} + 1?", "answer": str(a + 1)} for a in (6, 7, 6, 6, 7)]  # "7" is right 3 times
    args = argparse.Namespace(eval_batch_size=2, preamble=False, max_new_tokens=8)
    assert rm.task_accuracy(tiny(), BYTES, rows, args, "cpu", torch.float32) == pytest.approx(3 / 5)


def test_missing_sft_model_prints_the_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        rm.main(["--data", task_folder(tmp_path / "task", preference=40, test=5), *RUN])
    assert "python sft.py" in str(e.value) and "out/task-sft/ckpt.pt" in str(e.value)
    with pytest.raises(SystemExit, match=r"(?s)out/task-columns-sft/ckpt.pt.*python sft.py --preset task-columns   "
                                         r"\(after: python train_gpt2.py --preset task-columns\)"):
        rm.main(["--preset", "task-columns", *RUN])
    # the columns task: its data, longer answers, fewer steps (within 10 CPU minutes), its own output folders
    columns = rm.parse_args(["--preset", "task-columns"])
    assert (columns.data, columns.max_new_tokens, columns.out_dir) == ("task-columns", 64, "out/task-columns-rm")
    assert rm.parse_args(["--preset", "task-columns", "--method", "dpo"]).out_dir == "out/task-columns-dpo"
    assert rm.parse_args([]).out_dir == "out/task-rm" and rm.parse_args(["--method", "dpo"]).out_dir == "out/task-dpo"
    assert rm.PRESETS["task-columns"]["max_steps"] == {"rm": 1400, "dpo": 300}
    with pytest.raises(SystemExit, match="no checkpoint at"):
        rm.main(["--resume", "--out-dir", str(tmp_path / "nothing")])


@pytest.mark.parametrize("flags,words", [
    (["--epochs", "0"], "--epochs 0: must be at least 1"),
    (["--eval-batch-size", "0"], "--eval-batch-size 0: must be at least 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: must be at least 1"),
    (["--lr", "-1"], "--lr -1.0: must be at least 0"),
    (["--grad-clip", "-1"], "--grad-clip -1.0: must be at least 0"),
    (["--head-lr-mult", "-10"], "--head-lr-mult -10.0: must be at least 0"),  # the value head's gradient ascent
    (["--lm-alpha", "-1"], "--lm-alpha -1.0: must be at least 0"),
    (["--method", "dpo", "--rpo-alpha", "-1"], "--rpo-alpha -1.0: must be at least 0"),
    (["--center-rewards", "-0.1"], "--center-rewards -0.1: must be at least 0"),
    (["--eval-limit", "-1"], "--eval-limit -1: must be at least 0"),
    (["--warmup-steps", "-1"], "--warmup-steps -1: must be at least 0"),
    (["--stop-after", "0"], "--stop-after 0: must be at least 1"),  # ran every step
    (["--max-len", "-5"], "--max-len -5: must be at least 2"),  # cut every answer's end-of-text
    (["--min-lr-ratio", "-1"], "--min-lr-ratio -1.0: must be at least 0"),  # the schedule's end: a negative lr
    (["--method", "dpo", "--beta", "-0.1"], "--beta -0.1: DPO needs a beta above 0"),  # prefers the rejected
    (["--method", "dpo", "--beta", "0"], "--beta 0.0: DPO needs a beta above 0"),  # a constant loss
    (["--pairs", "samples", "--samples-per-prompt", "1"], "--samples-per-prompt 1: a pair needs a right and a wrong")])
def test_out_of_range_flags_are_refused(tmp_path, monkeypatch, flags, words):
    """Refused where they are parsed: not a ZeroDivisionError, a torch error from deep inside, or a run that
    learns nothing (or the opposite preference) without a word."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=words):
        rm.main(flags)


@pytest.mark.parametrize("case", ["cuda", "reward_model", "char_gpt", "lora_rank", "resume_other", "bad_json",
                                  "latin1_json"])
def test_wrong_inputs_are_clear_errors(tmp_path, monkeypatch, case):
    """A mistaken device, model, setting, run directory or data file: a SystemExit naming it (the file and line
    of bad data) and the fix, never a traceback from deep inside."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine
    init = base_checkpoint(tmp_path / "sft.pt")
    data = tmp_path / "p.jsonl"
    bpe.write_rows(data, [{"prompt": "What is 1 + 1?", "chosen": "1 + 1 = 2", "rejected": "1 + 1 = 3"}] * 20)
    head = {"weight": torch.zeros(1, 32), "bias": torch.zeros(1)}
    gpt2.save_checkpoint(str(tmp_path / "rm" / "ckpt.pt"), tiny(), tokenizer=BYTES.dumps(), value_head=head,
                         method="rm", args={"method": "rm"})
    gpt2.save_checkpoint(str(tmp_path / "sft" / "ckpt.pt"), tiny(), tokenizer=BYTES.dumps(), args={"lr": 1e-4})
    torch.save({"model": {}, "config": {"vocab_size": 65, "batch_size": 32}}, tmp_path / "char.pt")
    (tmp_path / "bad.json").write_text('[{"prompt": "p", "chosen": "a", "rejected": "b"},\n{"prompt": "p",,}]')
    (tmp_path / "latin1.json").write_bytes('[{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}]'.encode("latin-1"))
    argv, words = {
        "cuda": (["--init", init, "--device", "cuda"], "--device cuda asked for, but no CUDA GPU"),
        "reward_model": (["--init", str(tmp_path / "rm" / "ckpt.pt")], "is a reward model already"),
        "char_gpt": (["--init", str(tmp_path / "char.pt")], "not a gpt2.py model checkpoint"),
        "lora_rank": (["--init", init, "--lora", "--lora-r", "0", "--batch-size", "4"], "--lora: LoRA rank r must be"),
        "resume_other": (["--resume", "--out-dir", str(tmp_path / "sft")], "was not written by reward_model.py"),
        "bad_json": (["--init", init, "--data", str(tmp_path / "bad.json")], "bad.json:2: not valid JSON"),
        "latin1_json": (["--init", init, "--data", str(tmp_path / "latin1.json")], "latin1.json: not UTF-8"),
    }[case]
    with pytest.raises(SystemExit, match=words):
        rm.main(["--data", str(data), "--device", "cpu", *argv])


def test_reward_loss_equals_trl(tmp_path):
    """TRL's RewardTrainer.compute_loss (margin and center_rewards_coefficient) on the same tiny model and batch.
    It is called on a stand-in for the trainer that holds only what the method reads."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl import RewardTrainer
    model = reward_model()
    rows = [{"prompt": "What is 3 + 4?", "chosen": "3 + 4 = 7", "rejected": "3 + 4 = 8", "margin": 0.5},
            {"prompt": "What is 12 - 5?", "chosen": "12 - 5 = 7", "rejected": "no", "margin": 1.0},
            {"prompt": "What is 1 + 1?", "chosen": "1 + 1 = 2", "rejected": "1 + 1 = 11, I think", "margin": 0.0}]
    batch = rm.pad_pairs(rm.encode_pairs(rows, BYTES, False, 96), EOT)
    ours, _, _, _ = rm.pair_scores(model, None, batch, "rm", None, 0.01, "cpu")
    ids, _, lengths, margins = batch

    class HFStyle(torch.nn.Module):  # what TRL calls: model(input_ids=..., attention_mask=...) -> .logits (2B, 1)
        def forward(self, input_ids, attention_mask, **unused):  # use_cache, margin
            return SimpleNamespace(logits=model(input_ids, attention_mask)[:, None])

    same = lambda x: x
    trainer = SimpleNamespace(model=SimpleNamespace(training=False), args=SimpleNamespace(center_rewards_coefficient=0.01),
                              accelerator=SimpleNamespace(gather=same, gather_for_metrics=same),
                              _metrics={"eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": ids, "attention_mask": rm.right_mask(lengths, ids.size(1)), "margin": margins}
    theirs = RewardTrainer.compute_loss(trainer, HFStyle(), inputs)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6) and ours.item() > 0.7


def test_dpo_equals_trl(tmp_path):
    """TRL's DPOTrainer._compute_loss (sigmoid loss, beta 0.1) on the same policy, reference and batch, each exported
    to transformers' GPT-2 and given TRL's fused LM head (as DPOTrainer does): the per-sequence log-probabilities of
    the responses, the loss and the implicit rewards. TRL's method runs on a stand-in for the trainer that holds only
    what it reads."""
    from collections import defaultdict
    from types import SimpleNamespace

    import transformers
    from trl import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    policy, ref = tiny(0, pos_emb="learned"), tiny(1, pos_emb="learned")  # different weights: rewards are not 0
    hf = {}
    for name, m in (("policy", policy), ("ref", ref)):
        m.save_pretrained(str(tmp_path / name))
        hf[name] = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / name)).eval()
    add_fused_lm_head(hf["policy"], outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    add_fused_lm_head(hf["ref"])
    rows = [{"prompt": "What is 3 + 4?", "chosen": "3 + 4 = 7", "rejected": "3 + 4 = 8"},
            {"prompt": "Add 1 and 2, please, quickly.", "chosen": "3", "rejected": "1 + 2 = 4, I think"},
            {"prompt": "What is 12 - 5?", "chosen": "12 - 5 = 7", "rejected": "no"}]
    batch = rm.pad_pairs(rm.encode_pairs(rows, BYTES, False, 96), EOT)
    ids, mask, lengths, _ = batch
    loss, r_c, r_r, logp_c = rm.pair_scores(policy, ref, batch, "dpo", 0.1, 0.0, "cpu")
    inputs = {"input_ids": ids, "attention_mask": rm.right_mask(lengths, ids.size(1)), "completion_mask": mask.long()}

    # the per-sequence log-probabilities: TRL's forward scores the completion tokens only (labels -100 elsewhere)
    labels = ids.masked_fill(~mask, -100)
    for name, m in (("policy", policy), ("ref", ref)):
        with torch.no_grad():
            theirs = hf[name](input_ids=ids, attention_mask=inputs["attention_mask"], labels=labels,
                              fused_lm_head=True).log_probs.sum(1)  # (2B,)
        torch.testing.assert_close(rm.sequence_logprobs(m, ids, mask), theirs, rtol=0, atol=2e-4)

    same = lambda x: x
    trainer = SimpleNamespace(model=hf["policy"], ref_model=hf["ref"], beta=0.1, loss_types=["sigmoid"], loss_weights=[1.0],
                              f_divergence_type="reverse_kl", ld_alpha=None, precompute_ref_logps=False,
                              use_weighting=False, aux_loss_enabled=False, _metrics={"eval": defaultdict(list)},
                              _total_train_tokens=0, _tp_size=1, args=SimpleNamespace(gradient_checkpointing_kwargs=None),
                              accelerator=SimpleNamespace(device=torch.device("cpu"), gather=same, gather_for_metrics=same))
    theirs = DPOTrainer._compute_loss(trainer, hf["policy"], inputs, return_outputs=False)
    logged = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    assert loss.item() == pytest.approx(theirs.item(), abs=1e-5) and abs(loss.item() - LN2) > 1e-3
    assert r_c.mean().item() == pytest.approx(logged["rewards/chosen"], abs=1e-5)
    assert r_r.mean().item() == pytest.approx(logged["rewards/rejected"], abs=1e-5)
    assert (r_c - r_r).mean().item() == pytest.approx(logged["rewards/margins"], abs=1e-5)
    assert (r_c > r_r).float().mean().item() == logged["rewards/accuracies"]
    assert logp_c.mean().item() == pytest.approx(logged["logps/chosen"], abs=1e-4)
    # the same objective: the same gradient (the token embedding, tied to the output head in both)
    loss.backward(), theirs.backward()
    ours_grad, their_grad = policy.transformer.wte.weight.grad, hf["policy"].transformer.wte.weight.grad
    assert ours_grad.abs().max() > 1e-3
    torch.testing.assert_close(ours_grad, their_grad, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("method", ["rm", "dpo"])
def test_compile_flag_compiles_the_training_pass(tmp_path, monkeypatch, counting_compile, method):
    fake, calls = counting_compile  # stands in for torch.compile
    monkeypatch.setattr(rm, "maybe_compile", fake)
    init, data = base_checkpoint(tmp_path / "base.pt"), task_folder(tmp_path / "task", preference=60, test=5)
    rm.main(["--init", init, "--data", data, "--val-pairs", "20", "--max-steps", "2", "--batch-size", "8",
             "--eval-interval", "0", "--method", method, "--compile", "--out-dir", str(tmp_path / "c"), *RUN])
    assert calls and calls[0] >= 2  # the trained model's forward, every step


def fake_sampler(answer_of, temperature=1.0):
    """A stand-in for gpt2.sample: each prompt's k answers are answer_of(question, i) for i = 0..k-1 (the
    4 answers of a prompt are consecutive rows), as tokens + end-of-text with their mask. It fails unless asked
    for the given temperature."""
    count = {}

    def fake(model, idx, n, attention_mask=None, eos_id=None, **kw):
        assert kw["temperature"] == temperature
        fake.lengths.append(n)
        rows = []
        for ids, m in zip(idx.tolist(), attention_mask.tolist()):
            q = BYTES.decode([t for t, k in zip(ids, m) if k])
            i = count.get(q, 0)
            count[q] = i + 1
            rows.append(BYTES.encode(answer_of(q, i)) + [eos_id])
        N = max(map(len, rows))
        tokens = torch.tensor([r + [eos_id] * (N - len(r)) for r in rows])
        mask = torch.tensor([[j < len(r) for j in range(N)] for r in rows])
        return tokens, mask, torch.zeros(tokens.shape)
    fake.lengths = []  # each call's max_new_tokens
    return fake


def test_pairs_from_the_models_own_samples(tmp_path, monkeypatch, capsys):
    """--pairs samples: k answers per prompt, judged by the verifier; a prompt with a right and a wrong answer
    gives (first right, first wrong), a prompt whose answers all agree gives nothing; drawn at temperature 1 (greedy
    answers would all agree); saved in a shuffled order, the last --val-pairs held out, and read back on --resume;
    --pairs both keeps the given held-out pairs."""
    def answer_of(q, i):  # "What is 3 + 4?" -> right on odd draws, 8 then 9; an even first operand: always right
        a, op, b = q.split("What is ")[1].split("?")[0].split(" ")
        right = int(a) + int(b) if op == "+" else int(a) - int(b)
        return f"{a} {op} {b} = {right if (i % 2 or int(a) % 2 == 0) else right + 1 + i // 2}"
    monkeypatch.setattr(rm, "sample", fake_sampler(answer_of))
    rows = [{"prompt": "What is 3 + 4?", "answer": "7"}, {"prompt": "What is 2 + 5?", "answer": "7"}]
    pairs = rm.sample_pairs(tiny(), BYTES, rows, 4, False, "cpu", torch.float32, seed=0)
    assert pairs == [{"prompt": "What is 3 + 4?", "chosen": "3 + 4 = 7", "rejected": "3 + 4 = 8"}]

    init, data = base_checkpoint(tmp_path / "base.pt"), task_folder(tmp_path / "task", preference=60, test=5, rl=40)
    common = ["--init", init, "--data", data, "--val-pairs", "5", "--max-steps", "4", "--batch-size", "8",
              "--eval-interval", "2", *RUN]
    rm.main([*common, "--pairs", "samples", "--out-dir", str(tmp_path / "s"), "--stop-after", "2"])
    made = bpe.read_rows(tmp_path / "s" / "sampled_pairs.jsonl", "preference")
    questions = [r["prompt"] for r in bpe.read_rows(os.path.join(data, "preference.jsonl"), "preference")[:-5]]
    questions += [r["prompt"] for r in bpe.read_rows(os.path.join(data, "rl.jsonl"), "rl")]  # the training prompts
    odd = [q for q in questions if int(q.split("What is ")[1].split(" ")[0]) % 2]
    assert sorted(p["prompt"] for p in made) == sorted(odd) and all(p["chosen"] != p["rejected"] for p in made)
    assert [p["prompt"] for p in made] != odd  # shuffled, not in the order drawn (training prompts, then RL ones)
    split = argparse.Namespace(out_dir=str(tmp_path / "s"), pairs="samples", val_pairs=5)
    assert rm.with_sampled_pairs(split, None, None, [], [], "cpu", None, resume=True) == (made[:-5], made[-5:])
    split.val_pairs = len(made)  # nothing left to train on: say which two flags fix it
    with pytest.raises(SystemExit, match=rf"only {len(made)} sampled .*--samples-per-prompt, or lower --val-pairs"):
        rm.with_sampled_pairs(split, None, None, [], [], "cpu", None, resume=True)
    monkeypatch.setattr(rm, "sample", None)  # a resumed run must not sample again
    rm.main(["--resume", "--out-dir", str(tmp_path / "s")])
    assert metrics(tmp_path / "s")[-1]["step"] == 4
    fake = fake_sampler(answer_of)
    monkeypatch.setattr(rm, "sample", fake)
    capsys.readouterr()
    rm.main([*common, "--pairs", "both", "--out-dir", str(tmp_path / "b"), "--max-new-tokens", "40"])
    assert set(fake.lengths) == {40}  # --max-new-tokens reaches the sampler (columns answers need 64; was 24)
    both = len(bpe.read_rows(tmp_path / "b" / "sampled_pairs.jsonl", "preference"))
    assert f"{55 + both} train / 5 val pairs" in capsys.readouterr().out  # the given 55 + the made; given val kept
    given = bpe.read_rows(os.path.join(data, "preference.jsonl"), "preference")
    made = bpe.read_rows(tmp_path / "b" / "sampled_pairs.jsonl", "preference")
    train, val = rm.with_sampled_pairs(argparse.Namespace(out_dir=str(tmp_path / "b"), pairs="both", seed=0), None, None,
                                       given[:-5], given[-5:], "cpu", None, resume=True)
    assert val == given[-5:] and sorted(map(str, train)) == sorted(map(str, given[:-5] + made))
    ckpt = gpt2.load_checkpoint(str(tmp_path / "b" / "ckpt.pt"))
    assert ckpt["step"] == 4 and (tmp_path / "b" / "sampled_pairs.jsonl").exists()
    with pytest.raises(SystemExit, match="needs the task's folder"):
        pref = tmp_path / "p.jsonl"
        bpe.write_rows(pref, bpe.read_rows(os.path.join(data, "preference.jsonl"), "preference"))
        rm.main(["--init", init, "--data", str(pref), "--pairs", "samples", "--out-dir", str(tmp_path / "f"), *RUN])


def test_offline_init_is_an_error_naming_the_files(tmp_path, offline):
    """OpenAI's weights (--init gpt2) without network: the script's one-line error names the download and where
    to put it."""
    with pytest.raises(SystemExit) as e:
        rm.main(["--init", "gpt2", "--out-dir", str(tmp_path / "out")])
    assert str(e.value.code).startswith("reward_model.py: error: --init gpt2: could not download "
                                        "https://huggingface.co/openai-community/gpt2/")
    assert "model.safetensors" in str(e.value.code)


def test_the_starting_models_template_is_the_default(tmp_path):
    """An SFT model trained with the preamble is trained on with it: its checkpoint's template wins over the
    preset's (which is for a model that records none), and --preamble / --no-preamble win over both."""
    data = task_folder(tmp_path / "task", preference=40, test=5)
    pre, plain = str(tmp_path / "pre.pt"), str(tmp_path / "plain.pt")
    gpt2.save_checkpoint(pre, tiny(block_size=256), tokenizer=BYTES.dumps(), template={"preamble": True})
    gpt2.save_checkpoint(plain, tiny(block_size=256), tokenizer=BYTES.dumps())
    for i, (init, flags, want) in enumerate([(pre, [], True), (pre, ["--no-preamble"], False), (plain, [], False),
                                             (plain, ["--preamble"], True)]):
        out = tmp_path / f"run{i}"
        rm.main(["--init", init, "--data", data, "--val-pairs", "10", "--max-steps", "1", "--batch-size", "4",
                 "--out-dir", str(out), *RUN, *flags])
        assert gpt2.load_checkpoint(str(out / "ckpt.pt"))["template"] == {"preamble": want}, (init, flags)


def test_epochs_count_with_the_task_preset(tmp_path, capsys):
    """The task preset counts steps (3,300 for rm); --epochs given instead counts passes over the pairs."""
    data = task_folder(tmp_path / "task", preference=40, test=5)
    common = ["--init", base_checkpoint(tmp_path / "base.pt"), "--data", data, "--val-pairs", "8", "--batch-size", "8",
              "--stop-after", "1", *RUN]
    rm.main([*common, "--out-dir", str(tmp_path / "steps")])
    assert "| 32 train / 8 val pairs | 3300 steps of 8 pairs" in capsys.readouterr().out
    rm.main([*common, "--epochs", "2", "--out-dir", str(tmp_path / "epochs")])
    assert "| 32 train / 8 val pairs | 8 steps of 8 pairs" in capsys.readouterr().out  # 2 x 32 / 8


def test_alpaca_preference_rows_read_from_json_and_jsonl(tmp_path):
    rows = [{"instruction": f"Say {i}", "input": "", "chosen": f"{i}", "rejected": f"no {i}"} for i in range(3)]
    (tmp_path / "p.json").write_text(json.dumps(rows))
    bpe.write_rows(tmp_path / "p.jsonl", rows)
    for name in ("p.json", "p.jsonl"):
        got = rm.read_pairs(str(tmp_path / name))
        assert [(r["prompt"], r["chosen"], r["rejected"]) for r in got] == [(f"Say {i}", f"{i}", f"no {i}")
                                                                            for i in range(3)], name
