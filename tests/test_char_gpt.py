"""Tests for char_gpt.py and bench/bench_char_gpt.py: tiny configs, CPU, a few seconds each."""
import importlib.util
import json
import math
import os

import pytest
import torch

import char_gpt as cg
import gpt2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


def test_vocabulary_is_sorted_and_batches_reach_the_last_window():
    tok = cg.CharTokenizer("the quick brown fox jumps over the lazy dog")
    assert tok.chars == " abcdefghijklmnopqrstuvwxyz" and tok.encode("ab z") == [1, 2, 0, 26]
    # 10 characters, windows of 8 + 1: the only starts are 0 and 1, and both must be drawn
    x, y = cg.get_batch(torch.arange(10), 8, 64, torch.Generator().manual_seed(0))
    assert set(x[:, 0].tolist()) == {0, 1}
    assert torch.equal(x, x[:, :1] + torch.arange(8)) and torch.equal(y, x + 1)


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


def test_stage_structure():
    def build(stage, **kw):
        return cg.build_model(dict(TINY, stage=stage, **kw))
    for stage in ("multihead", "ffn"):  # the heads' concatenation as it is, a 1x feed-forward, no norm
        model = build(stage)
        mha = model.body if stage == "multihead" else model.body[0]
        assert isinstance(mha.proj, torch.nn.Identity) and isinstance(model.ln_f, torch.nn.Identity)
    assert [m.out_features for m in build("ffn").body[1].net if isinstance(m, torch.nn.Linear)] == [16]
    for stage in ("residual", "layernorm", "full"):
        blocks = build(stage, n_layer=3).body
        assert len(blocks) == 3 and all(isinstance(b, cg.Block) for b in blocks)
        b = blocks[0]
        assert isinstance(b.sa.proj, torch.nn.Linear)  # the projection back into the residual stream
        assert [m.out_features for m in b.ffwd.net if isinstance(m, torch.nn.Linear)] == [64, 16]  # 4x wide
        ln = stage != "residual"
        assert all(isinstance(m, torch.nn.LayerNorm) == ln for m in (b.ln1, b.ln2, build(stage).ln_f))


def test_block_is_pre_norm_residual():
    torch.manual_seed(0)
    block = cg.Block(16, 2, 8)
    with torch.no_grad():  # two different layer norms, so that using one for the other shows
        for ln in (block.ln1, block.ln2):
            ln.weight.uniform_(0.5, 1.5), ln.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 8, 16)
    x1 = x + block.sa(block.ln1(x))
    torch.testing.assert_close(block(x), x1 + block.ffwd(block.ln2(x1)))
    plain = cg.Block(16, 2, 8, layernorm=False)
    assert isinstance(plain.ln1, torch.nn.Identity) and isinstance(plain.ln2, torch.nn.Identity)
    with torch.no_grad():  # sub-layers that output zero: the block passes x through unchanged
        plain.sa.proj.weight.zero_(), plain.sa.proj.bias.zero_()
        plain.ffwd.net[2].weight.zero_(), plain.ffwd.net[2].bias.zero_()
    torch.testing.assert_close(plain(x), x)


def test_feedforward_relu_and_dropout_where_the_lecture_puts_them():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 16)
    assert (cg.FeedForward(16, 1)(x) >= 0).all() and (cg.FeedForward(16, 1)(x) == 0).any()  # ReLU last at mult=1
    for layer in (cg.FeedForward(16, 4, dropout=0.5), cg.MultiHeadAttention(16, 2, 8, dropout=0.5)):
        zeros = (layer.train()(x) == 0).float().mean().item()  # dropout on the output: about half are zeroed
        assert 0.4 < zeros < 0.6, (type(layer).__name__, zeros)
        torch.testing.assert_close(layer.eval()(x), layer(x))  # and none in evaluation


