"""Tests of train_gpt2.py: shard format, the loader's guarantees, HellaSwag scoring, gradient accumulation,
exact resume (also with another process count), torchrun == accumulation, tokenizers, learning, and bad
input. Offline, tiny models; the `device` tests also run on each device in LLM_SCRATCH_TEST_DEVICES."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import bpe
import gpt2
import train_gpt2 as tg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a 2-layer, 32-wide model: milliseconds per step. TINY gives it a 512-token vocabulary (the toy shards
# hold ids up to 511) and the byte tokenizer (quick to build; its 257 ids fit).
SMALL = ["--model", "tiny", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--device", "cpu",
         "--dtype", "float32", "--no-compile", "--sample-tokens", "0", "--log-interval", "1"]
TINY = [*SMALL, "--vocab-size", "512", "--tokenizer", "bytes"]


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these models are too small to gain from threads, and the CI box is shared
    yield
    torch.set_num_threads(threads)


def make_shards(folder, n_train=6000, n_val=1000, vocab=512, seed=0):
    """A learnable stream (a noisy repeating phrase) split into two train shards and a val shard."""
    rng = np.random.default_rng(seed)
    phrase = rng.integers(0, vocab, size=37)
    stream = np.tile(phrase, (n_train + n_val) // 37 + 1)[:n_train + n_val]
    noise = rng.random(len(stream)) < 0.1
    stream[noise] = rng.integers(0, vocab, size=int(noise.sum()))
    os.makedirs(folder, exist_ok=True)
    tg.write_shard(os.path.join(folder, "toy_train_000000.bin"), stream[:n_train // 2])
    tg.write_shard(os.path.join(folder, "toy_train_000001.bin"), stream[n_train // 2:n_train])
    tg.write_shard(os.path.join(folder, "toy_val_000000.bin"), stream[n_train:])
    return str(folder)


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(out_dir):
    return [r["train_loss"] for r in metrics(out_dir) if "train_loss" in r]


# -----------------------------------------------------------------------------
# shards and loader


def test_shard_roundtrip_and_corruption(tmp_path):
    path = str(tmp_path / "a.bin")
    tokens = np.array([0, 1, 50256, 65535, 7])
    tg.write_shard(path, tokens)
    header = np.fromfile(path, dtype=np.int32, count=3)
    assert list(header) == [20240520, 1, 5]  # llm.c's header, readable by llm.c itself
    np.testing.assert_array_equal(tg.read_shard(path), tokens)
    with open(path, "r+b") as f:  # a download cut short
        f.truncate(os.path.getsize(path) - 2)
    with pytest.raises(ValueError, match="truncated"):
        tg.read_shard(path)
    with open(path, "wb") as f:
        f.write(b"not a shard" * 200)
    with pytest.raises(ValueError, match="not a token shard"):
        tg.read_shard(path)
    with pytest.raises(ValueError, match="uint16"):
        tg.write_shard(path, [70000])
    with pytest.raises(ValueError, match="uint16"):
        tg.write_shard(path, [65536])  # the first id past uint16 (it would wrap to 0)
    tg.write_shard(path, tokens)
    with open(path, "ab") as f:  # bytes past the header's count: something else was written into it
        f.write(b"\0\0")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        tg.read_shard(path)


def test_a_corrupt_download_is_removed_and_named(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_SCRATCH_CACHE", str(tmp_path / "cache"))
    bad = os.path.join(gpt2.cache_dir("fineweb-edu-10b"), "edu_fineweb_train_000001.bin")
    with open(bad, "wb") as f:  # present, so not downloaded again, but cut short
        f.write(b"x" * 100)
    with pytest.raises(ValueError, match="removed; run again"):
        tg.fetch_remote("fineweb-edu-10b")
    assert not os.path.exists(bad)  # the next run fetches it again


def test_shard_folders_split_on_the_file_name_and_entropy_in_nats(tmp_path):
    data = make_shards(tmp_path / "interval_val_runs")  # the folder's name holds "val": the file names decide
    train, val = tg.resolve_data(data, 0)
    assert [os.path.basename(f) for f in train] == ["toy_train_000000.bin", "toy_train_000001.bin"]
    assert [os.path.basename(f) for f in val] == ["toy_val_000000.bin"]
    p = np.array([2, 1]) / 3  # ids 1, 1, 3
    assert tg.unigram_entropy([np.array([1, 1, 3])]) == pytest.approx(-(p * np.log(p)).sum())


def position_shards(folder, sizes):
    """Shards whose tokens are their global positions, so a window names where it came from."""
    files, start = [], 0
    for i, n in enumerate(sizes):
        files.append(str(folder / f"pos_train_{i:06d}.bin"))
        tg.write_shard(files[-1], np.arange(start, start + n))
        start += n
    return files


def test_loader_windows_are_a_permutation_each_epoch(tmp_path):
    files = position_shards(tmp_path, [500, 333, 170])
    loader = tg.WindowLoader(files, seq_len=16, seed=3)
    assert loader.n == 31 + 20 + 10  # (n - 1) // 16 windows per shard: the tail too short for one is dropped
    x, y = loader.windows(range(loader.n))
    torch.testing.assert_close(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(loader.n, 15, dtype=torch.long))  # no shard crossing
    # one epoch = every window exactly once, each starting at a multiple of 16 inside its shard
    expected = [s + 16 * k for s, n in ((0, 31), (500, 20), (833, 10)) for k in range(n)]
    assert sorted(x[:, 0].tolist()) == expected
    assert x[:, 0].tolist() != expected  # shuffled
    # past the end: a new permutation of the same windows instead of running dry
    x2, _ = loader.windows(range(loader.n, 2 * loader.n))
    assert sorted(x2[:, 0].tolist()) == expected and x2[:, 0].tolist() != x[:, 0].tolist()
    # same seed -> same order (every rank agrees); another seed -> another order
    assert torch.equal(tg.WindowLoader(files, 16, seed=3).windows(range(9))[0], loader.windows(range(9))[0])
    assert not torch.equal(tg.WindowLoader(files, 16, seed=4).windows(range(9))[0], loader.windows(range(9))[0])
    val = tg.WindowLoader(files, 16, shuffle=False)
    assert val.windows(range(3))[0][:, 0].tolist() == [0, 16, 32]
    (tmp_path / "e").mkdir()
    empty = position_shards(tmp_path / "e", [0, 100])
    loader = tg.WindowLoader(empty, 16, shuffle=False)  # an empty shard holds no window, and hides none
    assert loader.n == 6 and loader.windows(range(6))[0][:, 0].tolist() == [0, 16, 32, 48, 64, 80]
    (tmp_path / "x").mkdir()  # 32 tokens: the second window would lack its last target
    assert tg.WindowLoader(position_shards(tmp_path / "x", [32]), 16).n == 1


@pytest.mark.parametrize("world,accum", [(2, 1), (4, 2)])
def test_step_examples_do_not_depend_on_process_count(tmp_path, world, accum):
    files = position_shards(tmp_path, [1200, 900])
    per_step = world * accum * 2  # windows per optimizer step, micro-batch 2
    one, many = tg.WindowLoader(files, 16, seed=0), tg.WindowLoader(files, 16, seed=0)
    seen = []
    for step in range(2 * one.n // per_step + 3):  # more than two epochs
        ref = torch.cat([one.micro_batch(m, 0, 1, 2)[0] for m in range(per_step // 2)])
        got = torch.cat([many.micro_batch(m, r, world, 2)[0] for m in range(accum) for r in range(world)])
        assert sorted(got[:, 0].tolist()) == sorted(ref[:, 0].tolist())  # the same examples...
        if many.pos // many.n == (many.pos + per_step - 1) // many.n:  # a step across epochs may repeat one
            assert len(set(got[:, 0].tolist())) == per_step  # ...in disjoint per-rank slices
        seen += got[:, 0].tolist()
        one.pos += per_step
        many.pos += per_step
    assert len(set(seen[:one.n])) == one.n  # no window repeats within the first epoch
    # the position alone restores the stream exactly
    fresh = tg.WindowLoader(files, 16, seed=0)
    fresh.pos = many.pos
    assert torch.equal(fresh.micro_batch(0, 1, world, 2)[0], many.micro_batch(0, 1, world, 2)[0])


def test_two_micro_steps_give_the_gradient_of_one_batch_twice_the_size(tmp_path):
    """Gradient accumulation: 2 micro-batches of 2 sequences leave the same .grad (and so the same clipped
    norm) as one batch of 4. Adam alone would hide a factor of 2 in the gradient; this does not."""
    data = make_shards(tmp_path / "data")
    grads, norms, losses = [], [], []
    for micro_steps, batch in ((2, 2), (1, 4)):
        torch.manual_seed(0)
        model = gpt2.GPT(gpt2.GPTConfig(vocab_size=512, n_layer=2, n_head=2, n_embd=32, block_size=16))
        loader = tg.WindowLoader([os.path.join(data, "toy_train_000000.bin")], 16, seed=0)
        scaler = gpt2.grad_scaler("cpu", torch.float32)
        losses.append(tg.accumulate_gradients(model, loader, micro_steps, batch, tg.Proc(), torch.float32, scaler))
        assert loader.pos == 4  # the step's windows are consumed
        grads.append([p.grad.clone() for p in model.parameters()])
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
    torch.testing.assert_close(losses[0], losses[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(norms[0], norms[1])


def test_val_loss_is_the_mean_over_the_first_windows(tmp_path):
    """val_loss against the definition: the mean per-window loss of the first n windows (in order, each once,
    dropout off), batch sizes not mattering; a process of `world` takes every world-th of them."""
    files = [make_shards(tmp_path / "data") + "/toy_val_000000.bin"]
    loader = tg.WindowLoader(files, 16, shuffle=False)  # 62 windows
    torch.manual_seed(0)
    model = gpt2.GPT(gpt2.GPTConfig(vocab_size=512, n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.3))
    model.eval()
    per_window = [model(x, y)[1].item() for x, y in zip(*(t.unsqueeze(1) for t in loader.windows(range(loader.n))))]
    model.train()
    args = ("cpu", torch.float32)
    assert tg.val_loss(model, loader, 5, 2, *args, 0, 1) == pytest.approx(np.mean(per_window[:5]), rel=1e-5)
    assert model.training  # back to training mode
    tg.write_shard(tmp_path / "short.bin", tg.read_shard(files[0])[:16 * 3 + 1])  # 3 windows: asked for 4, it
    short = tg.WindowLoader([str(tmp_path / "short.bin")], 16, shuffle=False)  # counts each of them once
    assert tg.val_loss(model, short, 4, 2, *args, 0, 1) == pytest.approx(np.mean(per_window[:3]), rel=1e-5)
    assert tg.val_loss(model, loader, 7, 3, *args, 1, 2) == pytest.approx(np.mean(per_window[1:7:2]), rel=1e-5)


def test_sample_draws_real_tokens_from_its_own_generator():
    class Stub(torch.nn.Module):  # ids 104 'h' and 105 'i' equally likely; the padding rows far likelier
        config = gpt2.GPTConfig(block_size=64)

        def new_cache(self, batch):
            return None

        def forward(self, idx, cache=None, last_logits_only=False):
            logits = torch.full((1, idx.size(1), 320), -10.0)
            logits[..., 104:106], logits[..., 257:] = 5.0, 50.0
            return logits, None
    tok, state = tg.load_tokenizer("bytes"), torch.get_rng_state()
    out = [tg.sample(Stub(), tok, "> ", 30, "cpu", seed, top_k=2) for seed in (1, 1, 2)]
    assert torch.equal(torch.get_rng_state(), state)  # training's random stream is untouched
    assert out[0] == out[1] != out[2] and set(out[0][2:]) == {"h", "i"} and len(out[0]) == 32


def test_flags_are_checked_against_the_process_count(tmp_path):
    base = ["--data", "shakespeare", "--out-dir", str(tmp_path), "--seq-len", "16", "--batch-size", "2"]
    tg.check_args(tg.parse_args([*base, "--total-batch-size", "96", "--eval-tokens", "32"]), 1)
    with pytest.raises(SystemExit, match="not a multiple of --batch-size x --seq-len x processes"):
        tg.check_args(tg.parse_args([*base, "--total-batch-size", "96"]), 2)  # 96 = 3 x (2 x 16), not 2 x 2 x 16
    with pytest.raises(SystemExit, match="give at least 32"):
        tg.check_args(tg.parse_args([*base, "--total-batch-size", "64", "--eval-tokens", "16"]), 2)


# -----------------------------------------------------------------------------
# HellaSwag


def byte_encode(text):
    return list(text.encode())


def test_hellaswag_scoring_matches_per_ending_loop(tmp_path):
    examples = [{"ctx": "The cat sat on", "endings": ["the mat.", "a", "the very long sofa by the door.", "x"],
                 "label": 0},
                {"ctx": "Water boils at", "endings": ["100 degrees.", "the moon", "zero", "it"], "label": 2}]
    path = tmp_path / "hs.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    loaded = tg.hellaswag_examples(str(path))
    torch.manual_seed(0)
    model = gpt2.GPT(gpt2.GPTConfig(vocab_size=256, n_layer=2, n_head=2, n_embd=32, block_size=64)).eval()
    expected_correct = 0
    for ex in loaded:
        tokens, mask, label = tg.render_hellaswag(ex, byte_encode, 64)
        got = tg.ending_losses(model, tokens, mask, "cpu", torch.float32)
        ctx = byte_encode(ex["ctx"])
        want = []
        for ending in ex["endings"]:  # one ending at a time, no padding: the definition
            end = byte_encode(" " + ending)
            ids = torch.tensor([ctx + end])
            logits, _ = model(ids)
            logp = torch.log_softmax(logits[0, :-1], -1)
            tgt = ids[0, 1:]
            want.append(-logp[torch.arange(len(tgt)), tgt][-len(end):].mean())
        torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-5)
        expected_correct += int(torch.stack(want).argmin()) == label
        # the lowest mean loss wins: labelled with it the example is right, with the highest it is wrong
        best, worst = ({**ex, "label": int(f(torch.stack(want)))} for f in (torch.argmin, torch.argmax))
        assert tg.hellaswag(model, [best, best, worst], byte_encode, "cpu", torch.float32, 0, 1) == 2 / 3
    acc = tg.hellaswag(model, loaded, byte_encode, "cpu", torch.float32, 0, 1)
    assert acc == expected_correct / len(loaded)
    # contexts longer than the model's window lose their oldest tokens, never the ending
    tokens, mask, _ = tg.render_hellaswag(examples[0], byte_encode, 12)
    assert tokens.size(1) <= 12 and mask[2].sum() == min(11, len(byte_encode(" " + examples[0]["endings"][2])))
    assert tokens[2][mask[2].bool()].tolist() == byte_encode(" " + examples[0]["endings"][2])[-11:]
    path.write_text(json.dumps({"ctx": "a", "endings": ["b"], "label": 0}) + "\n")
    with pytest.raises(ValueError, match="4 endings"):
        tg.hellaswag_examples(str(path))


# -----------------------------------------------------------------------------
# training runs


def run(*argv):
    tg.main([*TINY, *map(str, argv)])


def test_resume_is_exact(tmp_path, capsys):
    data = make_shards(tmp_path / "data")
    common = ["--data", data, "--seq-len", 16, "--batch-size", 4, "--total-batch-size", 128, "--max-steps", 8,
              "--warmup-steps", 2, "--lr", 3e-3, "--eval-interval", 4, "--dropout", 0.1]
    run(*common, "--out-dir", tmp_path / "straight")
    run(*common, "--out-dir", tmp_path / "split", "--stop-after", 4)
    assert len(train_losses(tmp_path / "split")) == 4
    capsys.readouterr()
    run(*common, "--out-dir", tmp_path / "split", "--resume")
    assert "--resume: --" not in capsys.readouterr().out  # the same flags: nothing to warn about
    straight, split = metrics(tmp_path / "straight"), metrics(tmp_path / "split")
    assert len(train_losses(tmp_path / "straight")) == 8
    # bit-identical: model, AdamW moments, schedule, data position and dropout's RNG all restored
    assert train_losses(tmp_path / "split") == train_losses(tmp_path / "straight")
    ema = lambda rows: [r["train_loss_ema"] for r in rows if "train_loss" in r]  # smoothed: its state resumes too
    assert ema(split) == ema(straight) and ema(straight)[-1] < ema(straight)[0]
    vals = lambda rows: [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    assert vals(split) == vals(straight) and [s for s, _ in vals(straight)] == [0, 4, 8]
    assert train_losses(tmp_path / "straight")[-1] < train_losses(tmp_path / "straight")[0]
    ckpt = gpt2.load_checkpoint(str(tmp_path / "split" / "ckpt.pt"))
    assert ckpt["step"] == 8 and ckpt["loader"]["pos"] == 8 * 128 // 16
    assert os.path.exists(tmp_path / "straight" / "loss.png")
    run(*common, "--out-dir", tmp_path / "half", "--stop-after", 2)  # float32, then resumed in float16: no
    run(*common, "--out-dir", tmp_path / "half", "--resume", "--dtype", "float16", "--lr", 1e-3)  # scale saved,
    # a fresh one; another --lr is allowed, and said: the run is no longer the uninterrupted one's continuation
    assert "--resume: --lr 0.001 (the checkpoint's run: 0.003)" in capsys.readouterr().out
    assert gpt2.load_checkpoint(str(tmp_path / "half" / "ckpt.pt"))["step"] == 8
    # --init from a checkpoint: same weights (so the same val loss), fresh optimizer and schedule
    tg.main(["--init", str(tmp_path / "split" / "ckpt.pt"), "--data", data, "--seq-len", "16", "--batch-size", "4",
             "--total-batch-size", "128", "--max-steps", "1", "--eval-interval", "1", "--sample-tokens", "0",
             "--device", "cpu", "--out-dir", str(tmp_path / "finetune"), "--dropout", "0.0"])
    assert metrics(tmp_path / "finetune")[0]["val_loss"] == vals(split)[-1][1]
    assert gpt2.load_checkpoint(str(tmp_path / "finetune" / "ckpt.pt"))["config"]["dropout"] == 0.0  # the flag wins
    assert "only apply to --init scratch" in error_of([*TINY, "--init", tmp_path / "split" / "ckpt.pt", "--data", data])
    # the checkpoint is a model gpt2.py (and so generate.py) can load
    model = gpt2.GPT.from_pretrained(str(tmp_path / "split" / "ckpt.pt"))
    assert model.config.n_embd == 32 and model.config.vocab_size == 512
    # --resume refuses what would make another run, and says what differs from the checkpoint's run
    split_args = [*common, "--out-dir", tmp_path / "split", "--resume"]
    msg = error_of([*TINY, *split_args, "--seed", 1])
    assert "--resume: --seed is 1 but the checkpoint was trained with 1337" in msg
    assert "cannot be combined with --init" in error_of([*TINY, *split_args, "--init", tmp_path / "split" / "ckpt.pt"])
    capsys.readouterr()
    run(*split_args, "--max-steps", 9)
    assert "--resume: --max-steps 9 (the checkpoint's run: 8)" in capsys.readouterr().out
    make_shards(tmp_path / "data", n_train=5000)  # the same --data, other contents
    assert "the training data changed since the checkpoint" in error_of([*TINY, *split_args, "--max-steps", 10])


def test_resume_restores_each_ranks_rng_and_the_loader_position(tmp_path):
    """tg.resume on hand-made checkpoints: the same process count gets each rank its own saved RNG states
    (Python's, NumPy's, torch's); another count reseeds, each rank differently."""
    def draw():
        return random.random(), float(np.random.rand()), *torch.rand(2).tolist()
    states, refs = [], []
    for seed in (1, 2):
        gpt2.seed_everything(seed)
        states.append(tg.rng_state())
        refs.append(draw())
    loader = tg.WindowLoader(position_shards(tmp_path, [200]), 16)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    args = tg.parse_args(["--seq-len", "16", "--total-batch-size", "64"])
    ckpt = dict(args=dict(vars(args)), loader={"n": loader.n, "pos": 5}, optimizer=optimizer.state_dict(), scaler={},
                rng=states, step=3)
    scaler = gpt2.grad_scaler("cpu", torch.float32)
    for rank in (1, 0):
        assert tg.resume(args, ckpt, "ckpt.pt", optimizer, scaler, loader, tg.Proc(rank, rank, 2)) == 3
        assert draw() == refs[rank] and loader.pos == 5
    after = []
    for rank in (0, 1):  # 2 saved states, 4 processes now
        tg.resume(args, ckpt, "ckpt.pt", optimizer, scaler, loader, tg.Proc(rank, rank, 4))
        after.append(draw())
    assert after[0] != after[1] and not set(after) & set(refs)


def test_a_run_records_its_schedule_clip_evaluations_and_speed(tmp_path, monkeypatch):
    """One short run checked against the formulas: the lr of every step (warmup + cosine to --min-lr-ratio),
    the clipped first gradient (AdamW's first moment after one step is (1 - beta1) x the clipped gradient),
    --weight-decay on the matrices' group, evaluations on the interval and at the last step, the final val
    loss = the mean over the first --eval-tokens of validation, tokens/s and MFU over the whole step, and
    checkpoints every --checkpoint-interval."""
    data = make_shards(tmp_path / "data")
    monkeypatch.setattr(tg, "peak_flops", lambda device: 1e12)  # as on a GPU: MFU is recorded
    saved, first_moment, save_run = [], [], tg.save_run

    def spy(path, raw_model, proc, **state):
        saved.append(state["step"])
        if state["step"] == 1:
            first_moment.append(sum(s["exp_avg"].pow(2).sum() for s in state["optimizer"]["state"].values()).sqrt())
        save_run(path, raw_model, proc, **state)
    monkeypatch.setattr(tg, "save_run", spy)
    out = tmp_path / "out"
    run("--data", data, "--seq-len", 16, "--batch-size", 2, "--total-batch-size", 64, "--max-steps", 4,
        "--warmup-steps", 1, "--lr", 1e-2, "--min-lr-ratio", 0.5, "--grad-clip", 0.01, "--weight-decay", 0.05,
        "--eval-interval", 3, "--eval-tokens", 48, "--checkpoint-interval", 1, "--out-dir", out)
    rows = metrics(out)
    train = [r for r in rows if "train_loss" in r]
    assert [r["lr"] for r in train] == pytest.approx([gpt2.lr_at(s, 1e-2, 1, 4, 0.5) for s in range(4)])
    assert train[0]["grad_norm"] > 0.1 and float(first_moment[0]) == pytest.approx(0.1 * 0.01, rel=1e-3)
    assert saved == [1, 2, 3, 4]
    ckpt = gpt2.load_checkpoint(str(out / "ckpt.pt"))
    groups = ckpt["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0] and [g["lr"] for g in groups] == [train[-1]["lr"]] * 2
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 3, 4]
    model = gpt2.GPT(gpt2.GPTConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    x, y = tg.WindowLoader([os.path.join(data, "toy_val_000000.bin")], 16, shuffle=False).windows(range(3))
    want = np.mean([model(x[i:i + 1], y[i:i + 1])[1].item() for i in range(3)])
    assert rows[-1]["step"] == 4 and rows[-1]["val_loss"] == pytest.approx(want, rel=1e-5)
    flops_per_token = model.flops_per_token(16)  # tokens/s / MFU = peak / FLOPs per token, whatever the time
    for r in train:
        assert r["tokens_per_sec"] / r["mfu"] == pytest.approx(1e12 / flops_per_token)


def test_load_data_applies_seed_limit_and_an_unshuffled_validation(tmp_path):
    data = make_shards(tmp_path / "data")
    hs = tmp_path / "hs.jsonl"
    hs.write_text("".join(json.dumps({"ctx": f"{i}", "endings": ["a", "b", "c", "d"], "label": 0}) + "\n"
                          for i in range(5)))
    args = tg.parse_args([*TINY, "--data", data, "--seq-len", "16", "--seed", "7", "--hellaswag-interval", "1",
                          "--hellaswag-file", str(hs), "--hellaswag-limit", "2"])
    tok = tg.load_tokenizer("bytes")
    d = tg.load_data(args, tok, tg.model_config(args, None, tok), tg.Proc())
    train, val = tg.resolve_data(data, 0)
    assert torch.equal(d.train.windows(range(9))[0], tg.WindowLoader(train, 16, seed=7).windows(range(9))[0])
    assert torch.equal(d.val.windows(range(9))[0], torch.from_numpy(
        tg.read_shard(val[0])[:144].astype(np.int64)).view(9, 16))
    assert [ex["ctx"] for ex in d.hellaswag] == ["0", "1"]


def test_fp16_loss_scaling_gives_the_fp32_gradient_and_resumes_exactly(tmp_path):
    """fp16 on the CPU: the scaler multiplies the loss and must divide the gradient back before it is
    clipped or logged (the grad norm matches fp32's); its state resumes like the optimizer's."""
    data = make_shards(tmp_path / "data")
    common = ["--data", data, "--seq-len", 16, "--batch-size", 4, "--total-batch-size", 64, "--max-steps", 4,
              "--warmup-steps", 1, "--lr", 1e-2, "--eval-interval", 0]
    for name, dtype, extra in (("fp32", "float32", ()), ("fp16", "float16", ()),
                               ("split", "float16", ("--stop-after", 2))):
        run(*common, "--dtype", dtype, "--out-dir", tmp_path / name, *extra)
    run(*common, "--dtype", "float16", "--out-dir", tmp_path / "split", "--resume")
    norms = [[r["grad_norm"] for r in metrics(tmp_path / name)] for name in ("fp32", "fp16")]
    assert norms[1][0] == pytest.approx(norms[0][0], rel=2e-2)
    assert train_losses(tmp_path / "split") == train_losses(tmp_path / "fp16")
    scalers = [gpt2.load_checkpoint(str(tmp_path / name / "ckpt.pt"))["scaler"] for name in ("fp16", "split")]
    assert scalers[0] == scalers[1] and scalers[0]["_growth_tracker"] == 4


def test_torchrun_two_processes_equal_one_process_accumulating(tmp_path):
    """8 steps in one process (2 accumulation micro-steps) == 4 steps under torchrun with 2 processes (1
    micro-step each), then --resume in one process for the other 4: the loader's position, optimizer and
    schedule carry over to another process count. The grad norm is compared too: Adam's scale invariance
    and clipping would hide gradients that are a multiple of the right ones in the losses."""
    data = make_shards(tmp_path / "data")
    hs = tmp_path / "hellaswag.jsonl"  # 5 examples: an uneven split over 2 processes
    hs.write_text("".join(json.dumps({"ctx": f"Example {i}: the man opens the", "label": i % 4,
                                      "endings": ["door.", "window slowly.", "box of tea", "book"]}) + "\n"
                          for i in range(5)))
    common = ["--data", data, "--seq-len", 16, "--batch-size", 2, "--total-batch-size", 64, "--max-steps", 8,
              "--warmup-steps", 1, "--lr", 3e-3, "--eval-interval", 2, "--eval-tokens", 320,
              "--tokenizer", "gpt2", "--vocab-size", 50257, "--hellaswag-interval", 4, "--hellaswag-file", hs]
    run(*common, "--out-dir", tmp_path / "one")  # 1 process x 2 accumulation micro-steps
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "train_gpt2.py"), *TINY, *map(str, common), "--stop-after", "4",
           "--out-dir", str(tmp_path / "two")]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "2 processes x 1 accumulation" in res.stdout
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(one) == 8 + 5 and len(two) == 4 + 3  # a row per step, val at 0, 2, 4 (, 6, 8)
    assert [r["step"] for r in one if "hellaswag" in r] == [0, 4, 8]

    def same(rows_a, rows_b):
        for a, b in zip(rows_a, rows_b, strict=True):
            assert a["step"] == b["step"]
            for key in ("train_loss", "grad_norm", "val_loss", "hellaswag"):
                if key in a:
                    assert abs(a[key] - b[key]) < 1e-5, (key, a, b)
    same(one[:len(two)], two)
    run(*common, "--out-dir", tmp_path / "two", "--resume")  # 1 process x 2 micro-steps from step 4
    same(one, metrics(tmp_path / "two"))
    losses = train_losses(tmp_path / "one")
    assert losses[-1] < losses[0] - 0.1  # it trained: the comparison is not trivial


