"""Tests of classify.py: offline, CPU, small models, a few seconds each.

The classifier reads the last real token (padding side and batch companions do not change its logits; with the
same weights it gives transformers' GPT2ForSequenceClassification's logits), frozen weights stay bit-identical,
the split is deterministic / stratified / disjoint, labels map both ways, bad input fails with a clear error,
resume is exact, and the model learns a task that needs the whole text. The BPE tokenizer learns from the
training texts only; --lm-unlabeled's texts hold no copy of a val or test text.
"""

import io
import itertools
import json
import argparse
import os
import re
import types
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bpe
import classify
from gpt2 import GPT, GPTConfig, load_checkpoint, save_checkpoint
from test_modern import qwen_dir, qwen_json  # noqa: F401  (fixtures: a random Qwen2 HF folder + tokenizer.json)

BYTES = bpe.Tokenizer("gpt2", special_tokens={bpe.ENDOFTEXT: 256})  # 257 ids: models stay tiny


def tiny_gpt(pos_emb="learned", vocab_size=320, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=vocab_size, pos_emb=pos_emb))


@pytest.fixture
def lm_ckpt(tmp_path):
    """A tiny language model as train_gpt2.py would write it, recording the byte tokenizer."""
    path = str(tmp_path / "lm.pt")
    save_checkpoint(path, tiny_gpt(), tokenizer=BYTES.dumps(), step=0)
    return path


def write_task(path, n=200, seed=0, yes_every=2):
    """label<TAB>text rows: 'yes' when the word 'free' occurs anywhere in six random words (every
    yes_every-th row). Reading the first position (or any fixed one) cannot solve it; the last token sees the
    whole text."""
    rng = np.random.default_rng(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "up", "hill"]
    lines = []
    for i in range(n):
        text = list(rng.choice(words, 6))
        yes = i % yes_every == 1
        if yes:
            text[rng.integers(6)] = "free"
        lines.append(f"{'yes' if yes else 'no'}\t{' '.join(text)}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def run(tmp_path, *flags, data=None, out="out"):
    data = data or write_task(tmp_path / "task.tsv")
    classify.main(["--data", data, "--out-dir", str(tmp_path / out), "--device", "cpu", "--split", "full",
                   "--batch-size", "16", *flags])
    return str(tmp_path / out)


# -- the classifier reads the last real token ----------------------------------------------------------


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_logits_independent_of_padding_side_and_batch(pos_emb):
    model = classify.add_class_head(tiny_gpt(pos_emb), 3).eval()
    seqs = [[5, 9, 2], [7, 1, 4, 4, 8, 3, 9, 12, 40], [11], [3, 3, 3, 3, 3]]
    alone = torch.cat([classify.class_logits(model, *classify.collate([s])) for s in seqs])
    for side in ("right", "left"):
        idx, mask, last = classify.collate(seqs, pad_id=99, side=side)
        torch.testing.assert_close(classify.class_logits(model, idx, mask, last), alone, atol=1e-5, rtol=1e-5)
    # the trap the reader must avoid: with right padding, the last *position* of a short row is padding
    idx, mask, _ = classify.collate(seqs, side="right")
    at_end = classify.class_logits(model, idx, mask, torch.full((4,), idx.size(1) - 1))
    assert not torch.allclose(at_end[0], alone[0], atol=1e-3)


def test_collate_last_index_and_mask():
    idx, mask, last = classify.collate([[5, 6, 7], [8]], pad_id=0)
    assert idx.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert last.tolist() == [2, 0]
    idx, mask, last = classify.collate([[5, 6, 7], [8]], pad_id=0, side="left")
    assert idx.tolist() == [[5, 6, 7], [0, 0, 8]] and last.tolist() == [2, 2]


def test_encode_appends_eot_and_truncates():
    tok = bpe.load_gpt2()
    assert classify.encode(tok, "hello world", 256) == [31373, 995, 50256]
    assert classify.encode(tok, "hello world", 256, eot=False) == [31373, 995]
    assert classify.encode(tok, "hello world again", 2) == [31373, 50256]  # the end token survives the cut



def test_lm_loss_is_the_language_models_loss_over_its_vocab():
    """--lm-weight's loss equals the tied language model's own next-token loss (padding ignored), and with a
    vocabulary subset, the cross-entropy of the logits restricted to it."""
    model = tiny_gpt().eval()  # the tied LM head: logits = hidden @ wte.T
    hidden = {}
    model.transformer.ln_f.register_forward_hook(lambda module, inputs, out: hidden.update(h=out))
    idx, mask, _ = classify.collate([[5, 9, 2, 7, 7, 30], [11, 3, 9]], pad_id=99)
    logits, _ = model(idx, attention_mask=mask)  # (2, 6, 320)
    targets = idx[:, 1:].masked_fill(mask[:, 1:] == 0, -1)
    want = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-1)
    got = classify.lm_loss(model, hidden["h"], idx, mask, torch.arange(320))
    torch.testing.assert_close(got, want)
    vocab = torch.tensor([2, 3, 5, 7, 9, 11, 30, 99])
    sub = logits[:, :-1][..., vocab]
    want = F.cross_entropy(sub.flatten(0, 1), torch.searchsorted(vocab, idx[:, 1:].contiguous()).masked_fill(
        mask[:, 1:] == 0, -1).flatten(), ignore_index=-1)
    torch.testing.assert_close(classify.lm_loss(model, hidden["h"], idx, mask, vocab), want)
    assert not torch.allclose(want, got)  # the subset's softmax really is a different one