def test_dropout_option_reaches_the_blocks_and_is_off_in_evaluation(data):
    tok, ids = data
    torch.manual_seed(0)
    cfg = dict(TINY, stage="full", dropout=0.5)
    model = cg.build_model(cfg)
    x, y = cg.get_batch(ids, 8, 4, torch.Generator().manual_seed(0))
    assert not torch.equal(model.train()(x), model(x))  # training: a fresh dropout mask each call
    model.train()
    loss = cg.estimate_loss(model, ids, 8, 4, eval_iters=2)
    assert model.training  # estimate_loss puts the model back as it found it
    model.eval()
    assert cg.estimate_loss(model, ids, 8, 4, eval_iters=2) == loss and not model.training  # evaluated without dropout
    samples = []
    for seed in (1, 2):  # sampling: the same text whatever the global RNG, so no dropout
        torch.manual_seed(seed)
        samples.append(cg.sample_text(model.train(), tok, cfg, "ROMEO:", 20, seed=3))
    assert samples[0] == samples[1]


def test_position_embedding_tells_equal_tokens_apart():
    torch.manual_seed(0)
    model = cg.build_model(dict(TINY, stage="attention"))
    logits = model(torch.full((1, 8), 5))
    assert not torch.allclose(logits[0, 0], logits[0, -1])  # without positions every row would be the same
    head = model.body
    x = torch.randn(1, 8, 16)
    torch.testing.assert_close(head(x[:, :5]), head(x)[:, :5])  # a shorter input than block_size


def test_full_model_init_is_gpt2s():
    torch.manual_seed(0)
    model = cg.build_model(dict(TINY, stage="full", n_embd=64))
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
            assert m.weight.std().item() == pytest.approx(0.02, rel=0.15)
            assert getattr(m, "bias", None) is None or (m.bias == 0).all()


def test_generate_samples_from_the_last_position_with_temperature_and_top_k():
    torch.manual_seed(0)
    model = cg.build_model(dict(TINY, stage="bigram"))
    table = model.token_embedding_table.weight.detach()
    idx = torch.tensor([[3, 7], [11, 2]])
    for temperature, top_k in [(0.5, None), (2.0, 5), (1.0, 1)]:
        got = cg.generate(model, idx, 12, 8, temperature=temperature, top_k=top_k,
                          generator=torch.Generator().manual_seed(0))
        # the definition, written out: next-char logits of the last char, / temperature, the k best kept
        gen, out = torch.Generator().manual_seed(0), idx
        for _ in range(12):
            logits = table[out[:, -1]] / temperature
            if top_k is not None:
                kth = logits.sort(-1, descending=True).values[:, top_k - 1:top_k]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            out = torch.cat([out, torch.multinomial(logits.softmax(-1), 1, generator=gen)], 1)
        assert torch.equal(got, out), (temperature, top_k)


def test_optimizer_decays_matrices_only():
    model = cg.build_model(dict(TINY, stage="full"))
    decay, no_decay = cg.make_optimizer(model, dict(lr=1e-3, weight_decay=0.1), "cpu").param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_config_takes_the_flags(monkeypatch):
    cfg = cg.make_config(cg.parse_args(["--dropout", "0.3", "--lr-decay-steps", "7", "--n-layer", "5",
                                        "--preset", "cpu"]), 65)
    assert (cfg["dropout"], cfg["lr_decay_steps"], cfg["n_layer"], cfg["max_steps"]) == (0.3, 7, 5, 1800)
    # --preset auto follows the run's device, not the machine: --device cpu on a GPU machine is the CPU preset
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cg.make_config(cg.parse_args([]), 65, "cpu")["preset"] == "cpu"
    assert cg.make_config(cg.parse_args([]), 65, "cuda")["preset"] == "gpu"
    cfg = cg.make_config(cg.parse_args(["--stage", "bigram"]), 65)
    assert (cfg["lr"], cfg["max_steps"], cfg["preset"], cfg["lr_decay_steps"]) == (1e-2, 3000, "small", 3000)


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
    assert cg.lr_for_step(0, cfg) == pytest.approx(1e-4)
    assert cg.lr_for_step(9, cfg) == pytest.approx(1e-3)
    assert cg.lr_for_step(60, cfg) == pytest.approx(0.55e-3)
    assert cg.lr_for_step(110, cfg) == pytest.approx(1e-4) and cg.lr_for_step(500, cfg) == pytest.approx(1e-4)
    assert [cg.lr_for_step(s, cg.SMALL) for s in (0, 2500, 5000)] == [cg.SMALL["lr"]] * 3  # the ladder: constant
    # lr_at is gpt2.lr_at (same arguments, same values), written again only because char_gpt.py stands alone
    for args in [(2e-3, 100, 1800), (1e-3, 100, 5000), (1e-3, 0, 50, 0.5)]:
        assert [cg.lr_at(s, *args) for s in range(0, args[2] + 20, 7)] == \
               [gpt2.lr_at(s, *args) for s in range(0, args[2] + 20, 7)]