def test_loss_falls_below_unigram_entropy(tmp_path, device, capsys):
    """The toy stream is a phrase repeated with 10% noise: a model must use the context to beat the
    unigram entropy (the best loss without context), and by a wide margin. On every test device, in
    bf16 autocast where the device has it."""
    data = make_shards(tmp_path / "data")
    entropy = tg.unigram_entropy([tg.read_shard(os.path.join(data, "toy_train_000000.bin"))])
    bf16 = device == "cpu" or (device.startswith("cuda") and torch.cuda.is_bf16_supported())
    run("--data", data, "--seq-len", 32, "--batch-size", 8, "--total-batch-size", 256, "--max-steps", 60,
        "--warmup-steps", 5, "--lr", 1e-2, "--eval-interval", 60, "--out-dir", tmp_path / "out",
        "--device", device, "--dtype", "bfloat16" if bf16 else "float32")
    assert f"device {device} {'bfloat16' if bf16 else 'float32'}" in capsys.readouterr().out
    final = [r["val_loss"] for r in metrics(tmp_path / "out") if "val_loss" in r][-1]
    assert final < entropy - 1.5, (final, entropy)


def test_text_is_tokenized_once_per_tokenizer_into_shards(tmp_path):
    text = tmp_path / "corpus" / "a.txt"
    text.parent.mkdir()
    text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40)
    (tmp_path / "corpus" / "b.txt").write_text("All:\nSpeak, speak.\n<|endoftext|>Second document.\n" * 30)
    train, val = tg.resolve_data(str(tmp_path / "corpus"), 0)  # GPT-2's tokenizer unless told otherwise
    tok = bpe.load_gpt2()
    b = (tmp_path / "corpus" / "b.txt").read_text()
    want = [*tok.encode(text.read_text()), tok.eot_token, *tok.encode(b, allowed_special="all"), tok.eot_token]
    assert want.count(tok.eot_token) == 2 + 30  # literal <|endoftext|> marks documents inside a file
    got = np.concatenate([tg.read_shard(train[0]), tg.read_shard(val[0])])
    assert got.tolist() == want and len(tg.read_shard(val[0])) == len(want) - int(len(want) * 0.9)
    assert os.path.dirname(train[0]).startswith(str(tmp_path / "corpus_tokens_"))  # cached next to the input
    mtime = os.path.getmtime(train[0])
    assert tg.resolve_data(str(tmp_path / "corpus"), 0, tok)[0] == train and os.path.getmtime(train[0]) == mtime
    # another tokenizer never reads these tokens: it gets shards of its own, and GPT-2's stay cached
    byte_tok = tg.load_tokenizer("bytes")
    assert byte_tok.encode(text.read_text()) == list(text.read_bytes()) and byte_tok.eot_token == 256
    btrain, bval = tg.resolve_data(str(tmp_path / "corpus"), 0, byte_tok)
    got = np.concatenate([tg.read_shard(btrain[0]), tg.read_shard(bval[0])]).tolist()
    assert got == [*text.read_bytes(), 256, *byte_tok.encode(b, allowed_special="all"), 256]
    assert os.path.getmtime(train[0]) == mtime
    text.write_text(text.read_text().replace("First", "Front"))  # an edit that keeps the size...
    os.utime(text, (mtime + 10, mtime + 10))
    edited, _ = tg.resolve_data(str(tmp_path / "corpus"), 0)
    assert edited != train and tg.read_shard(edited[0])[:2].tolist() == tok.encode("Front Citizen")
    train = edited
    text.write_text("changed")  # an edited input is tokenized again, the stale shards removed
    train2, _ = tg.resolve_data(str(tmp_path / "corpus"), 0)
    assert train2 != train and not os.path.exists(train[0])