def test_lm_loss_of_an_untied_model_reads_its_own_head():
    """An untied language model (train_gpt2.py --untied) keeps its output head beside the class head, and
    --lm-weight's loss is that model's own next-token loss (through the token embedding it was chance)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=320, tie_weights=False)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # an output head far from the embedding, as after training
    idx, mask, _ = classify.collate([[5, 9, 2, 7, 7, 30], [11, 3, 9]], pad_id=99)
    logits, _ = model(idx, attention_mask=mask)
    want = F.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].masked_fill(mask[:, 1:] == 0, -1).flatten(),
                           ignore_index=-1)
    classify.add_class_head(model, 2)
    hidden = {}
    model.transformer.ln_f.register_forward_hook(lambda module, inputs, out: hidden.update(h=out))
    model(idx, attention_mask=mask)
    torch.testing.assert_close(classify.lm_loss(model, hidden["h"], idx, mask, torch.arange(320)), want)
    tied = classify.add_class_head(tiny_gpt(), 2)
    assert not hasattr(tied, "lm_out") and tied.lm_head.weight.shape == (2, 32)  # a tied model has only the embedding

def test_make_tokenizer_kinds():
    assert classify.make_tokenizer("gpt2").n_vocab == 50257
    assert classify.make_tokenizer("bytes").encode_ordinary("09061") == [48, 57, 48, 54, 49]
    texts = ["call 09061701461 now", "call me later", "URGENT call 09061701461"] * 5
    tok = classify.make_tokenizer("bpe", texts, 280)
    assert tok.n_vocab == 280 and tok.eot_token == 279
    assert len(tok.encode_ordinary(" call")) == 1 and len(tok.encode_ordinary(" 09061701461")) == 1
    assert len(tok.encode_ordinary(" hello")) > 1  # not in its training texts: no merges learned for it
    assert tok.decode(tok.encode_ordinary("WIN £100 now")) == "WIN £100 now"
    with pytest.raises(ValueError, match="unknown --tokenizer 'words'"):
        classify.make_tokenizer("words")
    with pytest.raises(ValueError, match="--vocab-size 257"):
        classify.make_tokenizer("bpe", texts, 257)


def test_bpe_tokenizer_learns_from_the_training_split_only(tmp_path, monkeypatch, capsys):
    seen = []
    make = classify.make_tokenizer
    monkeypatch.setattr(classify, "make_tokenizer", lambda kind, texts=(), vocab_size=1024: seen.append(
        list(texts)) or make(kind, texts, vocab_size))
    out = run(tmp_path, "--tokenizer", "bpe", "--vocab-size", "280", "--n-layer", "1", "--n-head", "2",
              "--n-embd", "32", "--max-steps", "2")
    rows = classify.read_examples(str(tmp_path / "task.tsv"))
    train = [rows[i][0] for i in classify.split_examples(rows, 123, balanced=False)["train"]]
    assert seen == [train]
    ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert bpe.Tokenizer.loads(ckpt["tokenizer"]).n_vocab == 280
    assert ckpt["model"]["transformer.wte.weight"].shape == (320, 32)  # 280 rounded up to a multiple of 64
    capsys.readouterr()
    classify.main(["--out-dir", out, "--device", "cpu", "--predict", "the dog ran free"])  # its own tokenizer
    assert capsys.readouterr().out.split()[0] in ("yes", "no")


def test_unlabeled_rows_leave_out_the_splits_and_copies_of_val_and_test():
    rows = toy_examples()  # 106 "a", 45 "b": balanced leaves 61 "a" rows out
    s = classify.split_examples(rows, seed=7, balanced=True)
    rows += [(rows[s["val"][0]][0], "a"), (rows[s["test"][0]][0], "b"), (rows[s["train"][0]][0], "a"), ("new", "a")]
    unl = classify.unlabeled_rows(rows, s)
    assert not set(unl) & {i for v in s.values() for i in v}
    held_out = {rows[i][0] for i in s["val"] + s["test"]}
    assert not {rows[i][0] for i in unl} & held_out
    assert len(rows) - 4 not in unl and len(rows) - 3 not in unl  # copies of a val and a test text
    assert len(rows) - 2 in unl and len(rows) - 1 in unl  # a copy of a train text and a new text are fine
    used = set(s["train"] + s["val"] + s["test"])
    assert set(unl) >= {i for i in range(len(rows)) if i not in used and rows[i][0] not in held_out}  # none lost


def test_lm_unlabeled_changes_training_and_needs_lm_weight(tmp_path, lm_ckpt, capsys, monkeypatch):
    """The unlabeled texts change training; they come in passes (each of the 66 once in ceil(66 / 16) = 5
    steps, then a new pass, whatever the epoch); and the next-token loss's vocabulary holds their tokens too,
    even those the training texts never use (searchsorted would map such a token to another id, silently)."""
    data = write_task(tmp_path / "task.tsv", yes_every=3)
    rows = classify.read_examples(data)
    unl = set(classify.unlabeled_rows(rows, classify.split_examples(rows, 123, balanced=True)))
    with open(data, "w") as f:  # texts outside the split do not move it; "z" is in no word of write_task
        f.writelines(f"{label}\t{text}{' zz' if i in unl else ''}\n" for i, (text, label) in enumerate(rows))
    steps = []  # per step: the unlabeled texts of the batch (those with a "z"), its token ids, the loss's vocab
    lm_loss = classify.lm_loss

    def spy(model, h, idx, mask, vocab):
        texts = [bytes(t for t in r[m == 1].tolist() if t < 256).decode() for r, m in zip(idx, mask)]
        steps.append(([t for t in texts if "z" in t], set(idx[mask == 1].tolist()), set(vocab.tolist())))
        return lm_loss(model, h, idx, mask, vocab)
    monkeypatch.setattr(classify, "lm_loss", spy)
    flags = ["--init", lm_ckpt, "--split", "balanced", "--lm-weight", "0.5", "--max-steps", "6", "--lr", "1e-2"]
    a = run(tmp_path, *flags, data=data, out="a")  # 92 training texts: an epoch is 6 steps of 16
    assert len(steps) == 6 and not any(texts for texts, _, _ in steps)
    b = run(tmp_path, *flags, "--lm-unlabeled", data=data, out="b")
    assert "66 unlabeled texts" in capsys.readouterr().out
    first_pass = [t for texts, _, _ in steps[6:11] for t in texts]
    assert sorted(first_pass) == sorted(rows[i][0] + " zz" for i in unl) and len(steps[11][0]) == 16
    assert all(ids <= vocab for _, ids, vocab in steps[6:])
    wa, wb = (load_checkpoint(os.path.join(o, "ckpt.pt"))["model"] for o in (a, b))
    assert not torch.equal(wa["transformer.h.1.mlp.c_fc.weight"], wb["transformer.h.1.mlp.c_fc.weight"])
    with pytest.raises(ValueError, match="--lm-unlabeled adds to the next-token loss"):
        run(tmp_path, "--init", lm_ckpt, "--lm-unlabeled", "--lm-weight", "0", data=data, out="c")
    with pytest.raises(ValueError, match="--tokenizer bpe is for --init scratch"):
        run(tmp_path, "--init", lm_ckpt, "--tokenizer", "bpe", data=data, out="c")
    for n, eot in ((-1, []), (1, []), (0, ["--no-eot"])):  # -1 cut the end of every text, 1 left only the eot
        with pytest.raises(ValueError, match=f"--max-len {n} leaves no token of the text"):
            run(tmp_path, "--init", lm_ckpt, "--max-len", str(n), *eot, data=data, out="c")


# -- which weights learn -------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, learns", [
    (["--train", "last-block"], ("transformer.h.1.", "transformer.ln_f.")),
    (["--train", "head"], ()),
    (["--lora", "4"], (".lora_A", ".lora_B")),
])
def test_frozen_weights_stay_bit_identical(tmp_path, lm_ckpt, flags, learns):
    out = run(tmp_path, "--init", lm_ckpt, *flags, "--max-steps", "3", "--lr", "1e-2")
    ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
    before, after = load_checkpoint(lm_ckpt)["model"], ckpt["model"]
    assert not torch.equal(after["lm_head.weight"], torch.zeros_like(after["lm_head.weight"]))
    start, _ = classify.build_model(argparse.Namespace(**ckpt["args"]), 2)  # the run's seeded initial head
    assert not torch.equal(after["lm_head.weight"], start.lm_head.weight), "the new head should have learned"
    for name, w in after.items():
        if name == "lm_head.weight":
            continue
        if any(part in name for part in learns):
            if w.dim() == 2:
                assert not torch.equal(w, before.get(name, torch.zeros_like(w))), f"{name} should have learned"
        else:
            assert torch.equal(w, before[name]), f"{name} is frozen but changed"
    if "--lora" in flags:
        assert any(".lora_B" in name for name in after)


def test_lr_zero_means_no_update_and_bad_lengths_are_refused(tmp_path, lm_ckpt):
    """--lr 0 trains nothing (every weight stays as initialized) instead of falling back to the default lr; a
    negative lr and a run of no epochs or steps are refused."""
    out = run(tmp_path, "--init", lm_ckpt, "--train", "all", "--max-steps", "2", "--lr", "0", out="lr0")
    ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
    start, _ = classify.build_model(argparse.Namespace(**ckpt["args"]), 2)
    for name, w in start.state_dict().items():
        assert torch.equal(ckpt["model"][name], w), f"{name} changed at --lr 0"
    for flag, value in (("--lr", "-1"), ("--epochs", "0"), ("--epochs", "-1"), ("--max-steps", "0"),
                        ("--max-steps", "-1")):
        with pytest.raises(ValueError, match="give --lr >= 0 and at least one epoch or step"):
            run(tmp_path, "--init", lm_ckpt, flag, value, out="bad")


def test_grad_clip_0_is_off_and_bad_numbers_and_files_are_refused(tmp_path, lm_ckpt):
    """--grad-clip 0 trains as an unreachable clip does (clip_grad_norm_ with 0 would zero every gradient); a
    negative clip would turn every step around and is refused."""
    runs = [run(tmp_path, "--init", lm_ckpt, "--max-steps", "2", "--grad-clip", c, out=f"clip{c}") for c in ("0", "1e9")]
    a, b = (load_checkpoint(os.path.join(r, "ckpt.pt"))["model"] for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="--grad-clip -1.0: give a norm > 0, or 0 for no clipping"):
        run(tmp_path, "--init", lm_ckpt, "--grad-clip", "-1", out="bad")
    for flag, value, low in (("--batch-size", "0", 1), ("--warmup-steps", "-5", 0), ("--eval-interval", "-1", 0),
                             ("--split-seed", "-1", 0), ("--stop-after", "0", 1), ("--stop-after", "-1", 1)):
        # a ZeroDivisionError, silent runs, numpy's error; --stop-after 0 ran it all, -1 saved no checkpoint
        with pytest.raises(ValueError, match=f"{flag} {value}: give at least {low}"):
            classify.main(["--init", lm_ckpt, flag, value, "--out-dir", str(tmp_path / "bad"), "--device", "cpu"])
    bad = tmp_path / "latin1.tsv"
    bad.write_bytes("ham\tcaf\xe9 au lait\nspam\tWIN\n".encode("latin-1"))
    for quoting in (False, True):
        with pytest.raises(ValueError, match="latin1.tsv is not UTF-8 text .*iconv"):
            classify.read_examples(str(bad), quoting=quoting)


def test_set_trainable_counts():
    model = classify.add_class_head(tiny_gpt(), 2)
    head = 2 * 32
    block = sum(p.numel() for p in model.transformer.h[1].parameters())
    ln_f = sum(p.numel() for p in model.transformer.ln_f.parameters())
    assert classify.set_trainable(model, "head") == head
    assert classify.set_trainable(model, "last-block") == head + block + ln_f
    assert classify.set_trainable(model, "last-n", 2) == head + 2 * block + ln_f
    assert classify.set_trainable(model, "all") == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="unknown --train"):
        classify.set_trainable(model, "everything")
    for n in (0, 3, -1):  # the model has 2 blocks: a slice from len - n would wrap around silently
        with pytest.raises(ValueError, match=f"--last-n {n}: the model has 2 blocks"):
            classify.set_trainable(model, "last-n", n)


# -- data: split, labels, bad input --------------------------------------------------------------------


def toy_examples():
    rows = [(f"text {i}", "a") for i in range(100)] + [(f"spam {i}", "b") for i in range(40)]
    rows += [("same text", "a")] * 6 + [("same spam", "b")] * 5  # repeated texts, as in the SMS collection
    return rows


@pytest.mark.parametrize("balanced", [True, False])
def test_split_deterministic_stratified_disjoint(balanced):
    rows = toy_examples()
    s = classify.split_examples(rows, seed=7, balanced=balanced)
    assert s == classify.split_examples(rows, seed=7, balanced=balanced)
    assert s != classify.split_examples(rows, seed=8, balanced=balanced)
    ids = [i for v in s.values() for i in v]
    assert len(ids) == len(set(ids)), "a row is in two splits"
    texts = {k: {rows[i][0] for i in v} for k, v in s.items()}
    assert not (texts["train"] & texts["val"] or texts["train"] & texts["test"] or texts["val"] & texts["test"])
    for label, n in (("a", 106), ("b", 45)):
        n = 45 if balanced else n
        counts = {k: sum(rows[i][1] == label for i in v) for k, v in s.items()}
        assert sum(counts.values()) == n
        # shares of 70/10/20 per class, off by at most one group of repeated texts (6 rows)
        assert abs(counts["test"] - 0.2 * n) <= 6 and abs(counts["val"] - 0.1 * n) <= 6
    swapped = [r for r in rows if r[1] == "b"] + [r for r in rows if r[1] == "a"]  # same rows, "b" first
    t = classify.split_examples(swapped, seed=7, balanced=balanced)
    assert all(sorted(swapped[i] for i in t[k]) == sorted(rows[i] for i in s[k]) for k in s)
    if balanced:  # the 45 of 106 "a" rows kept are a seeded draw, not the first ones in the file
        kept = lambda split: {i for v in split.values() for i in v if rows[i][1] == "a"}  # noqa: E731
        assert kept(s) != kept(classify.split_examples(rows, seed=8, balanced=True))


def test_sms_split_sizes():
    rows = classify.read_examples(classify.SMS_PATH)
    assert len(rows) == 5574
    s = classify.split_examples(rows, 123, balanced=True)
    assert {k: len(v) for k, v in s.items()} == {"train": 1044, "val": 148, "test": 302}
    assert sum(rows[i][1] == "spam" for i in s["test"]) == 151


def test_book_split_is_the_books_pandas_split():
    """--split book reproduces the book's pandas code row for row: read_csv, sample(747), concat, sample(frac=1)."""
    import pandas as pd
    rows = classify.read_examples(classify.SMS_PATH, quoting=True)
    s = classify.book_split(rows, 123)
    df = pd.read_csv(classify.SMS_PATH, sep="\t", header=None, names=["Label", "Text"])
    ham = df[df["Label"] == "ham"].sample(747, random_state=123)
    book = pd.concat([ham, df[df["Label"] == "spam"]]).sample(frac=1, random_state=123).reset_index(drop=True)
    assert [rows[i] for k in ("train", "val", "test") for i in s[k]] == list(zip(book["Text"], book["Label"]))
    assert {k: len(v) for k, v in s.items()} == {"train": 1045, "val": 149, "test": 300}
    train = {rows[i][0] for i in s["train"]}  # the leak the stratified split avoids
    assert sum(rows[i][0] in train for i in s["test"]) == 37