def test_training_run_writes_metrics_checkpoint_and_samples(tmp_path, capsys, data):
    out = str(tmp_path / "run")
    cg.main(["--stage", "full", "--max-steps", "30", "--eval-interval", "10", "--out-dir", out,
             "--num-chars", "20", *TINY_ARGS])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f if "val_loss" in line]  # the evaluations
    assert [m["step"] for m in metrics] == [0, 10, 20, 30]
    for m in metrics:
        assert set(m) >= {"step", "train_loss", "val_loss", "lr", "tokens_per_sec", "elapsed"}
    assert metrics[-1]["val_loss"] < metrics[0]["val_loss"]
    assert os.path.exists(os.path.join(out, "loss.png"))
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["step"] == 30 and ckpt["config"]["n_embd"] == 16
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == cg.lr_for_step(29, ckpt["config"])  # the lr it stepped with
    model = cg.build_model(ckpt["config"])  # the last evaluation row: the saved model on train and val data
    model.load_state_dict(ckpt["model"])
    train_ids, val_ids = cg.split_data(data[1])
    for split, ids in (("train_loss", train_ids), ("val_loss", val_ids)):
        assert metrics[-1][split] == round(cg.estimate_loss(model, ids, 16, 4, 2), 4), split
    capsys.readouterr()
    text = cg.main(["--sample", "--prompt", "ROMEO:", "--num-chars", "30", "--out-dir", out, "--device", "cpu"])
    assert text.startswith("ROMEO:") and len(text) == 36
    assert text in capsys.readouterr().out
    # the reloaded model is the trained one: same sample as from the in-memory weights
    model, tok, cfg = cg.load_for_sampling(out)
    assert cg.sample_text(model, tok, cfg, "ROMEO:", 30, seed=1337) == text