def test_reproduction_preset_recipe_and_a_cpu_run_of_its_code_path(tmp_path):
    """--preset gpt2-10b is the GPT-2 124M reproduction recipe; its code path (bf16 autocast, val loss and HellaSwag on the
    same interval, periodic checkpoints, accumulation) runs here with the sizes shrunk to a toy."""
    a = tg.parse_args(["--preset", "gpt2-10b"])
    assert (a.model, a.data, a.seq_len, a.total_batch_size, a.max_steps) == ("gpt2", "fineweb-edu-10b", 1024, 2 ** 19,
                                                                           19073)
    assert (a.lr, a.warmup_steps, a.min_lr_ratio, a.weight_decay, a.grad_clip) == (1.5e-3, 300, 0.1, 0.1, 1.0)
    assert (a.dtype, a.compile, a.eval_interval, a.hellaswag_interval) == ("bfloat16", True, 250, 250)
    assert gpt2.lr_at(19073, 1.5e-3, 300, 19073, 0.1) == pytest.approx(1.5e-4)
    assert gpt2.lr_at(149, 1.5e-3, 300, 19073, 0.1) == pytest.approx(1.5e-3 * 150 / 300)
    data = make_shards(tmp_path / "data")
    hs = tmp_path / "hs.jsonl"
    hs.write_text("".join(json.dumps({"ctx": f"Example {i}:", "endings": ["a b", "c", "d e f", "g"], "label": i % 4})
                          + "\n" for i in range(6)))
    out = tmp_path / "out"
    tg.main(["--preset", "gpt2-10b", "--model", "tiny", "--n-layer", "2", "--n-head", "2", "--n-embd", "32",
             "--device", "cpu", "--no-compile", "--data", data, "--seq-len", "32", "--batch-size", "2",
             "--total-batch-size", "128", "--max-steps", "4", "--warmup-steps", "1", "--eval-interval", "2",
             "--eval-tokens", "128", "--hellaswag-interval", "2", "--hellaswag-file", str(hs),
             "--checkpoint-interval", "2", "--sample-tokens", "0", "--out-dir", str(out)])
    rows = metrics(out)
    evals = [(r["step"], sorted(k for k in r if k in ("val_loss", "hellaswag"))) for r in rows if "val_loss" in r]
    assert evals == [(0, ["hellaswag", "val_loss"]), (2, ["hellaswag", "val_loss"]), (4, ["hellaswag", "val_loss"])]
    assert all(np.isfinite(r["train_loss"]) for r in rows if "train_loss" in r)
    ckpt = gpt2.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["step"] == 4 and ckpt["config"]["n_layer"] == 2
    # GPT-2's tokenizer by default, recorded; the vocabulary is its 50,257 ids rounded up to a multiple of 64
    assert ckpt["config"]["vocab_size"] == 50304 and "\nmerges 50000\n" in ckpt["tokenizer"]