def test_book_split_needs_two_classes():
    rows = [(f"t{i}", "abc"[i % 3]) for i in range(30)]
    with pytest.raises(ValueError, match="two-class split; this data has 3 classes"):
        classify.book_split(rows)


def test_main_runs_on_the_book_split(tmp_path, lm_ckpt, capsys):
    data = write_task(tmp_path / "task.tsv", yes_every=3)  # 67 yes, 133 no -> 67 + 67, cut 93 / 13 / 28
    run(tmp_path, "--init", lm_ckpt, "--split", "book", "--max-steps", "2", data=data)
    out = capsys.readouterr().out
    assert "split book: train 93 (" in out and ", test 28 (" in out


def test_read_examples_csv_quoting(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text('ham\t"quoted\ntext" here\nspam\tplain "x"\n')
    with pytest.raises(ValueError, match=":2: no tab"):  # line by line, the quoted newline splits the row
        classify.read_examples(str(path))
    assert classify.read_examples(str(path), quoting=True) == [("quoted\ntext here", "ham"), ('plain "x"', "spam")]
    path.write_text("ham\ta\tb\nspam\tc\n")
    with pytest.raises(ValueError, match="CSV row 1 has 3 fields"):
        classify.read_examples(str(path), quoting=True)
    path.write_text("ham\ta\n\nspam\tc\n\n")  # blank lines: skipped, as by pandas.read_csv and the plain reader
    assert classify.read_examples(str(path), quoting=True) == classify.read_examples(str(path)) == [("a", "ham"),
                                                                                                   ("c", "spam")]


@pytest.mark.parametrize("quoting", [False, True])
def test_read_examples_drops_a_byte_order_mark(tmp_path, quoting):
    """Excel and Notepad start a UTF-8 file with a BOM; read as text, it would stick to the first label."""
    path = tmp_path / "bom.tsv"
    path.write_bytes("ham\thi there\nspam\tWIN now\nham\tok\n".encode("utf-8-sig"))
    assert classify.read_examples(str(path), quoting=quoting) == [("hi there", "ham"), ("WIN now", "spam"),
                                                                  ("ok", "ham")]


def test_label_mapping_round_trip(tmp_path):
    labels = ["spam", "ham", "ham", "spam", "ham"]
    names = sorted(set(labels))
    assert [names[i] for i in classify.label_ids(labels, names)] == labels
    assert classify.label_ids(["ham", "spam"], ["spam", "ham"]) == [1, 0]  # names[i] is class i, sorted or not
    with pytest.raises(ValueError, match=r"unknown label\(s\) \['eggs'\]"):
        classify.label_ids(["ham", "eggs"], names)


def test_read_examples_strips_labels(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("ham \thello\r\n spam\tWIN\r\n")
    assert classify.read_examples(str(path)) == [("hello", "ham"), ("WIN", "spam")]


def test_read_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "hi there", "label": "ham"}\n{"text": "WIN cash", "label": "spam "}\n'
                    '{"text": "ok", "label": 3}\n')
    assert classify.read_examples(str(path)) == [("hi there", "ham"), ("WIN cash", "spam"), ("ok", "3")]
    path.write_text('{"text": "hi there", "label": "ham"}\n{"text": "WIN cash", "label": "  "}\n')
    with pytest.raises(ValueError, match="row 2: empty label"):  # not a class of its own named "  "
        classify.read_examples(str(path))


