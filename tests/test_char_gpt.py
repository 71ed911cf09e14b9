"""Tests for char_gpt.py: tiny configs, CPU, a few seconds each."""
import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import char_gpt as cg  # noqa: E402

TINY = dict(vocab_size=65, n_layer=2, n_head=2, n_embd=16, block_size=8, dropout=0.0)
TINY_ARGS = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
             "--eval-iters", "2", "--device", "cpu", "--no-compile"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # These models are tiny: with several threads, each small op waits on a barrier, and on a shared
    # machine a descheduled thread makes that wait long. One thread is faster here; restored after.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data():
    text = cg.load_text()
    tok = cg.CharTokenizer(text)
    return tok, torch.tensor(tok.encode(text), dtype=torch.long)


def test_vocabulary_and_split(data):
    tok, ids = data
    assert tok.vocab_size == 65
    assert len(ids) == 1_115_394
    s = "First Citizen:\nBefore we proceed"
    assert tok.decode(tok.encode(s)) == s
    train, val = cg.split_data(ids)
    assert len(train) == int(0.9 * len(ids)) and len(train) + len(val) == len(ids)
    assert torch.equal(torch.cat([train, val]), ids)
    with pytest.raises(ValueError):
        tok.encode("\u00e9")


def test_batches_are_shifted_by_one(data):
    _, ids = data
    x, y = cg.get_batch(ids, 8, 4, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 8)
    assert torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.parametrize("stage", cg.STAGES)
def test_every_stage_builds_and_learns(stage, data):
    _, ids = data
    torch.manual_seed(0)
    model = cg.build_model(dict(TINY, stage=stage))
    x, y = cg.get_batch(ids, 8, 16, torch.Generator().manual_seed(0))
    assert model(x).shape == (16, 8, 65)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):  # overfit one batch: the loss must fall well below its start
        loss = cg.loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    if stage == "full":
        assert abs(losses[0] - math.log(65)) < 0.1  # GPT-2 init: close to uniform at the start
    assert losses[-1] < losses[0] - 0.5, losses


def test_stages_add_one_idea_each():
    def kinds(stage):
        return {type(m).__name__ for m in cg.build_model(dict(TINY, stage=stage)).modules()}
    assert "Head" in kinds("attention") and "MultiHeadAttention" not in kinds("attention")
    assert "MultiHeadAttention" in kinds("multihead") and "FeedForward" not in kinds("multihead")
    assert "FeedForward" in kinds("ffn") and "Block" not in kinds("ffn")
    assert "Block" in kinds("residual") and "LayerNorm" not in kinds("residual")
    assert "LayerNorm" in kinds("layernorm")
    n_params = [sum(p.numel() for p in cg.build_model(dict(TINY, stage=s)).parameters()) for s in cg.STAGES[1:6]]
    assert n_params == sorted(n_params)


def test_loss_estimate_of_uniform_model_is_ln_vocab(data):
    _, ids = data
    model = cg.build_model(dict(TINY, stage="bigram"))
    with torch.no_grad():
        model.token_embedding_table.weight.zero_()  # equal logits: every character has p = 1/65
    loss = cg.estimate_loss(model, ids, 8, 4, eval_iters=5)
    assert loss == pytest.approx(math.log(65), abs=1e-5)


def test_loss_estimate_of_known_bigram_model(data):
    # A bigram table holding the log of the counted transition frequencies has, as its loss on the
    # windows it is evaluated on, the empirical conditional entropy. Check against an independent count.
    _, ids = data
    gen = torch.Generator().manual_seed(7)
    x, y = cg.get_batch(ids, 8, 64, gen)
    counts = torch.ones(65, 65)
    counts.index_put_((x.flatten(), y.flatten()), torch.ones(x.numel()), accumulate=True)
    logp = (counts / counts.sum(1, keepdim=True)).log()
    expected = -logp[x.flatten(), y.flatten()].mean().item()
    model = cg.build_model(dict(TINY, stage="bigram"))
    with torch.no_grad():
        model.token_embedding_table.weight.copy_(logp)
    # estimate_loss's generator with seed=7 draws exactly the batch above.
    assert cg.estimate_loss(model, ids, 8, 64, eval_iters=1, seed=7) == pytest.approx(expected, rel=1e-5)