def test_tokenizer_sets_the_vocabulary_and_travels_with_the_checkpoint(tmp_path, capsys):
    text = tmp_path / "book.txt"
    text.write_text("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer\n" * 60)
    tok = bpe.Tokenizer().train(text.read_text(), 300, special_tokens=["<|endoftext|>"])
    tok.save(tmp_path / "tok.bpe")
    for spec, n_vocab in (("bytes", 320), (str(tmp_path / "tok.bpe"), 320)):  # 257 and 300 ids
        args = tg.parse_args(["--tokenizer", spec])
        assert tg.model_config(args, None, tg.load_tokenizer(spec)).vocab_size == n_vocab
    common = [*SMALL, "--data", text, "--seq-len", 16, "--batch-size", 4, "--total-batch-size", 64,
              "--max-steps", 3, "--eval-interval", 2, "--sample-tokens", 8, "--prompt", "To be",
              "--out-dir", tmp_path / "out"]
    tg.main([*map(str, common), "--tokenizer", str(tmp_path / "tok.bpe"), "--stop-after", "2"])
    assert "\nTo be" in capsys.readouterr().out  # the samples decode with this tokenizer
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)  # the tokenizer is plain text
    assert ckpt["config"]["vocab_size"] == 320
    line = "whether 'tis nobler, or not? <|endoftext|> To be"
    assert bpe.Tokenizer.loads(ckpt["tokenizer"]).encode(line, allowed_special="all") == \
        tok.encode(line, allowed_special="all")
    # --resume without --tokenizer uses the recorded one (the same shards: else "the training data changed")
    tg.main([*map(str, common), "--resume"])
    assert gpt2.load_checkpoint(str(tmp_path / "out" / "ckpt.pt"))["step"] == 3
    for start in (["--resume"], ["--init", tmp_path / "out" / "ckpt.pt", "--out-dir", tmp_path / "init"]):
        msg = error_of([*common, *start, "--tokenizer", "bytes"])
        assert "was trained with another tokenizer (300 ids)" in msg and "drop --tokenizer" in msg