@pytest.mark.parametrize("content, match", [
    ("ham\thello\nspam\t   \n", r"bad.tsv:2: empty text"),
    ("ham\thello\n\tno label\n", r"bad.tsv:2: empty label"),
    ("ham\thello\nspam no tab\n", r"bad.tsv:2: no tab"),
    ("ham\thello\nham\tagain\n", r"only one label \(ham\)"),
])
def test_bad_input_is_a_clear_error(tmp_path, content, match):
    path = tmp_path / "bad.tsv"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        classify.read_examples(str(path))


def test_missing_file_and_tiny_class(tmp_path):
    with pytest.raises(FileNotFoundError, match="no data file at"):
        classify.read_examples(str(tmp_path / "nope.tsv"))
    rows = [(f"t{i}", "a") for i in range(20)] + [("x", "b"), ("y", "b")]
    with pytest.raises(ValueError, match="class 'b' has 2 examples, too few"):
        classify.split_examples(rows, 0, balanced=False)



def cli_error(monkeypatch, *argv):
    """classify.py run as a command (its __main__ block) -> the error it exits with."""
    import runpy
    import sys
    monkeypatch.setattr(sys, "argv", ["classify.py", *map(str, argv)])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(classify.__file__, run_name="__main__")
    return str(e.value.code)