def test_resume_is_exact(tmp_path):
    # dropout > 0 so that the restored RNG state matters, not only the weights and optimizer; a log
    # interval that does not divide the checkpoint step, so the losses averaged across it must be restored
    common = ["--stage", "full", "--dropout", "0.1", "--eval-interval", "5", "--lr-decay-steps", "20",
              "--warmup-steps", "3", "--log-interval", "3", "--num-chars", "1", *TINY_ARGS]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    cg.main([*common, "--max-steps", "20", "--out-dir", a])
    cg.main([*common, "--max-steps", "10", "--out-dir", b])
    with open(os.path.join(b, "metrics.jsonl"), "a") as f:  # as if the run had gone on past its checkpoint
        f.write(json.dumps({"step": 12, "train_loss_avg": 9.9, "lr": 0.0, "elapsed": 0.0}) + "\n")
    cg.main([*common, "--max-steps", "20", "--out-dir", b, "--resume"])
    sa = torch.load(os.path.join(a, "ckpt.pt"), weights_only=True)
    sb = torch.load(os.path.join(b, "ckpt.pt"), weights_only=True)
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    with open(os.path.join(a, "metrics.jsonl")) as f:
        ma = [json.loads(line) for line in f]
    with open(os.path.join(b, "metrics.jsonl")) as f:
        mb = [json.loads(line) for line in f]
    assert [m["val_loss"] for m in ma if "val_loss" in m] == [m["val_loss"] for m in mb if "val_loss" in m]
    # every row but the timings, the mean training losses included, and no row twice
    def losses(rows):
        return [{k: v for k, v in m.items() if k not in ("elapsed", "tokens_per_sec")} for m in rows]
    assert losses(ma) == losses(mb)
    assert [m["step"] for m in ma if "train_loss_avg" in m] == [3, 6, 9, 12, 15, 18]
    cg.main([*common, "--max-steps", "20", "--out-dir", b, "--resume", "--dtype", "float16"])  # float32 run, no scale
    assert torch.load(os.path.join(b, "ckpt.pt"), weights_only=True)["step"] == 20  # loaded: a fresh one, no crash
    with open(os.path.join(b, "metrics.jsonl")) as f:  # resuming the finished run evaluated and logged it again
        assert losses([json.loads(line) for line in f]) == losses(ma)
    with pytest.raises(SystemExit, match="at step 20, past --max-steps 12"):  # it reported "done" and did nothing
        cg.main([*common, "--max-steps", "12", "--out-dir", b, "--resume"])
    os.remove(os.path.join(b, "metrics.jsonl"))  # lost: the checkpoint alone goes on (it was a FileNotFoundError)
    cg.main([*common, "--max-steps", "25", "--out-dir", b, "--resume"])
    with open(os.path.join(b, "metrics.jsonl")) as f:
        assert [m["step"] for m in map(json.loads, f) if "val_loss" in m] == [25]
    os.remove(os.path.join(b, "metrics.jsonl"))
    cg.main([*common, "--max-steps", "25", "--out-dir", b, "--resume"])  # finished: nothing to log, no IndexError


def test_metrics_have_the_mean_training_loss_between_evaluations(tmp_path, monkeypatch):
    # The training loss of every step, as the loop sees it: loss_fn is called with grad on only in training.
    step_losses = []
    real_loss_fn = cg.loss_fn

    def recording_loss_fn(logits, targets):
        loss = real_loss_fn(logits, targets)
        if torch.is_grad_enabled():
            step_losses.append(loss.item())
        return loss

    monkeypatch.setattr(cg, "loss_fn", recording_loss_fn)
    clips = []  # the cpu preset clips the gradient norm to 1.0 at every step
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, max_norm: clips.append(max_norm) or real_clip(p, max_norm))
    out = str(tmp_path / "run")
    cg.main(["--stage", "full", "--max-steps", "20", "--eval-interval", "10", "--log-interval", "4",
             "--out-dir", out, "--num-chars", "1", *TINY_ARGS])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [(m["step"], "val_loss" in m) for m in rows] == [
        (0, True), (4, False), (8, False), (10, True), (12, False), (16, False), (20, False), (20, True)]
    assert len(step_losses) == 20 and clips == [1.0] * 20
    cfg = cg.make_config(cg.parse_args(["--max-steps", "20", *TINY_ARGS]), 65)
    for m in rows:
        if "train_loss_avg" in m:  # the mean of the log_interval steps that end at this row's step
            s = m["step"]
            assert m["train_loss_avg"] == round(sum(step_losses[s - 4:s]) / 4, 4), m
            assert m["lr"] == cg.lr_for_step(s - 1, cfg)  # the lr of the row's last step
        else:  # an evaluation after step s: the lr that step used
            assert m["lr"] == cg.lr_for_step(max(m["step"] - 1, 0), cfg)


def test_missing_data_file_says_where_to_get_it(tmp_path):
    with pytest.raises(SystemExit) as e:
        cg.main(["--data", str(tmp_path / "nope.txt"), "--out-dir", str(tmp_path / "o"), "--device", "cpu"])
    assert cg.DATA_URL in str(e.value)