def test_task_preset_trains_the_pipelines_base_on_the_generated_task_in_bytes(tmp_path):
    args = tg.parse_args(["--preset", "task"])
    assert (args.data, args.tokenizer, args.pos_emb, args.out_dir) == ("task", "bytes", "rope", "out/task-base")
    train, _ = tg.resolve_data("task", 0, tg.load_tokenizer("bytes"))
    pretrain = bpe.task_files()["pretrain"].read_text(encoding="utf-8")
    assert bpe.byte_tokenizer().decode(tg.read_shard(train[0])[:200].tolist()) == pretrain[:200]  # the task's text
    tg.main(["--preset", "task", "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--seq-len", "32",
             "--batch-size", "4", "--total-batch-size", "128", "--max-steps", "2", "--eval-interval", "0",
             "--sample-tokens", "0", "--out-dir", str(tmp_path / "base")])
    ckpt = torch.load(tmp_path / "base" / "ckpt.pt", weights_only=True)
    assert ckpt["tokenizer"] == bpe.byte_tokenizer().dumps()  # what sft.py rebuilds its tokenizer from
    assert (ckpt["config"]["vocab_size"], ckpt["config"]["pos_emb"]) == (320, "rope")
    columns = tg.parse_args(["--preset", "task-columns"])  # the same model on the answers worked in columns
    assert {k: v for k, v in vars(columns).items() if k not in ("preset", "data", "out_dir")} == {
        k: v for k, v in vars(args).items() if k not in ("preset", "data", "out_dir")}
    assert (columns.data, columns.out_dir) == ("task-columns", "out/task-columns-base")
    train, _ = tg.resolve_data("task-columns", 0, tg.load_tokenizer("bytes"))
    pretrain = bpe.task_files(worked="columns")["pretrain"].read_text(encoding="utf-8")
    assert bpe.byte_tokenizer().decode(tg.read_shard(train[0])[:200].tolist()) == pretrain[:200]
    assert ", so " in pretrain[:200]