def test_command_line_errors_are_one_line_not_a_traceback(tmp_path, monkeypatch, offline):
    """Bad flags, --predict before any training and OpenAI's weights without network: the command prints the
    message that names the fix (main() raises it; the __main__ block turns it into the exit message)."""
    assert cli_error(monkeypatch, "--batch-size", 0) == "classify.py: error: --batch-size 0: give at least 1"
    msg = cli_error(monkeypatch, "--predict", "hi", "--out-dir", tmp_path / "none")
    assert msg.startswith("classify.py: error: --predict: no classifier at") and "train one first" in msg
    msg = cli_error(monkeypatch, "--init", "gpt2", "--out-dir", tmp_path / "out")
    assert msg.startswith("classify.py: error: could not download https://huggingface.co/openai-community/gpt2/")
    assert "model.safetensors" in msg and str(offline) in msg

def test_a_tokenizer_without_endoftext_needs_no_eot(tmp_path):
    path = str(tmp_path / "noeot.pt")
    save_checkpoint(path, tiny_gpt(), tokenizer=bpe.Tokenizer("gpt2").dumps(), step=0)  # 256 bytes, no specials
    with pytest.raises(ValueError, match=re.escape("no <|endoftext|> token to append; give --no-eot")):
        run(tmp_path, "--init", path, "--max-steps", "1")
    run(tmp_path, "--init", path, "--max-steps", "1", "--no-eot")


def test_resume_finds_its_data_from_any_folder_and_refuses_an_edited_file(tmp_path, lm_ckpt, monkeypatch):
    """The data file is recorded with its absolute path (a run started with a relative --data resumes from
    any folder) and its sha256: a file edited between the run and its resume would give another split."""
    write_task(tmp_path / "task.tsv")
    monkeypatch.chdir(tmp_path)
    classify.main(["--data", "task.tsv", "--init", lm_ckpt, "--max-steps", "4", "--stop-after", "2", "--device",
                   "cpu", "--split", "full", "--batch-size", "16", "--out-dir", str(tmp_path / "out")])
    monkeypatch.chdir(tmp_path.parent)
    classify.main(["--out-dir", str(tmp_path / "out"), "--resume", "--stop-after", "3"])
    assert load_checkpoint(str(tmp_path / "out" / "ckpt.pt"))["step"] == 3
    data = tmp_path / "task.tsv"  # the run's data file, edited between the run and its resume
    data.write_text(data.read_text().replace("yes\t", "maybe\t", 1))
    with pytest.raises(ValueError, match=r"task.tsv changed since the run in .* started"):
        classify.main(["--out-dir", str(tmp_path / "out"), "--resume"])


def test_init_refuses_a_classifier_and_names_the_unused_flags(tmp_path, lm_ckpt, capsys):
    """--init takes a language model: a classifier's checkpoint is refused with what to do instead (it was a
    state-dict mismatch). --last-n without --train last-n and --lora-alpha without --lora are named as unused."""
    out = run(tmp_path, "--init", lm_ckpt, "--max-steps", "1", "--last-n", "1", "--lora-alpha", "8")
    printed = capsys.readouterr().out
    assert "note: --last-n is used only with --train last-n" in printed
    assert "note: --lora-alpha is used only with --lora R" in printed
    run(tmp_path, "--init", lm_ckpt, "--max-steps", "1", "--train", "last-n", "--last-n", "1", out="b")
    assert "note:" not in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"is a classifier of this file \(classes \['no', 'yes'\]\).*--resume"):
        run(tmp_path, "--init", os.path.join(out, "ckpt.pt"), "--max-steps", "1", out="c")


