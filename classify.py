"""
classify.py: turning a GPT into a text classifier, shown on SMS spam (the UCI SMS Spam Collection).

What it teaches, in the file's order:
  1. Data: `label<TAB>text` lines (the UCI file) or JSON Lines {"text", "label"}; labels <-> class ids; the
     book's balanced split (as many ham as spam, 70/10/20) or the full imbalanced set, both stratified and
     seeded, with every copy of a repeated text in one split (the collection repeats ~400 texts: a copy in
     train and one in test would be a free answer); --split book: the book's own split, exactly, to compare with
     its numbers (not stratified; 37 of its 300 test texts have a copy in train).
  2. The bar to clear: bag-of-tokens logistic regression in numpy, on the same split, with GPT-2's tokens.
  3. The tokenizer of a model from scratch (--tokenizer): a 1,024-token BPE learned on the training texts
     (default), bytes, or GPT-2's 50,257 tokens, most of which 1,044 texts never show it.
     The classifier: the language-model head (n_embd -> vocabulary logits) becomes an n_embd -> n_classes
     head, read at the last *real* token, the only position whose causal attention has seen the whole text.
     With right padding the last position of a row is padding, so every batch carries each row's length.
  4. Which weights learn: --train head | last-block | last-n N | all, or --lora (frozen model + adapters).
  5. Class balance (--class-weight balanced) and the metrics: accuracy, per-class precision, recall and F1,
     the confusion matrix.
  6. The loop (AdamW, warmup + cosine, atomic checkpoints, exact --resume), with GPT-1's auxiliary
     next-token loss on the training texts (--lm-weight: a model from scratch learns some language on the
     way; --lm-unlabeled: also on the texts the split left out), then --predict for one text.

    python classify.py                                  # CPU, offline: a small GPT + BPE from scratch, balanced split
    python classify.py --tokenizer gpt2                 # the same with GPT-2's 50,257 tokens
    python classify.py --split full                     # the imbalanced set (87% ham): report F1, not accuracy
    python classify.py --split book                     # the book's exact split, for its numbers side by side
    python classify.py --preset gpt2-book               # OpenAI's GPT-2 124M: the book's main experiment
    python classify.py --init gpt2 --lora 16            # frozen GPT-2 + rank-16 adapters
    python classify.py --predict "WINNER! Claim your prize: call 09061701461"
    python classify.py --data reviews.jsonl             # any {"text", "label"} JSONL or label<TAB>text file
"""

import argparse
import csv
import hashlib
import io
import math
import os
import time
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import bpe
from gpt2 import (GPT, HF_MODELS, PRESETS, GPTConfig, MetricsLog, add_common_args, add_lora, autocast, download,
                  given_flags, grad_scaler, restore_scaler, load_checkpoint, load_model_state, lr_at, warmup_note,
                  maybe_compile, pick_device, pick_dtype, resume_settings, save_checkpoint, seed_everything,
                  rng_state, set_rng_state, tokenizer_of)

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SMS_PATH = os.path.join(DATA_DIR, "sms_spam_collection.tsv")
SMS_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"  # holds SMSSpamCollection

# -----------------------------------------------------------------------------
# 1. Data


def download_sms(path=SMS_PATH):
    """The UCI zip -> path, a `label<TAB>text` file (the zip's SMSSpamCollection); returns path."""
    zip_path = download(SMS_URL, path + ".zip")
    with zipfile.ZipFile(zip_path) as z, open(path + ".tmp", "wb") as f:
        f.write(z.read("SMSSpamCollection"))
    os.replace(path + ".tmp", path)
    os.remove(zip_path)
    return path


def read_text(path, newline=None):
    """The text of a UTF-8 file, or an error naming the file and the fix. A byte-order mark (Excel and Notepad
    write one) is dropped: it would stick to the first label and make a class of one row."""
    try:
        with open(path, encoding="utf-8-sig", newline=newline) as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}); convert it first, e.g. iconv -f latin1 -t utf-8") from None


def read_examples(path, quoting=False):
    """(text, label) pairs of a data file: rows {"text", "label"} (.jsonl: JSON Lines; .json: one JSON list), else
    `label<TAB>text` lines. Every way a file can be wrong is an error naming the line. quoting: read
    `label<TAB>text` as CSV, as the book's pandas.read_csv(sep="\t") does: a text that starts with a quote runs to
    its closing quote, across lines (5,572 rows of the SMS file's 5,574 lines; for --split book).
    read_examples("data/sms_spam_collection.tsv")[:1] -> [("Go until jurong point, crazy.. ...", "ham")]"""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no data file at {path}; give --data a label<TAB>text or JSONL file "
                                f"(the SMS collection is downloaded when --data is left out)")
    if path.endswith((".jsonl", ".json")):
        rows = [(r["text"], str(r["label"]).strip()) for r in bpe.read_rows(path, "classification")]
        where = [f"{path}: row {i + 1}" for i in range(len(rows))]
    elif quoting:
        fields = list(csv.reader(io.StringIO(read_text(path, newline="")), delimiter="\t"))
        fields = [r for r in fields if r]  # blank lines: skipped, as pandas.read_csv does
        bad = next((i for i, r in enumerate(fields) if len(r) != 2), None)
        if bad is not None:
            raise ValueError(f"{path}: CSV row {bad + 1} has {len(fields[bad])} fields; each row is label<TAB>text")
        rows = [(text, label.strip()) for label, text in fields]
        where = [f"{path}: CSV row {i + 1}" for i in range(len(rows))]
    else:
        rows, where = [], []
        for lineno, line in enumerate(read_text(path).split("\n"), 1):  # \r\n and \r read as \n
            if not line.strip():
                continue
            if "\t" not in line:
                raise ValueError(f"{path}:{lineno}: no tab; each line is label<TAB>text (or use a .jsonl file)")
            label, text = line.split("\t", 1)
            rows.append((text, label.strip()))
            where.append(f"{path}:{lineno}")
    for (text, label), w in zip(rows, where):
        if not text.strip() or not label:
            raise ValueError(f"{w}: empty {'text' if label else 'label'}; every row needs a text and a label")
    labels = sorted({label for _, label in rows})
    if len(labels) < 2:
        raise ValueError(f"{path} has only one label ({labels[0] if labels else 'none'}): a classifier needs "
                         f"examples of at least two classes")
    return rows