@pytest.mark.skipif(not os.environ.get("LLM_SCRATCH_SLOW"), reason="the full default run takes ~10+ minutes "
                    "on a 2-core CPU; set LLM_SCRATCH_SLOW=1 (README reports a measured run)")
def test_default_run_beats_unigram_entropy(tmp_path):
    tg.main(["--rope", "--out-dir", str(tmp_path / "out")])
    train, _ = tg.resolve_data("shakespeare", 0)
    entropy = tg.unigram_entropy([tg.read_shard(f) for f in train])
    final = [r["val_loss"] for r in metrics(tmp_path / "out") if "val_loss" in r][-1]
    assert final < entropy - 1.0, (final, entropy)


# -----------------------------------------------------------------------------
# bad input: a clear error before any work


def test_tokenizing_removes_only_its_own_stale_shards(tmp_path):
    """Two runs (or two nodes on one file system) may tokenize one text at once: a process removes the shards of
    an older version of the input, never files another process is writing (it deleted every .bin it saw)."""
    text = tmp_path / "book.txt"
    text.write_text("hello world. " * 300)
    tok = bpe.byte_tokenizer()
    (train,), (val,) = tg.tokenize_text(str(text), tok)
    folder = os.path.dirname(train)
    others = [os.path.join(folder, "raw_0.bin"), os.path.join(folder, "tmp_other", "raw_0.bin"), train + ".tmp999"]
    os.makedirs(os.path.join(folder, "tmp_other"))
    for path in others:  # another process's scratch files and a shard it is writing
        open(path, "wb").close()
    text.write_text("hello there, world. " * 300)  # edited: tokenized again, the old shards removed
    (train2,), (val2,) = tg.tokenize_text(str(text), tok)
    assert train2 != train and not os.path.exists(train) and not os.path.exists(val)
    assert all(os.path.exists(p) for p in others)
    assert sorted(f for f in os.listdir(folder) if f.startswith("tmp_")) == ["tmp_other"]  # its own scratch: gone
    assert len(tg.read_shard(train2)) + len(tg.read_shard(val2)) == len(text.read_text()) + 1  # + end-of-text