def test_unavailable_device_says_what_to_use(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        cg.main(["--device", "cuda", "--out-dir", "unused"])
    assert "no CUDA GPU" in str(e.value) and "--device cpu" in str(e.value)


@pytest.mark.parametrize("flags, match", [
    (["--eval-interval", "0"], "--eval-interval must be at least 1"), (["--eval-iters", "0"], "--eval-iters"),
    (["--batch-size", "0"], "--batch-size"), (["--block-size", "0"], "--block-size"),
    (["--temperature", "0"], "--temperature must be a number >= 1e-5"), (["--top-k", "0"], "--top-k"),
    (["--temperature", "1e-45"], "--temperature must be a number >= 1e-5, got 1e-45"),  # inf logits: NaN draws
    (["--n-head", "0"], "--n-head must be at least 1"), (["--n-embd", "0"], "--n-embd must be at least 1"),
    (["--n-layer", "0"], "--n-layer must be at least 1"),
    (["--lr-decay-steps", "0"], "--lr-decay-steps must be at least 1"),  # was the default, silently
    (["--num-chars", "-3"], "--num-chars"), (["--lr", "-1"], "--lr must be above 0, got -1.0"),
    (["--dropout", "1.5"], r"--dropout must lie in [0, 1), got 1.5")])
def test_bad_flags_are_refused_before_training(flags, match, capsys):
    with pytest.raises(SystemExit):
        cg.parse_args(flags)
    assert match in capsys.readouterr().err


def test_unknown_prompt_characters_are_refused_before_training(tmp_path):
    with pytest.raises(SystemExit, match="--prompt: characters not in the vocabulary"):
        cg.main([*TINY_ARGS, "--max-steps", "1", "--prompt", "h\u00e9llo", "--out-dir", str(tmp_path / "o")])
    assert not os.path.exists(tmp_path / "o" / "ckpt.pt")  # refused before any training


def test_a_text_without_newlines_trains_and_samples(tmp_path, capsys):
    """A sample starts from a newline when none is given; a text without one started from a KeyError '\\n'."""
    (tmp_path / "one_line.txt").write_text("the cat sat on the mat. " * 40)
    run = [*TINY_ARGS, "--stage", "bigram", "--max-steps", "2", "--num-chars", "5", "--out-dir", str(tmp_path / "o")]
    cg.main([*run, "--data", str(tmp_path / "one_line.txt")])
    capsys.readouterr()
    cg.main([*run, "--data", str(tmp_path / "one_line.txt"), "--sample"])
    assert len(capsys.readouterr().out.strip()) >= 5


def test_bad_data_and_checkpoints_are_named_with_the_fix(tmp_path):
    """Each was a traceback (IsADirectoryError, UnicodeDecodeError, torch.randint's RuntimeError, an
    AssertionError, KeyError 'config', an IndexError when sampling) or, resuming on other text, a checkpoint
    whose characters no longer matched its model."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9\n".encode("latin1"))
    (tmp_path / "short.txt").write_text("abc\n" * 30)  # 120 characters: a validation split of 12
    (tmp_path / "abc.txt").write_text("abc\n" * 100)
    (tmp_path / "xyz.txt").write_text("xyz\n" * 100)  # as many characters: it trained on, silently
    run = [*TINY_ARGS, "--max-steps", "1", "--num-chars", "3", "--out-dir", str(tmp_path / "o")]
    for data, match in (("folder", "folder is a folder; give one text file"), ("latin1.txt", "is not UTF-8 text"),
                        ("short.txt", "has 12 characters, too few for one window of --block-size 16 \\+ 1")):
        with pytest.raises(SystemExit, match=match):
            cg.main([*run, "--data", str(tmp_path / data)])
    with pytest.raises(SystemExit, match="--n-embd 16 is not a multiple of --n-head 3"):
        cg.main([*run, "--n-head", "3", "--data", str(tmp_path / "abc.txt")])
    with pytest.raises(SystemExit, match="--resume: no checkpoint at .*; run without --resume to start"):
        cg.main([*run, "--resume", "--data", str(tmp_path / "abc.txt")])
    assert not (tmp_path / "o").exists()  # a refused run leaves no empty run folder behind
    cg.main([*run, "--data", str(tmp_path / "abc.txt")])
    before = (tmp_path / "o" / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit, match="--resume: --data .* has other characters than the checkpoint's run"):
        cg.main([*run, "--resume", "--max-steps", "2", "--data", str(tmp_path / "xyz.txt")])
    assert (tmp_path / "o" / "ckpt.pt").read_bytes() == before  # the run is left as it was
    with pytest.raises(SystemExit, match="--prompt: characters not in the vocabulary: \\['z'\\]"):
        cg.main(["--sample", "--prompt", "zab", "--out-dir", str(tmp_path / "o"), "--device", "cpu"])
    gpt2.save_checkpoint(str(tmp_path / "g" / "ckpt.pt"), gpt2.GPT(gpt2.GPTConfig.from_preset("tiny", n_layer=1)))
    with pytest.raises(SystemExit, match="is not a checkpoint of char_gpt.py"):
        cg.main(["--sample", "--out-dir", str(tmp_path / "g"), "--device", "cpu"])


def test_unknown_stage_lists_the_valid_ones(capsys):
    with pytest.raises(SystemExit):
        cg.parse_args(["--stage", "transformer"])
    err = capsys.readouterr().err
    assert all(s in err for s in cg.STAGES)


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_char_gpt", os.path.join(ROOT, "bench", "bench_char_gpt.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_bench_without_cuda_says_so(monkeypatch, capsys):
    bench = load_bench()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        bench.main([])
    assert e.value.code != 0 and "needs a CUDA GPU" in capsys.readouterr().err
    args, rest = bench.parse_args(["--device", "cpu", "--results", "r.md", "--max-steps", "4"])
    assert args.goal == 1.47 and rest == ["--max-steps", "4"]  # nanoGPT's 1.4697 for the gpu preset
    with pytest.raises(SystemExit):  # a CPU run must not append to bench/results/char_gpt_gpu.md
        bench.parse_args(["--device", "cpu"])
    assert "--results" in capsys.readouterr().err


def test_gpu_bench_code_path_on_cpu(tmp_path):
    # The GPU benchmark's whole path (run, read metrics, write the results section, check the goal) with
    # a tiny model on the CPU.
    bench = load_bench()
    results, out = str(tmp_path / "results.md"), str(tmp_path / "run")
    tiny = ["--results", results, "--out-dir", out, "--num-chars", "5", "--max-steps", "4", "--eval-interval", "2",
            *TINY_ARGS]  # its --device cpu is the benchmark's own flag; the others go on to char_gpt.py
    bench.main([*tiny, "--goal", "10"])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        val = [json.loads(line)["val_loss"] for line in f if "val_loss" in line]
    with open(results) as f:
        text = f.read()
    best = min(range(len(val)), key=val.__getitem__)
    assert f"best val loss **{val[best]:.4f}** at step {2 * best}; final {val[-1]:.4f}" in text
    assert "goal <= 10.0 (nanoGPT's shakespeare_char: 1.4697): **met**" in text
    assert f"torch {torch.__version__}" in text and "char_gpt.py --stage full --preset gpu --device cpu" in text
    assert "wall time" in text and text.count("| 4 |") == 1
    with pytest.raises(SystemExit) as e:  # a missed goal: the section is written, and the exit status says so
        bench.main([*tiny, "--goal", "0.5"])
    assert "above the goal 0.5" in str(e.value)
    with open(results) as f:
        assert f.read().count("## char_gpt.py --preset gpu") == 2