def test_multihead_equals_concatenated_heads():
    torch.manual_seed(0)
    n_embd, n_head, T = 16, 4, 8
    mha = cg.MultiHeadAttention(n_embd, n_head, T, proj=False)
    hs = n_embd // n_head
    heads = [cg.Head(n_embd, hs, T) for _ in range(n_head)]
    wq, wk, wv = mha.qkv.weight.split(n_embd, dim=0)
    with torch.no_grad():
        for i, h in enumerate(heads):
            h.query.weight.copy_(wq[i * hs:(i + 1) * hs])
            h.key.weight.copy_(wk[i * hs:(i + 1) * hs])
            h.value.weight.copy_(wv[i * hs:(i + 1) * hs])
    x = torch.randn(2, T, n_embd)
    torch.testing.assert_close(mha(x), torch.cat([h(x) for h in heads], dim=-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stage", ["attention", "full"])
def test_attention_is_causal(stage):
    torch.manual_seed(0)
    model = cg.build_model(dict(TINY, stage=stage)).eval()
    x = torch.randint(65, (1, 8))
    x2 = x.clone()
    x2[0, 5:] = (x2[0, 5:] + 1) % 65  # change the future only
    a, b = model(x), model(x2)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_sampling_is_reproducible_with_a_seed(data):
    tok, _ = data
    torch.manual_seed(0)
    cfg = dict(TINY, stage="full")
    model = cg.build_model(cfg)
    a = cg.sample_text(model, tok, cfg, "ROMEO:", 40, seed=3)
    b = cg.sample_text(model, tok, cfg, "ROMEO:", 40, seed=3)
    c = cg.sample_text(model, tok, cfg, "ROMEO:", 40, seed=4)
    assert a == b and a != c
    assert a.startswith("ROMEO:") and len(a) == 46


def test_lr_schedule():
    cfg = dict(lr=1e-3, schedule="cosine", warmup_steps=10, lr_decay_steps=110)
    assert cg.lr_at(0, cfg) == pytest.approx(1e-4)
    assert cg.lr_at(9, cfg) == pytest.approx(1e-3)
    assert cg.lr_at(60, cfg) == pytest.approx(0.55e-3)
    assert cg.lr_at(110, cfg) == pytest.approx(1e-4) and cg.lr_at(500, cfg) == pytest.approx(1e-4)


def test_training_run_writes_metrics_checkpoint_and_samples(tmp_path, capsys):
    out = str(tmp_path / "run")
    cg.main(["--stage", "full", "--max-steps", "30", "--eval-interval", "10", "--out-dir", out,
             "--num-chars", "20", *TINY_ARGS])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    assert [m["step"] for m in metrics] == [0, 10, 20, 30]
    for m in metrics:
        assert set(m) >= {"step", "train_loss", "val_loss", "lr", "tokens_per_sec", "elapsed"}
    assert metrics[-1]["val_loss"] < metrics[0]["val_loss"]
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["step"] == 30 and ckpt["config"]["n_embd"] == 16
    capsys.readouterr()
    text = cg.main(["--sample", "--prompt", "ROMEO:", "--num-chars", "30", "--out-dir", out, "--device", "cpu"])
    assert text.startswith("ROMEO:") and len(text) == 36
    assert text in capsys.readouterr().out
    # the reloaded model is the trained one: same sample as from the in-memory weights
    model, tok, cfg = cg.load_for_sampling(out)
    assert cg.sample_text(model, tok, cfg, "ROMEO:", 30, seed=1337) == text


def test_resume_is_exact(tmp_path):
    # dropout > 0 so that the restored RNG state matters, not only the weights and optimizer
    common = ["--stage", "full", "--dropout", "0.1", "--eval-interval", "5", "--lr-decay-steps", "20",
              "--warmup-steps", "3", "--num-chars", "1", *TINY_ARGS]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    cg.main([*common, "--max-steps", "20", "--out-dir", a])
    cg.main([*common, "--max-steps", "10", "--out-dir", b])
    cg.main([*common, "--max-steps", "20", "--out-dir", b, "--resume"])
    sa = torch.load(os.path.join(a, "ckpt.pt"), weights_only=True)
    sb = torch.load(os.path.join(b, "ckpt.pt"), weights_only=True)
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    with open(os.path.join(a, "metrics.jsonl")) as f:
        ma = [json.loads(line) for line in f]
    with open(os.path.join(b, "metrics.jsonl")) as f:
        mb = [json.loads(line) for line in f]
    assert [m["val_loss"] for m in ma] == [m["val_loss"] for m in mb]


def test_missing_data_file_says_where_to_get_it(tmp_path):
    with pytest.raises(SystemExit) as e:
        cg.main(["--data", str(tmp_path / "nope.txt"), "--out-dir", str(tmp_path / "o"), "--device", "cpu"])
    assert cg.DATA_URL in str(e.value)


def test_unknown_stage_lists_the_valid_ones(capsys):
    with pytest.raises(SystemExit):
        cg.parse_args(["--stage", "transformer"])
    err = capsys.readouterr().err
    assert all(s in err for s in cg.STAGES)