def test_resume_refuses_another_scripts_run(tmp_path):
    """--resume in the --out-dir of another script's run (here one with sft.py-like settings) is refused, not
    trained on with settings that mean something else."""
    save_checkpoint(str(tmp_path / "ckpt.pt"), tiny_gpt(), tokenizer=BYTES.dumps(), step=3,
                    args={"mask_prompt": True, "lr": 1e-4})
    with pytest.raises(SystemExit, match="was not written by classify.py"):
        classify.main(["--out-dir", str(tmp_path), "--resume"])


def test_download_sms_unzips_the_collection(tmp_path, monkeypatch):
    def fake_download(url, path, **kw):
        assert url == classify.SMS_URL
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("readme", "SMS Spam Collection v.1")
            z.writestr("SMSSpamCollection", "ham\tOk lar...\nspam\tFree entry\n")
        return path
    monkeypatch.setattr(classify, "download", fake_download)
    path = classify.download_sms(str(tmp_path / "sms.tsv"))
    assert classify.read_examples(path) == [("Ok lar...", "ham"), ("Free entry", "spam")]
    assert not os.path.exists(path + ".zip")


# -- metrics and the baseline --------------------------------------------------------------------------


def test_confusion_matrix_and_scores():
    y_true, y_pred = [0, 0, 0, 1, 1, 2], [0, 1, 0, 1, 0, 2]
    cm = classify.confusion_matrix(y_true, y_pred, 3)
    assert cm.tolist() == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]  # row = true class, column = predicted
    s = classify.scores(cm)
    assert s["accuracy"] == pytest.approx(4 / 6)
    assert s["precision"] == pytest.approx([2 / 3, 1 / 2, 1.0])
    assert s["recall"] == pytest.approx([2 / 3, 1 / 2, 1.0])
    p, r = 1 / 2, 1 / 2
    assert s["f1"][1] == pytest.approx(2 * p * r / (p + r))
    s = classify.scores([[5, 0], [3, 0]])  # never predicts class 1: its precision is 0, not NaN
    assert s["precision"] == [5 / 8, 0.0] and s["f1"][1] == 0.0
    assert classify.scores([[9, 1], [3, 7]])["precision"] == pytest.approx([0.75, 7 / 8])


def test_metrics_match_scikit_learn():
    """An asymmetric confusion matrix (precision != recall, unequal supports) against scikit-learn's metrics."""
    from sklearn import metrics
    y_true, y_pred = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2], [0, 0, 1, 2, 1, 1, 0, 2, 2, 1, 2, 0]
    cm = classify.confusion_matrix(y_true, y_pred, 3)
    assert cm.tolist() == metrics.confusion_matrix(y_true, y_pred).tolist()
    assert classify.confusion_matrix([0, 0, 1], [1, 1, 1], 2).tolist() == [[0, 2], [0, 1]]  # row = true class
    s = classify.scores(cm)
    p, r, f1, _ = metrics.precision_recall_fscore_support(y_true, y_pred, zero_division=0)
    assert s["accuracy"] == pytest.approx(metrics.accuracy_score(y_true, y_pred))
    assert s["precision"] == pytest.approx(p.tolist()) and s["recall"] == pytest.approx(r.tolist())
    assert s["f1"] == pytest.approx(f1.tolist())
    assert s["macro_f1"] == pytest.approx(metrics.f1_score(y_true, y_pred, average="macro"))
    assert s["macro_f1"] != pytest.approx(metrics.f1_score(y_true, y_pred, average="weighted"))


def test_class_weights_balance_the_classes():
    w = classify.class_weights([0, 0, 0, 1], 2)
    assert w.tolist() == pytest.approx([4 / 6, 2.0])
    assert (w * torch.tensor([3, 1])).tolist() == pytest.approx([2.0, 2.0])  # each class weighs the same in all


def test_class_weight_balanced_weighs_train_and_val_losses(tmp_path, lm_ckpt):
    """--class-weight balanced: the logged train and val losses are the class-weighted means of the per-text
    losses, sum w[y] * loss / sum w[y] with w[c] = n / (2 * count of c in train). One full-batch step at a
    learning rate of 1e-9 leaves the checkpoint's model (nearly) the one that made both losses."""
    data = write_task(tmp_path / "task.tsv", yes_every=3)
    out = run(tmp_path, "--init", lm_ckpt, "--class-weight", "balanced", "--max-steps", "1", "--batch-size", "1000",
              "--eval-interval", "1", "--dropout", "0", "--lr", "1e-9", data=data)
    logged = classify.MetricsLog.read(out)[0]
    ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
    model, tok = classify.build_model(argparse.Namespace(**ckpt["args"]), 2, ckpt)
    rows = classify.read_examples(data)
    split = classify.split_examples(rows, 123, balanced=False)
    y = {k: torch.tensor([rows[i][1] == "yes" for i in v]).long() for k, v in split.items()}
    w = len(y["train"]) / (2 * torch.bincount(y["train"]).double())
    for k in ("train", "val"):
        seqs = [classify.encode(tok, rows[i][0], 64) for i in split[k]]
        nll = -classify.predict_logits(model, seqs, 64, "cpu", torch.float32).double().log_softmax(-1)[
            torch.arange(len(seqs)), y[k]]
        weighted = float((w[y[k]] * nll).sum() / w[y[k]].sum())
        assert logged[f"{k}_loss"] == pytest.approx(weighted, abs=1e-5), k
        assert abs(weighted - float(nll.mean())) > 1e-3  # the weights make a difference here