def test_empty_prompt_samples_from_the_start_of_a_document():
    torch.manual_seed(0)
    model = gpt2.GPT(gpt2.GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=320))
    tok = bpe.byte_tokenizer()
    text = tg.sample(model, tok, "", 5, "cpu", 0)  # --prompt "": a RuntimeError from the empty prompt
    first = tg.sample(model, tok, "<|endoftext|>", 5, "cpu", 0)  # the same as starting after an end-of-text
    assert text == first[len("<|endoftext|>"):] and text


def test_resume_names_the_architecture_flags_it_does_not_use(tmp_path, capsys):
    common = ["--data", make_shards(tmp_path / "data"), "--seq-len", 16, "--batch-size", 4, "--total-batch-size", 64,
              "--max-steps", 2, "--eval-interval", 0, "--out-dir", tmp_path / "o"]
    run(*common, "--stop-after", 1)
    capsys.readouterr()
    run(*common, "--resume", "--n-layer", 3, "--dropout", 0.3)  # the checkpoint fixes the model
    out = capsys.readouterr().out
    assert "the checkpoint fixes the model; not used: " in out
    assert "--n-layer 3 (the checkpoint's: 2)" in out and "--dropout 0.3 (the checkpoint's: 0.0)" in out
    assert gpt2.load_checkpoint(str(tmp_path / "o" / "ckpt.pt"))["config"]["n_layer"] == 2
    tg.main([*map(str, common), "--device", "cpu", "--dtype", "float32", "--init", str(tmp_path / "o" / "ckpt.pt"),
             "--model", "gpt2", "--out-dir", str(tmp_path / "o2")])
    assert "--model gpt2: not used; the --init weights fix the model (2 layers" in capsys.readouterr().out


def error_of(argv, capsys=None):
    with pytest.raises(SystemExit) as e:
        tg.main([*map(str, argv)])
    return str(e.value.code) + (capsys.readouterr().err if capsys else "")


def test_resume_keeps_the_runs_dtype(tmp_path):
    """A bf16 run resumed without --dtype goes on in bf16 (it went on in the default, float32: another run)."""
    data = make_shards(tmp_path / "data")
    common = [a for a in TINY if a not in ("--dtype", "float32")] + [
        "--data", str(data), "--seq-len", "16", "--batch-size", "4", "--total-batch-size", "128", "--max-steps", "6",
        "--eval-interval", "3"]
    tg.main([*common, "--dtype", "bfloat16", "--out-dir", str(tmp_path / "straight")])
    tg.main([*common, "--dtype", "bfloat16", "--out-dir", str(tmp_path / "split"), "--stop-after", "3"])
    tg.main([*common, "--out-dir", str(tmp_path / "split"), "--resume"])
    assert len(train_losses(tmp_path / "split")) == 6
    assert train_losses(tmp_path / "split") == train_losses(tmp_path / "straight")