def label_ids(labels, names):
    """Class ids of labels, against the class names a classifier was built with (names[i] is class i).
    label_ids(["spam", "ham"], ["ham", "spam"]) -> [1, 0]"""
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise ValueError(f"unknown label(s) {unknown[:5]}: this classifier knows only {names}; train a new "
                         f"one (another --out-dir) for other classes")
    return [index[label] for label in labels]


def rows_by_class(examples):
    """label -> its row indices, in file order.
    rows_by_class([("hi", "ham"), ("WIN", "spam"), ("ok", "ham")]) -> {"ham": [0, 2], "spam": [1]}"""
    by_class = {}
    for i, (_, label) in enumerate(examples):
        by_class.setdefault(label, []).append(i)
    return by_class


def split_examples(examples, seed, balanced=True, fractions=(0.7, 0.1)):
    """Row indices {"train", "val", "test"}: per class (stratified), a seeded shuffle of its distinct texts,
    the first ones to test until it holds its share, then val, the rest train, so that copies of one text
    with one label never land in two splits (a text given two labels, which SMS has none of, is grouped per
    label). balanced: first draw as many rows of every class as the smallest class has
    (the book's 747 ham + 747 spam). Deterministic for a seed, whatever the order of the classes.
    split_examples(rows, 123) -> {"train": [...1044 ids], "val": [...148], "test": [...302]} on SMS"""
    rng = np.random.default_rng(seed)
    by_class = rows_by_class(examples)
    n_min = min(len(v) for v in by_class.values())
    out = {"train": [], "val": [], "test": []}
    for label in sorted(by_class):
        rows = by_class[label]
        if balanced:
            rows = sorted(rng.choice(rows, n_min, replace=False).tolist())
        groups = {}  # text -> its rows, in first-seen order
        for i in rows:
            groups.setdefault(examples[i][0], []).append(i)
        n_train, n_val = int(len(rows) * fractions[0]), int(len(rows) * fractions[1])
        quota = {"test": len(rows) - n_train - n_val, "val": n_val}
        texts = list(groups)
        for j in rng.permutation(len(texts)):
            split = next((s for s in ("test", "val") if quota[s] > 0), "train")
            if split != "train":
                quota[split] -= len(groups[texts[j]])
            out[split] += groups[texts[j]]
        if min(sum(1 for i in out[s] if examples[i][1] == label) for s in out) == 0:
            raise ValueError(f"class {label!r} has {len(rows)} examples, too few for one in each of train, "
                             f"val and test; add examples")
    return {s: sorted(v) for s, v in out.items()}


def book_split(examples, seed=123, fractions=(0.7, 0.1)):
    """Row indices {"train", "val", "test"} of the book's own split (Raschka, chapter 6), reproduced without
    pandas: the larger of two classes undersampled to the smaller's size (pandas' sample(n, random_state=seed)
    is RandomState(seed).permutation(n_large)[:n]), that sample then the smaller class in file order, the
    whole shuffled (sample(frac=1, random_state=seed)) and cut 70/10/20. For comparing with the book's numbers
    on its test set: it is not stratified, and copies of a repeated text land in train and test (37 of its
    300 SMS test texts have a copy in train, 33 of them spam).
    book_split(read_examples(SMS_PATH, quoting=True)) -> {"train": [...1045 ids], "val": [...149], "test": [...300]}"""
    by_class = rows_by_class(examples)
    if len(by_class) != 2:
        raise ValueError(f"--split book is the book's two-class split; this data has {len(by_class)} classes "
                         f"({sorted(by_class)}): use --split balanced or full")
    small, large = sorted(by_class.values(), key=len)  # SMS: 747 spam, 4,825 ham
    rows = [large[j] for j in np.random.RandomState(seed).permutation(len(large))[:len(small)]] + small
    rows = [rows[j] for j in np.random.RandomState(seed).permutation(len(rows))]
    n_train, n_val = int(len(rows) * fractions[0]), int(len(rows) * fractions[1])
    return {"train": rows[:n_train], "val": rows[n_train:n_train + n_val], "test": rows[n_train + n_val:]}


def split_rows(examples, split="balanced", seed=123):
    """--split -> row indices per split: split_examples for balanced / full, book_split for book (whose rows
    are read as the book's pandas reads the file: read_examples(path, quoting=True)).
    split_rows(read_examples(SMS_PATH), "full") -> {"train": [...3900 ids], "val": [...556], "test": [...1118]}"""
    if split == "book":
        return book_split(examples, seed)
    return split_examples(examples, seed, split == "balanced")