def test_baseline_learns_a_separable_task():
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(0, 50, 8)) + ([99] if i % 2 else []) for i in range(200)]
    y = [i % 2 for i in range(200)]
    predict = classify.fit_logistic(seqs[:150], y[:150], 2, l2=1e-4)
    assert np.mean(predict(seqs[150:]) == np.array(y[150:])) == 1.0
    assert predict([[99, 12345], [12345]]).tolist() == predict([[99], []]).tolist()  # unseen tokens count for nothing


def test_bag_of_tokens_is_binary():
    rows, cols = classify.bag_of_tokens([[5, 7, 5], [8], [7]], {5: 0, 7: 1})
    assert sorted(zip(rows.tolist(), cols.tolist())) == [(0, 0), (0, 1), (2, 1)]


def test_logistic_weight_decay_falls_back_to_the_class_prior():
    """Strong weight decay pins the token weights near 0, and the bias alone answers the majority class (1 here);
    with little decay the same data is separable."""
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(0, 50, 8)) + ([99] if i % 3 else []) for i in range(90)]
    y = [int(i % 3 > 0) for i in range(90)]
    assert classify.fit_logistic(seqs[:60], y[:60], 2, l2=1e-4)(seqs[60:]).tolist() == y[60:]
    assert classify.fit_logistic(seqs[:60], y[:60], 2, l2=5.0, lr=0.1)(seqs[60:]).tolist() == [1] * 30


def test_baseline_picks_weight_decay_on_val(monkeypatch):
    """The baseline keeps the weight decay best on val and answers the test set with it, even where another
    one would score better on test. Each fake predictor is right on some splits (a text's first token names its
    split) and wrong on the others."""
    right_on = {1e-3: {"train", "test"}, 1e-4: {"val"}, 1e-5: set()}
    seqs = {k: [[k, c] for c in (0, 1, 1, 0)] for k in ("train", "val", "test")}
    y = {k: [0, 1, 1, 0] for k in seqs}

    def fake_fit(train, y_train, n_classes, l2):
        assert train == seqs["train"] and y_train == y["train"] and n_classes == 2
        return lambda new: np.array([c if k in right_on[l2] else 1 - c for k, c in new])
    monkeypatch.setattr(classify, "fit_logistic", fake_fit)
    assert classify.baseline(seqs, y, 2).tolist() == [1, 0, 0, 1]  # 1e-4's answers: best on val, wrong on test


# -- training: learning, exact resume, predicting ------------------------------------------------------