def test_bad_input_errors(tmp_path, monkeypatch, capsys):
    data = make_shards(tmp_path / "data")
    base = [*TINY, "--data", data, "--out-dir", tmp_path / "out"]
    (tmp_path / "empty.txt").write_text("")
    assert "empty.txt: no text to train on (empty)" in error_of([*base, "--data", tmp_path / "empty.txt"])
    msg = error_of([*base, "--seq-len", 16, "--block-size", 32, "--batch-size", 4, "--total-batch-size", 64,
                    "--sample-tokens", 5, "--prompt", "x" * 40])  # crashed at the first sample (the cache is full)
    assert "--prompt is 40 tokens, the model's context 32: shorten it" in msg
    msg = error_of([*base, "--seq-len", 16, "--batch-size", 3, "--total-batch-size", 100])
    assert "--total-batch-size 100 is not a multiple" in msg and "48" in msg
    msg = error_of([*base, "--seq-len", 512, "--block-size", 256, "--batch-size", 1, "--total-batch-size", 512])
    assert "longer than the model's context" in msg
    msg = error_of([*base, "--resume"])
    assert "no checkpoint at" in msg and "ckpt.pt" in msg
    msg = error_of([*base, "--seq-len", 16, "--batch-size", 4, "--total-batch-size", 64, "--eval-tokens", 8])
    assert "--eval-tokens 8 gives some of the 1 process(es) no validation window" in msg  # was a silent NaN
    msg = error_of([*base, "--data", tmp_path / "missing"])
    assert "no such file or folder" in msg and "fineweb-edu-10b" in msg and "shakespeare, task," in msg
    assert "invalid choice" in error_of([*base, "--model", "gpt5"], capsys)
    msg = error_of([*base, "--init", "gpt7"])
    assert "--init 'gpt7'" in msg
    msg = error_of([*base, "--seq-len", 16, "--batch-size", 4, "--total-batch-size", 16 * 4 * 100])
    assert "lower --total-batch-size" in msg  # a step larger than the whole data set
    assert "no such file" in error_of([*base, "--tokenizer", tmp_path / "missing.bpe"])
    msg = error_of([*base, "--vocab-size", 200])
    assert "vocab_size 200 is below the tokenizer's 257 ids" in msg
    msg = error_of([*base, "--vocab-size", 320])  # the toy shards hold ids up to 511
    assert "holds token id 5" in msg and "--tokenizer" in msg
    assert "--lr must be above 0, got -0.001" in error_of([*base, "--lr", -1e-3])  # was torch's traceback
    assert "--grad-clip must be >= 0 (0 = off), got -1.0" in error_of([*base, "--grad-clip", -1])  # reversed grads
    assert "--eval-interval must be >= 0" in error_of([*base, "--eval-interval", -1])  # evaluated every step
    assert "--min-lr-ratio must be >= 0" in error_of([*base, "--min-lr-ratio", -1])  # a negative lr: ascent
    assert "--min-lr-ratio must be at most 1" in error_of([*base, "--min-lr-ratio", 3])  # climbed to 3x the peak
    shard = os.path.join(data, sorted(os.listdir(data))[0])
    assert "one token shard; give the folder" in error_of([*base, "--data", shard])  # was read as text (not UTF-8)
    torch.manual_seed(0)
    gpt2.GPT(gpt2.GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=320, pos_emb="rope",
                            norm="rmsnorm", mlp="swiglu", bias=False)).save_pretrained(str(tmp_path / "llama"))
    plain = ["--device", "cpu", "--dtype", "float32", "--data", data, "--out-dir", tmp_path / "out"]
    assert "a llama model; train_gpt2.py continues GPT-2 weights" in error_of([*plain, "--init", tmp_path / "llama"])
    gpt2.GPT(gpt2.GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=320)).save_pretrained(
        str(tmp_path / "g"))
    msg = error_of([*plain, "--init", tmp_path / "g"])  # a GPT-2 folder is read with GPT-2's 50,257 ids
    assert "vocab_size 320 is below the tokenizer's 50257 ids" in msg  # was checked against 50,257 rows
    assert "--stop-after must be a step >= 1, got 0" in error_of([*base, "--stop-after", 0])  # ran to the end
    assert "dropout must lie in [0, 1), got 2.0" in error_of([*base, "--dropout", 2])  # was torch's traceback
    torch.save({"model": {}, "config": {"stage": "full", "batch_size": 4}}, tmp_path / "char.pt")
    assert "not a gpt2.py model checkpoint" in error_of([*base, "--init", tmp_path / "char.pt"])  # a TypeError
    gpt2.save_checkpoint(str(tmp_path / "other" / "ckpt.pt"), gpt2.GPT(gpt2.GPTConfig.from_preset(
        "tiny", n_layer=2, n_head=2, n_embd=32, vocab_size=512)), args={})  # another script's run: a KeyError
    msg = error_of([*base, "--out-dir", tmp_path / "other", "--resume"])
    assert "was not written by train_gpt2.py" in msg and "--init" in msg
    gpt2.save_checkpoint(str(tmp_path / "moe" / "ckpt.pt"), gpt2.GPT(gpt2.GPTConfig.from_preset(
        "tiny", n_layer=2, n_head=2, n_embd=32, vocab_size=65)), moe=None, vocab=["a"] * 65, args={})  # moe.py's
    for how in (["--init", tmp_path / "moe" / "ckpt.pt"], ["--out-dir", tmp_path / "moe", "--resume"]):
        msg = error_of([*plain, *how])  # --init said "raise --vocab-size": the model holds characters, not BPE
        assert "was written by moe.py (a character-level model" in msg and "go on with it in moe.py" in msg
    assert not os.path.exists(tmp_path / "out" / "ckpt.pt")


def test_grad_clip_0_is_off_not_a_zero_gradient(tmp_path):
    data = make_shards(tmp_path / "data")
    common = ["--data", data, "--seq-len", 16, "--batch-size", 4, "--total-batch-size", 64, "--max-steps", 2,
              "--eval-interval", 0, "--weight-decay", 0]
    run(*common, "--out-dir", tmp_path / "off", "--grad-clip", 0)
    run(*common, "--out-dir", tmp_path / "huge", "--grad-clip", 1e9)  # the norm is far below: no clipping either
    off, huge = (gpt2.load_checkpoint(str(tmp_path / d / "ckpt.pt"))["model"] for d in ("off", "huge"))
    assert all(torch.equal(off[k], huge[k]) for k in off)  # clipping to 0 left the weights as they started


def test_no_network_names_url_and_destination(tmp_path, offline):
    msg = error_of([*TINY, "--data", "fineweb-edu-10b", "--out-dir", tmp_path / "out"])
    assert "https://huggingface.co/datasets/" in msg and "edu_fineweb_train_000001.bin" in msg
    assert str(offline) in msg  # where to put the file by hand
    data = make_shards(tmp_path / "data")
    msg = error_of([*TINY, "--data", data, "--hellaswag-interval", 1, "--out-dir", tmp_path / "out"])
    assert tg.HELLASWAG_URL in msg and "hellaswag_val.jsonl" in msg
    msg = error_of(["--init", "gpt2", "--data", data, "--device", "cpu", "--no-compile", "--out-dir",
                    tmp_path / "out"])  # OpenAI's weights
    assert msg.startswith("train_gpt2.py: error: could not download https://huggingface.co/openai-community/gpt2/")
    assert "model.safetensors" in msg and str(offline) in msg