def unlabeled_rows(examples, splits):
    """Rows in none of the splits (what --split balanced left out), minus every copy of a val or test text:
    in-domain text whose labels go unused, for --lm-unlabeled's next-token loss (ULMFiT, GPT-1). A copy of a
    val/test text in it would let the model memorize the texts it is measured on.
    unlabeled_rows(rows, split_examples(rows, 123)) -> [0, 1, 3, 7, ...]: 4,033 rows on SMS, all of them ham
    (the balanced split keeps every spam)"""
    used = {i for v in splits.values() for i in v}
    held_out = {examples[i][0] for s in ("val", "test") for i in splits[s]}
    return [i for i, (text, _) in enumerate(examples) if i not in used and text not in held_out]


# -----------------------------------------------------------------------------
# 2. The bar to clear: bag-of-tokens logistic regression (numpy, full-batch gradient descent)


def bag_of_tokens(seqs, vocab):
    """Sparse binary features: (row, column) of every distinct known token of every sequence.
    bag_of_tokens([[5, 7, 5]], {5: 0, 7: 1}) -> (array([0, 0]), array([0, 1]))"""
    pairs = [(r, vocab[t]) for r, seq in enumerate(seqs) for t in set(seq) if t in vocab]
    rows, cols = zip(*pairs) if pairs else ((), ())
    return np.array(rows, dtype=np.int64), np.array(cols, dtype=np.int64)


def fit_logistic(seqs, y, n_classes, l2, steps=1000, lr=1.0):
    """Softmax regression on bag_of_tokens, weight decay l2; returns a predict(seqs) -> class ids function."""
    vocab = {t: j for j, t in enumerate(sorted({t for s in seqs for t in s}))}
    W, b, Y = np.zeros((len(vocab), n_classes)), np.zeros(n_classes), np.eye(n_classes)[y]

    def logits(r, c, n):  # X @ W + b for the n rows of a sparse X: one bincount per class
        return np.stack([np.bincount(r, W[c, k], minlength=n) for k in range(n_classes)], 1) + b

    rows, cols = bag_of_tokens(seqs, vocab)
    for _ in range(steps):
        z = logits(rows, cols, len(seqs))
        p = np.exp(z - z.max(1, keepdims=True))
        g = (p / p.sum(1, keepdims=True) - Y) / len(seqs)  # d mean loss / d z
        gW = np.stack([np.bincount(cols, g[rows, k], minlength=len(vocab)) for k in range(n_classes)], 1)  # X^T g
        W -= lr * (gW + l2 * W)
        b -= lr * g.sum(0)
    return lambda new: logits(*bag_of_tokens(new, vocab), len(new)).argmax(1)


def baseline(seqs, y, n_classes):
    """fit_logistic with its weight decay picked on val, as the model's settings are; returns test predictions."""
    best = None
    for l2 in (1e-3, 1e-4, 1e-5):
        predict = fit_logistic(seqs["train"], y["train"], n_classes, l2)
        acc = float(np.mean(predict(seqs["val"]) == np.array(y["val"])))
        if best is None or acc > best[0]:
            best = (acc, predict)
    return best[1](seqs["test"])


# -----------------------------------------------------------------------------
# 3. The classifier: a GPT whose head gives n_classes logits, read at each row's last real token


def make_tokenizer(kind, texts=(), vocab_size=1024):
    """The tokenizer of a model from scratch: gpt2 (OpenAI's 50,257 tokens), bytes (256 bytes + <|endoftext|>)
    or bpe (byte-level BPE of vocab_size tokens, trained on `texts`, the training split only). Spam's cues are
    digits, phone numbers, prices and capitals; in a vocabulary learned on the training texts nearly every
    embedding row gets gradient, where 1,044 SMS texts use 4,777 of GPT-2's 50,257 tokens.
    make_tokenizer("bpe", ["call 0800 now", "call me"], 260).encode_ordinary("call") -> [258]"""
    if kind == "gpt2":
        return bpe.load_gpt2()
    if kind == "bytes":
        return bpe.byte_tokenizer()
    if kind == "bpe":
        if vocab_size <= 257:
            raise ValueError(f"--vocab-size {vocab_size}: a bpe tokenizer needs more than 256 bytes + 1 special")
        return bpe.Tokenizer("gpt2").train("\n".join(texts), vocab_size, special_tokens=[bpe.ENDOFTEXT])
    raise ValueError(f"unknown --tokenizer {kind!r}; valid: gpt2, bytes, bpe")


def encode(tok, text, max_len, eot=True):
    """Token ids of one text, cut to max_len; eot appends <|endoftext|>, so the position the head reads
    always holds the same token (a fixed 'summary' slot the model learns to fill), whatever the text.
    encode(bpe.load_gpt2(), "hello world", 256) -> [31373, 995, 50256]"""
    ids = tok.encode_ordinary(text)[:max_len - 1 if eot else max_len]
    return ids + [tok.eot_token] if eot else ids


def collate(seqs, pad_id=0, side="right"):
    """Pad sequences into one batch: idx (B, T), attention_mask (B, T) (1 = token, 0 = padding) and the
    index of each row's last real token (B,). Right padding puts it at length - 1, left padding at T - 1.
    collate([[5, 6, 7], [8]]) -> idx [[5, 6, 7], [8, 0, 0]], mask [[1, 1, 1], [1, 0, 0]], last [2, 0]"""
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for r, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        idx[r, cols], mask[r, cols] = torch.tensor(s, dtype=torch.long), 1
    last = mask.sum(1) - 1 if side == "right" else torch.full((len(seqs),), T - 1)
    return idx, mask, last