def test_learns_a_task_that_needs_the_whole_text(tmp_path, lm_ckpt, capsys):
    out = run(tmp_path, "--init", lm_ckpt, "--train", "all", "--lr", "3e-3", "--epochs", "8",
              "--dropout", "0")
    final = classify.MetricsLog.read(out)[-1]
    assert final["test_acc"] >= 0.9, final
    for name in ("metrics.jsonl", "ckpt.pt", "loss.png", "accuracy.png", "confusion.png"):
        assert os.path.exists(os.path.join(out, name)), name
    capsys.readouterr()
    classify.main(["--out-dir", out, "--device", "cpu", "--predict", "the dog ran free up a hill",
                   "--predict", "the cat sat on a mat"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("yes (") and lines[1].startswith("no ("), lines
    for text in ("", "  "):  # an error (with --no-eot it had no token to read: an IndexError)
        with pytest.raises(ValueError, match="--predict: an empty text"):
            classify.main(["--out-dir", out, "--device", "cpu", "--predict", "hi", "--predict", text])


def test_predict_cuts_texts_as_training_did(tmp_path, lm_ckpt, capsys):
    """--predict encodes a text as training and testing did: at most --max-len tokens, not the block size."""
    out = run(tmp_path, "--init", lm_ckpt, "--max-steps", "2", "--max-len", "8")
    text = "the dog ran free up a hill, and then the cat sat on a mat by the door"
    capsys.readouterr()
    classify.main(["--out-dir", out, "--device", "cpu", "--predict", text])
    printed = float(capsys.readouterr().out.split("(")[1].split(")")[0])
    ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
    model, tok = classify.build_model(argparse.Namespace(**{**ckpt["args"], "out_dir": out}), 2, ckpt)
    for n, same in ((8, True), (model.config.block_size, False)):
        seq = classify.encode(tok, text, n, ckpt["args"]["eot"])
        p = float(classify.predict_logits(model, [seq], 1, "cpu", torch.float32).softmax(-1).max())
        assert (abs(printed - p) < 6e-4) == same, (n, printed, p)


@pytest.mark.parametrize("extra", [[], ["--split", "balanced", "--lm-weight", "0.5", "--lm-unlabeled"],
                                   ["--dtype", "bfloat16"]])
def test_resume_is_exact(tmp_path, lm_ckpt, extra, capsys, monkeypatch):
    """A run stopped and resumed (with --resume alone: a bf16 run stays bf16) ends as the uninterrupted one, and
    its `seconds` count the first part too."""
    data = write_task(tmp_path / "task.tsv", yes_every=3)  # 67 yes, 133 no: balanced leaves 66 rows unlabeled
    flags = ["--init", lm_ckpt, "--max-steps", "8", "--eval-interval", "3", *extra]
    full = run(tmp_path, *flags, data=data, out="full")
    with monkeypatch.context() as m:  # the first part's clock reads 1,000 s more at every look
        m.setattr(classify, "time", types.SimpleNamespace(time=itertools.count(0, 1000).__next__))
        run(tmp_path, *flags, "--stop-after", "4", data=data, out="split")
    classify.main(["--out-dir", str(tmp_path / "split"), "--resume"])  # the run's own settings, from its checkpoint
    assert classify.MetricsLog.read(os.path.join(tmp_path, "split"))[-1]["seconds"] >= 1000
    capsys.readouterr()
    # finished: nothing more, no second test row; the --lr it does not use is named
    classify.main(["--out-dir", str(tmp_path / "split"), "--resume", "--lr", "0.5"])
    assert "--resume goes on with the run's own settings; not used: --lr 0.5 (the run's: " in capsys.readouterr().out
    classify.main(["--out-dir", str(tmp_path / "split"), "--resume", "--dtype", "float16"])  # float32's empty scaler
    a, b = load_checkpoint(os.path.join(full, "ckpt.pt")), load_checkpoint(os.path.join(tmp_path, "split", "ckpt.pt"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(classify.MetricsLog.read(full)) == strip(classify.MetricsLog.read(os.path.join(tmp_path, "split")))


def test_init_from_hf_folder_uses_gpt2_tokenizer(tmp_path):
    """--init gpt2 reads OpenAI's weights in the HF layout; a tiny model saved in that layout stands in for them.
    A --max-len above its block size (32) is cut to the block size: texts of more than 32 tokens train and test."""
    torch.manual_seed(0)
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32)).save_pretrained(str(tmp_path / "hf"))
    data = tmp_path / "task.tsv"
    write_task(data)
    data.write_text("".join(line + " and so on" * 10 + "\n" for line in data.read_text().splitlines()))
    out = run(tmp_path, "--init", str(tmp_path / "hf"), "--max-steps", "2", "--max-len", "100", data=str(data))
    ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["labels"] == ["no", "yes"] and bpe.Tokenizer.loads(ckpt["tokenizer"]).n_vocab == 50257
    assert ckpt["model"]["lm_head.weight"].shape == (2, 16)


def test_classify_init_from_a_qwen_directory(tmp_path, qwen_dir, capsys):
    """classify.py --init <HF Qwen directory>: the directory's own tokenizer (it was GPT-2's, whose ids are
    other tokens to Qwen), recorded in the classifier's checkpoint, so --predict encodes as training did."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"{w} number {i}", "label": w}) + "\n"
                            for i in range(40) for w in ("spam", "ham")))
    out = str(tmp_path / "cls")
    classify.main(["--init", str(qwen_dir), "--data", str(data), "--split", "full", "--max-steps", "2",
                   "--batch-size", "4", "--out-dir", out, "--device", "cpu"])
    ckpt = load_checkpoint(f"{out}/ckpt.pt")
    tok = bpe.Tokenizer.loads(ckpt["tokenizer"])
    assert tok.special_tokens["<|im_end|>"] == 1202 and tok.eot_token == tok.special_tokens["<|endoftext|>"] == 1200
    assert tok.encode_ordinary("spam number 3") == bpe.load_hf_tokenizer(qwen_dir).encode_ordinary("spam number 3")
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values())  # fp32 master weights (the hub's: bf16)
    capsys.readouterr()
    classify.main(["--out-dir", out, "--predict", "spam number 7", "--device", "cpu"])
    assert capsys.readouterr().out.endswith("\tspam number 7\n")


def test_gpt2_book_preset_is_the_books_recipe(tmp_path):
    """--preset gpt2-book sets the book's chapter 6 settings; flags given beside it win. Run here on a tiny model
    in GPT-2's HF layout (standing in for the download) and this test's data (too small for the book's split)."""
    a = classify.parse_args(["--preset", "gpt2-book"])
    assert (a.init, a.split, a.train, a.lr, a.epochs, a.batch_size, a.dropout, a.warmup_steps, a.weight_decay) == \
        ("gpt2", "book", "last-block", 5e-5, 5, 8, 0.0, 0, 0.1)
    assert classify.parse_args([]).init == "scratch" and classify.parse_args(["--preset", "gpt2-book", "--lr",
                                                                              "1e-3"]).lr == 1e-3
    torch.manual_seed(0)
    GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=64)).save_pretrained(str(tmp_path / "hf"))
    out = run(tmp_path, "--preset", "gpt2-book", "--init", str(tmp_path / "hf"), "--max-steps", "2")
    args = load_checkpoint(os.path.join(out, "ckpt.pt"))["args"]
    assert (args["preset"], args["train"], args["lr"], args["dropout"], args["warmup_steps"]) == \
        ("gpt2-book", "last-block", 5e-5, 0.0, 0)


def test_compile_flag_compiles_the_training_pass(tmp_path, monkeypatch, counting_compile):
    fake, calls = counting_compile  # stands in for torch.compile
    monkeypatch.setattr(classify, "maybe_compile", fake)
    run(tmp_path, "--max-steps", "2", "--compile")
    assert calls and calls[0] >= 2  # the classifier's forward, every step


def test_class_logits_match_transformers_gpt2_for_sequence_classification(tmp_path):
    """The classifier this file builds from GPT-2 is transformers' GPT2ForSequenceClassification: the same body,
    a bias-free n_embd -> n_classes head, read at the last non-padding token. With the same weights both give
    the same logits on a right-padded batch of texts of different lengths (HF finds the last token from the pad
    id, this file from the attention mask)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257, num_labels=3,
                     pad_token_id=50256)  # GPT-2's vocabulary: the tokenizer an HF GPT-2 folder comes with
    hf = GPT2ForSequenceClassification(cfg).eval()
    lm = GPT2LMHeadModel(cfg)
    lm.transformer.load_state_dict(hf.transformer.state_dict())
    lm.save_pretrained(str(tmp_path / "hf"))  # the body in GPT-2's HF layout, as --init gpt2 downloads it
    args = classify.parse_args(["--init", str(tmp_path / "hf"), "--dropout", "0", "--train", "all"])
    model, _ = classify.build_model(args, 3)
    with torch.no_grad():
        model.lm_head.weight.copy_(hf.score.weight)
    seqs = [torch.randint(0, 50256, (n,)).tolist() for n in (7, 2, 12, 5)]
    idx, mask, last = classify.collate(seqs, pad_id=50256, side="right")
    with torch.no_grad():
        ours = classify.class_logits(model.eval(), idx, mask, last)
        ref = hf(input_ids=idx, attention_mask=mask).logits
    assert ours.shape == (4, 3) and torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()