def add_class_head(model, n_classes):
    """Swap the language-model head (n_embd -> vocab, tied to the token embedding) for a new n_embd ->
    n_classes one; the body of the network stays as it is. No bias: gpt2.GPT's CPU inference path
    multiplies by lm_head.weight alone, and a bias-free head loses nothing the final norm's bias can't give.
    A model whose head is not tied keeps it as `lm_out`, for --lm-weight's next-token loss."""
    if not model.config.tie_weights:
        model.lm_out = model.lm_head
    model.lm_head = nn.Linear(model.config.n_embd, n_classes, bias=False, device=model.transformer.wte.weight.device)
    nn.init.normal_(model.lm_head.weight, std=0.02)
    return model


def class_logits(model, idx, mask, last):
    """(B, n_classes) logits at each row's last real token. The attention mask keeps padding out of every
    real token's view and gives per-row positions, so left- and right-padded batches give the same logits."""
    logits, _ = model(idx, attention_mask=mask)  # (B, T, n_classes): the head is tiny, so every position is cheap
    return logits[torch.arange(idx.size(0), device=idx.device), last]  # (B, n_classes)


def lm_loss(model, hidden, idx, mask, vocab):
    """GPT-1's auxiliary objective while fine-tuning (--lm-weight): next-token cross-entropy on the same
    texts, read through the language-model head the class head replaced (the token embedding, or an untied
    model's `lm_out`), padding ignored. The softmax runs over `vocab` (V',), the ids the training texts use:
    no other id is ever a target, and the full 50,257-way softmax would be most of a tiny model's step.
    hidden (B, T, C), the final norm's output; idx, mask (B, T) -> scalar.
    lm_loss(model, h, [[5, 6, 7]], [[1, 1, 1]], [5, 6, 7]) -> mean of -log p(6 | 5) and -log p(7 | 5, 6)"""
    head = model.lm_out.weight if hasattr(model, "lm_out") else model.transformer.wte.weight  # (V, C)
    logits = hidden[:, :-1] @ head[vocab].t()  # (B, T-1, V')
    targets = torch.searchsorted(vocab, idx[:, 1:].contiguous()).masked_fill(mask[:, 1:] == 0, -1)  # (B, T-1)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)


# -----------------------------------------------------------------------------
# 4. Which weights learn


def set_trainable(model, train="last-block", last_n=1):
    """Freeze what should not learn: head (the new head only), last-block (the book's choice: last block,
    final norm, head), last-n (the last `last_n` blocks, final norm, head), all. Returns the trainable count."""
    if train not in ("head", "last-block", "last-n", "all"):
        raise ValueError(f"unknown --train {train!r}; valid: head, last-block, last-n, all")
    for p in model.parameters():
        p.requires_grad_(train == "all")
    n = {"head": 0, "last-block": 1, "last-n": last_n, "all": 0}[train]
    if train == "last-n" and not 1 <= n <= len(model.transformer.h):  # a slice from len - n would wrap around
        raise ValueError(f"--last-n {n}: the model has {len(model.transformer.h)} blocks; give 1 to "
                         f"{len(model.transformer.h)}, or --train all")
    for module in [*model.transformer.h[len(model.transformer.h) - n:], *([model.transformer.ln_f] if n else [])]:
        module.requires_grad_(True)
    model.lm_head.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -----------------------------------------------------------------------------
# 5. Metrics


def confusion_matrix(y_true, y_pred, n_classes):
    """cm[i, j] = how many examples of class i were predicted as class j.
    confusion_matrix([0, 1, 1], [0, 0, 1], 2) -> [[1, 0], [1, 1]]"""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return cm


def scores(cm):
    """Accuracy, and per class precision (of the predicted c, how many are c), recall (of the true c, how
    many were found) and F1 (their harmonic mean); macro F1 is the mean over classes, blind to class size.
    scores([[1, 0], [1, 1]]) -> {"accuracy": 0.667, "precision": [0.5, 1.0], "recall": [1.0, 0.5], ...}"""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    precision = np.divide(tp, cm.sum(0), out=np.zeros_like(tp), where=cm.sum(0) > 0)
    recall = np.divide(tp, cm.sum(1), out=np.zeros_like(tp), where=cm.sum(1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=precision + recall > 0)
    return {"accuracy": tp.sum() / cm.sum(), "precision": precision.tolist(), "recall": recall.tolist(),
            "f1": f1.tolist(), "macro_f1": float(f1.mean())}


def class_weights(y, n_classes):
    """--class-weight balanced: each class weighs n / (n_classes * its count) in the loss, so a rare class
    counts as much as a common one in total. class_weights([0, 0, 0, 1], 2) -> [0.667, 2.0]"""
    counts = np.bincount(y, minlength=n_classes)
    return torch.tensor(len(y) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32)


# =============================================================================
# Plumbing: the loop, checkpoints, plots and the command line.
# =============================================================================


@torch.no_grad()
def predict_logits(model, seqs, batch_size, device, dtype):
    """(N, n_classes) logits, in batches of similar length (less padding; the logits do not depend on the
    batch, see class_logits)."""
    model.eval()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = torch.empty(len(seqs), model.lm_head.out_features)
    for k in range(0, len(seqs), batch_size):
        rows = order[k:k + batch_size]
        idx, mask, last = (t.to(device) for t in collate([seqs[i] for i in rows]))
        with autocast(device, dtype):
            out[rows] = class_logits(model, idx, mask, last).float().cpu()
    model.train()
    return out


def evaluate(model, seqs, y, batch_size, device, dtype, weight=None):
    logits = predict_logits(model, seqs, batch_size, device, dtype)
    loss = F.cross_entropy(logits, torch.tensor(y), weight=weight).item()
    return loss, logits.argmax(1).numpy()


def build_model(args, n_classes, ckpt=None, texts=()):
    """(model, tokenizer): a fresh GPT (--init scratch, its --tokenizer trained on `texts` when bpe), OpenAI's
    GPT-2 (--init gpt2...), or a checkpoint's weights (a train_gpt2.py language model, or with ckpt a
    classifier of this file, with the tokenizer it recorded), with the class head."""
    seed_everything(args.seed)
    source = ckpt or (load_checkpoint(args.init) if os.path.isfile(args.init) else None)
    if ckpt is None and source is not None and "labels" in source:  # its class head would not fit a new one
        raise ValueError(f"--init {args.init} is a classifier of this file (classes {source['labels']}), not a "
                         f"language model; continue it with --resume --out-dir <its folder>, use it with --predict, "
                         f"or start from a train_gpt2.py checkpoint, gpt2 or scratch")
    if source is not None:
        config = GPTConfig(**{**source["config"], "dropout": args.dropout})
        model = GPT(config)
        recorded = source.get("tokenizer")
        tok = bpe.Tokenizer.loads(recorded, source=f"{args.init}['tokenizer']") if recorded else bpe.load_gpt2()
        if ckpt is None:  # a language model: its weights, then a new head
            load_model_state(model, source["model"], args.init)
    elif args.init == "scratch":
        tok = make_tokenizer(args.tokenizer, texts, args.vocab_size)
        arch = {k: v for k, v in (("n_layer", args.n_layer), ("n_head", args.n_head), ("n_embd", args.n_embd))
                if v is not None}
        model = GPT(GPTConfig.from_preset(args.model, vocab_size=-(-tok.n_vocab // 64) * 64,
                                          dropout=args.dropout, **arch))
    elif args.init in HF_MODELS or os.path.isdir(args.init):
        model = GPT.from_pretrained(args.init, dtype=torch.float32, dropout=args.dropout)  # fp32 master weights
        tok = tokenizer_of(model, args.init)  # GPT-2's; a Llama / Qwen folder's own
    else:
        raise ValueError(f"--init {args.init!r}: not scratch, not one of {', '.join(HF_MODELS)}, and no such "
                         f"file or folder")
    add_class_head(model, n_classes)
    if args.lora:
        add_lora(model, r=args.lora, alpha=args.lora_alpha or args.lora)
        model.lm_head.requires_grad_(True)  # the new head always learns
    else:
        set_trainable(model, args.train, args.last_n)
    if ckpt is not None:  # a classifier: every weight, head and adapters included
        load_model_state(model, ckpt["model"], os.path.join(args.out_dir, "ckpt.pt"))
    return model, tok


def plot_run(out_dir, cm, names):
    """accuracy.png (train and val accuracy over steps) and confusion.png (the test confusion matrix)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = MetricsLog.read(out_dir)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("train_acc", "val_acc"):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), label=key.replace("_", " "), marker="o")
    ax.set_xlabel("step"), ax.set_ylabel("accuracy"), ax.legend(), ax.grid(alpha=0.3)
    fig.savefig(os.path.join(out_dir, "accuracy.png"), dpi=100, bbox_inches="tight")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.2 * len(names) + 1.5))
    ax.imshow(cm, cmap="Blues")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="black" if cm[i, j] < cm.max() / 2 else "white")
    ax.set_xticks(range(len(names)), names), ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted"), ax.set_ylabel("true"), ax.set_title("test confusion matrix")
    fig.savefig(os.path.join(out_dir, "confusion.png"), dpi=100, bbox_inches="tight")
    plt.close(fig)


def report(name, cm, names):
    s = scores(cm)
    per = ", ".join(f"{n} P {p:.3f} R {r:.3f} F1 {f:.3f}" for n, p, r, f in
                    zip(names, s["precision"], s["recall"], s["f1"]))
    print(f"{name:9s} test accuracy {s['accuracy']:.2%} | macro F1 {s['macro_f1']:.4f} | {per} | "
          f"confusion {cm.tolist()}")
    return s


def predict_texts(args):
    """--predict: the label and probability of each text, from the classifier in <out-dir>/ckpt.pt."""
    path = os.path.join(args.out_dir, "ckpt.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--predict: no classifier at {path}; train one first (python classify.py --out-dir "
                                f"{args.out_dir}), or give the --out-dir of a trained one")
    ckpt = load_checkpoint(path)
    if "labels" not in ckpt:
        raise ValueError(f"{path} is not a classifier written by classify.py; train one first")
    if not all(t.strip() for t in args.predict):
        raise ValueError("--predict: an empty text; give the text to classify")
    model, tok = build_model(argparse.Namespace(**{**ckpt["args"], "out_dir": args.out_dir}), len(ckpt["labels"]), ckpt)
    device = pick_device(args.device)
    max_len = min(ckpt["args"].get("max_len") or model.config.block_size, model.config.block_size)  # as trained
    seqs = [encode(tok, t, max_len, ckpt["args"]["eot"]) for t in args.predict]
    probs = predict_logits(model.to(device), seqs, 64, device, torch.float32).softmax(-1)
    for text, p in zip(args.predict, probs):
        print(f"{ckpt['labels'][int(p.argmax())]} ({float(p.max()):.3f})\t{text}")


RUN_PRESETS = {
    # the CPU default: a 0.92M-parameter GPT and a 1,024-token BPE from scratch (bench/results/classify_cpu.md)
    "scratch": dict(),
    # the book's chapter 6 recipe (Raschka, Build a Large Language Model From Scratch): GPT-2 124M on its split,
    # the last block + final norm + head train, AdamW 5e-5 with weight decay 0.1, batch 8, 5 epochs, no dropout
    # and no warmup (its rate stays constant; here it decays). Its variants are flags: --train last-n (two
    # blocks), --lora 16, --init gpt2-xl. Downloads GPT-2's weights (500 MB); a GPU makes it minutes.
    "gpt2-book": dict(init="gpt2", split="book", train="last-block", lr=5e-5, epochs=5, batch_size=8, dropout=0.0,
                      warmup_steps=0),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--preset", default="scratch", choices=list(RUN_PRESETS),
                   help="scratch: the CPU default; gpt2-book: the book's GPT-2 recipe (flags given override it)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="label<TAB>text or {text, label} JSONL file (default: the SMS "
                                                "collection in data/, downloaded from UCI if missing)")
    g.add_argument("--split", default="balanced", choices=["balanced", "full", "book"],
                   help="balanced: undersample every class to the smallest (the book's sizes, stratified, repeated "
                        "texts in one split); full: every row; book: the book's exact split (leaks repeats)")
    g.add_argument("--split-seed", type=int, default=123, help="seed of the split (fixed while --seed varies)")
    g.add_argument("--max-len", type=int, default=None, help="tokens kept per text (default: block_size)")
    g.add_argument("--eot", action=argparse.BooleanOptionalAction, default=True,
                   help="append <|endoftext|>: the head always reads the same token")
    g = p.add_argument_group("model")
    g.add_argument("--init", default="scratch", help="scratch | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | HF "
                                                     "folder | checkpoint of train_gpt2.py")
    g.add_argument("--model", default="tiny", choices=list(PRESETS), help="architecture from scratch")
    g.add_argument("--n-layer", type=int, help="blocks (from scratch; default: the --model preset)")
    g.add_argument("--n-head", type=int, help="attention heads (from scratch)")
    g.add_argument("--n-embd", type=int, help="width (from scratch)")
    g.add_argument("--dropout", type=float, default=0.2, help="dropout probability while training")
    g.add_argument("--tokenizer", default=None, choices=["gpt2", "bytes", "bpe"],
                   help="from scratch: gpt2 (OpenAI's 50,257 tokens), bytes (257 ids), or bpe (--vocab-size "
                        "tokens trained on the training split) (default: bpe)")
    g.add_argument("--vocab-size", type=int, default=1024, help="tokens of --tokenizer bpe, 256 bytes included")
    g = p.add_argument_group("what trains")
    g.add_argument("--train", default=None, choices=["head", "last-block", "last-n", "all"],
                   help="weights that learn (default: all from scratch, last-block for pretrained weights)")
    g.add_argument("--last-n", type=int, default=2, help="blocks that learn with --train last-n")
    g.add_argument("--lora", type=int, default=0,
                   help="LoRA rank: freeze the model, train adapters + head (instead of --train)")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default: the rank)")
    g.add_argument("--lm-weight", type=float, default=None,
                   help="add this times GPT-1's next-token loss on the training texts (GPT-1: 0.5; 0 = off; "
                        "default: 0.5 from scratch, 0 for pretrained weights)")
    g.add_argument("--lm-unlabeled", action=argparse.BooleanOptionalAction, default=False,
                   help="each step, the next-token loss also on a batch of the data file's rows outside the split "
                        "(their labels unused, copies of val/test texts left out); needs --lm-weight > 0")
    g.add_argument("--class-weight", default="none", choices=["none", "balanced"],
                   help="balanced: weigh each class's loss by n / (classes x its count)")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=None, help="passes over the training split, setting --max-steps "
                                                            "(default: 4 from scratch, 8 for pretrained weights)")
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: from --epochs)")
    g.add_argument("--batch-size", type=int, default=32, help="texts per step")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-3 from scratch, "
                                                          "1e-4 for pretrained weights)")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear warmup (default: 10%% of the steps)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (matrices only)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient's global norm to this (0 = off)")
    g = p.add_argument_group("run")
    g.add_argument("--eval-interval", type=int, default=None, help="steps between val evaluations (default: "
                                                                   "one epoch)")
    g.add_argument("--out-dir", default="out-classify", help="ckpt.pt, metrics.jsonl and the plots go here")
    g.add_argument("--resume", action="store_true", help="continue the run in --out-dir exactly")
    g.add_argument("--stop-after", type=int, default=None,
                   help="stop (with a checkpoint) after this step without changing the schedule; --resume goes on")
    g.add_argument("--predict", action="append", metavar="TEXT",
                   help="classify TEXT with the classifier in --out-dir and exit (repeatable)")
    add_common_args(p.add_argument_group("system"))
    first, _ = p.parse_known_args(argv)
    p.set_defaults(**RUN_PRESETS[first.preset])
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.predict:
        return predict_texts(args)
    args, ckpt = resume_settings(args, "classify.py", "split", argv)  # a resumed run: its own settings
    if args.max_len is not None and args.max_len < 1 + args.eot:
        raise ValueError(f"--max-len {args.max_len} leaves no token of the text (after <|endoftext|> if --eot); "
                         f"give at least {1 + args.eot}, or leave it out for the model's block size")
    pretrained = args.init != "scratch"
    args.train = args.train or ("last-block" if pretrained else "all")
    given = given_flags(argv)
    for flag, needs, used in (("--last-n", "--train last-n", args.train == "last-n" and not args.lora),
                              ("--lora-alpha", "--lora R", bool(args.lora))):
        if flag[2:].replace("-", "_") in given and not used and not args.resume:
            print(f"classify.py: note: {flag} is used only with {needs}; not used here")
    if args.lr is None:  # `is None`, not `or`: --lr 0 (the weights stay as they are) means what it says
        args.lr = 1e-4 if pretrained else 1e-3
    if args.epochs is None:  # and --epochs 0 is refused below, not taken for the default
        args.epochs = 8 if pretrained else 4
    if args.lr < 0 or args.epochs < 1 or (args.max_steps is not None and args.max_steps < 1):
        raise ValueError(f"--lr {args.lr}, --epochs {args.epochs}, --max-steps {args.max_steps}: give --lr >= 0 "
                         f"and at least one epoch or step")
    if args.grad_clip < 0:  # clip_grad_norm_ with a negative norm turns every step around: gradient ascent
        raise ValueError(f"--grad-clip {args.grad_clip}: give a norm > 0, or 0 for no clipping")
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--warmup-steps", args.warmup_steps, 0),
                             ("--eval-interval", args.eval_interval, 0), ("--split-seed", args.split_seed, 0),
                             ("--stop-after", args.stop_after, 1)):
        if value is not None and value < low:  # --eval-interval 0: an epoch; --warmup-steps 0: no warmup
            raise ValueError(f"{flag} {value}: give at least {low}")
    if pretrained and args.tokenizer is not None:
        raise ValueError(f"--tokenizer {args.tokenizer} is for --init scratch; --init {args.init} brings its own "
                         f"tokenizer (leave --tokenizer out)")
    if not pretrained:  # val acc 99.8% vs 98.9% with gpt2 (bench/results/classify_cpu.md)
        args.tokenizer = args.tokenizer or "bpe"
    if args.lm_weight is None:  # from scratch, GPT-2 tokens: val loss 0.038 vs 0.095 without (same file)
        args.lm_weight = 0.0 if pretrained else 0.5
    if args.lm_unlabeled and not args.lm_weight:
        raise ValueError("--lm-unlabeled adds to the next-token loss, which --lm-weight 0 turns off; give "
                         "--lm-weight > 0 or leave --lm-unlabeled out")
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    if args.data is None:
        args.data = SMS_PATH if os.path.exists(SMS_PATH) else download_sms()
    args.data = os.path.abspath(args.data)  # recorded: --resume finds it from any folder
    examples = read_examples(args.data, quoting=args.split == "book")
    with open(args.data, "rb") as f:
        data_hash = hashlib.sha256(f.read()).hexdigest()
    if ckpt and ckpt.get("data_sha256", data_hash) != data_hash:  # another split, silently: not a resume
        raise ValueError(f"--resume: {args.data} changed since the run in {args.out_dir} started (its sha256 "
                         f"differs); put back the file it trained on, or start a new run in another --out-dir")
    names = ckpt["labels"] if ckpt else sorted({label for _, label in examples})
    y_all = label_ids([label for _, label in examples], names)
    splits = split_rows(examples, args.split, args.split_seed)
    model, tok = build_model(args, len(names), ckpt, texts=[examples[i][0] for i in splits["train"]])
    if args.eot and "<|endoftext|>" not in tok.special_tokens:
        raise ValueError(f"--init {args.init}: its tokenizer has no <|endoftext|> token to append; give --no-eot "
                         f"(the head then reads each text's own last token)")
    max_len = min(model.config.block_size if args.max_len is None else args.max_len, model.config.block_size)
    seqs = {s: [encode(tok, examples[i][0], max_len, args.eot) for i in rows] for s, rows in splits.items()}
    unlabeled = [encode(tok, examples[i][0], max_len, args.eot)
                 for i in (unlabeled_rows(examples, splits) if args.lm_unlabeled else [])]
    y = {s: [y_all[i] for i in rows] for s, rows in splits.items()}
    print(f"data {args.data}: {len(examples)} rows, classes {names} | split {args.split}: " +
          ", ".join(f"{s} {len(v)} ({np.bincount(y[s], minlength=len(names)).tolist()})" for s, v in y.items()) +
          (f" | {len(unlabeled)} unlabeled texts for the next-token loss" if args.lm_unlabeled else ""))

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    model.to(device)
    n_train = len(seqs["train"])
    steps_per_epoch = math.ceil(n_train / args.batch_size)
    max_steps = args.epochs * steps_per_epoch if args.max_steps is None else args.max_steps
    warmup = args.warmup_steps if args.warmup_steps is not None else max_steps // 10
    if note := warmup_note(warmup, max_steps):
        print(f"classify.py: {note}")
    eval_interval = args.eval_interval or steps_per_epoch
    weight = class_weights(y["train"], len(names)) if args.class_weight == "balanced" else None
    optimizer = model.configure_optimizer(args.weight_decay, args.lr, device_type=device)
    scaler = grad_scaler(device, dtype)
    step, correct, seen = 0, 0, 0
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        restore_scaler(scaler, ckpt["scaler"])
        set_rng_state(ckpt["rng"])  # dropout's masks; the data order is a function of (seed, epoch)
        step, (correct, seen) = ckpt["step"], ckpt["running_acc"]
        if step >= max_steps and any("test_acc" in r for r in MetricsLog.read(args.out_dir)):
            return print(f"{ckpt_path} finished its {max_steps} steps; its test results are in metrics.jsonl")
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"model {args.init}: {model.num_params() / 1e6:.2f}M params (without position embeddings), "
          f"{n_trainable / 1e6:.2f}M trainable "
          f"({'LoRA r=%d' % args.lora if args.lora else args.train}) | {device} {str(dtype)[6:]} | "
          f"{max_steps} steps of {args.batch_size}")
    metrics = MetricsLog(args.out_dir, resume_step=step if ckpt else None)
    hidden = {}  # --lm-weight reads the final norm's output, caught by a hook (registered before compiling)
    lm_vocab = torch.tensor(sorted({t for s in seqs["train"] + unlabeled for t in s}), device=device)  # searchsorted
    unlabeled_steps = math.ceil(len(unlabeled) / args.batch_size)  # steps per pass over the unlabeled texts
    if args.lm_weight:
        model.transformer.ln_f.register_forward_hook(lambda module, inputs, out: hidden.update(h=out))
    train_model = maybe_compile(model, args.compile)
    t0 = time.time() - (ckpt.get("seconds", 0.0) if ckpt else 0.0)  # a resumed run counts its first part too
    stop = min(max_steps, args.stop_after or max_steps)
    while step < stop:
        epoch, k = divmod(step, steps_per_epoch)
        order = np.random.default_rng([args.seed, epoch]).permutation(n_train)  # a function of (seed, epoch): exact resume
        rows = order[k * args.batch_size:(k + 1) * args.batch_size]
        batch = [seqs["train"][i] for i in rows]
        if unlabeled:  # the unlabeled rows join the batch after the labeled ones: next-token loss only
            upass, uk = divmod(step, unlabeled_steps)
            uorder = np.random.default_rng([args.seed, upass, 1]).permutation(len(unlabeled))  # (seed, pass)
            batch += [unlabeled[i] for i in uorder[uk * args.batch_size:(uk + 1) * args.batch_size]]
        idx, mask, last = (t.to(device) for t in collate(batch))
        target = torch.tensor([y["train"][i] for i in rows], device=device)
        lr = lr_at(step, args.lr, warmup, max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(device, dtype):
            logits = class_logits(train_model, idx, mask, last)[:len(rows)]  # (B, n_classes), labeled rows
            aux = args.lm_weight * lm_loss(model, hidden["h"], idx, mask, lm_vocab) if args.lm_weight else 0.0
        loss = F.cross_entropy(logits.float(), target, weight=None if weight is None else weight.to(device))
        total = loss + aux
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)
        if args.grad_clip:  # 0 = off (a max norm of 0 would zero every gradient)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        correct, seen = correct + int((logits.argmax(1) == target).sum()), seen + len(rows)
        row = dict(step=step, train_loss=loss.item(), lr=lr)
        if args.lm_weight:
            row["lm_loss"] = aux.item() / args.lm_weight
        if step % eval_interval == 0 or step == max_steps:
            val_loss, pred = evaluate(model, seqs["val"], y["val"], 64, device, dtype, weight)
            row.update(val_loss=val_loss, val_acc=float(np.mean(pred == np.array(y["val"]))),
                       train_acc=correct / seen)  # running accuracy of the training batches (dropout on)
            correct = seen = 0
            print(f"step {step:5d} | loss {loss.item():.4f} | train acc {row['train_acc']:.2%} | val loss "
                  f"{val_loss:.4f} | val acc {row['val_acc']:.2%} | {time.time() - t0:.0f} s", flush=True)
        metrics.log(**row)
        if "val_acc" in row or step == stop:
            save_checkpoint(ckpt_path, model, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                            step=step, rng=rng_state(), running_acc=(correct, seen), labels=names,
                            tokenizer=tok.dumps(), args=vars(args), data_sha256=data_hash,
                            seconds=time.time() - t0)
    if step < max_steps:
        return print(f"stopped at step {step} of {max_steps}; --resume goes on from {ckpt_path}")

    _, pred = evaluate(model, seqs["test"], y["test"], 64, device, dtype)
    cm = confusion_matrix(y["test"], pred, len(names))
    s = report("model", cm, names)
    gpt2_tok = bpe.load_gpt2()  # the bar stays the same whatever the model's tokenizer: bag of GPT-2 tokens
    words = {s: [encode(gpt2_tok, examples[i][0], max_len, args.eot) for i in rows] for s, rows in splits.items()}
    b = report("baseline", confusion_matrix(y["test"], baseline(words, y, len(names)), len(names)), names)
    metrics.log(step=step, test_acc=s["accuracy"], test_macro_f1=s["macro_f1"], test_f1=s["f1"],
                test_confusion=cm.tolist(), baseline_test_acc=b["accuracy"], baseline_test_f1=b["f1"],
                seconds=time.time() - t0)
    metrics.plot(title=f"classify {os.path.basename(args.data)} ({args.split})")
    plot_run(args.out_dir, cm, names)
    print(f"done in {time.time() - t0:.0f} s; checkpoint {ckpt_path}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, bpe.DownloadError) as e:  # bad input or no network: the message names
        raise SystemExit(f"classify.py: error: {e}")                  # the fix; a traceback would bury it
