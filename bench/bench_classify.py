"""classify.py against what a user would pick instead for SMS spam: scikit-learn's TF-IDF + linear models, on the
same splits, each peer's regularization picked on the same validation texts. Also counts the test texts that
have a copy in training (the leak of a split that does not keep repeated texts together).

    python bench/bench_classify.py                                  # the peers on the balanced, book and full splits
    OMP_NUM_THREADS=1 python bench/bench_classify.py --seeds 1337,1338,1339 --out bench/results/classify_peers_cpu.md
                                                                    # + classify.py's default run per seed, side by side
    python bench/bench_classify.py --errors out/s1/ckpt.pt out/s2/ckpt.pt   # the test texts these runs get wrong,
                                                                    # and whether the scikit-learn filters do too

Peers (fit on the training texts, C / alpha picked by val accuracy, the first of equals; the test accuracy of
every grid point is reported beside, never used to pick):
  - classify.baseline: the file's own numpy bag-of-GPT-2-tokens logistic regression;
  - word 1-2-gram, char 2-6-gram and char-in-word 1-5-gram TF-IDF, each + LogisticRegression and + LinearSVC;
  - word counts and char-in-word 1-5-gram counts + MultinomialNB (the classic spam filter).
With --encoder (a pretrained Hugging Face encoder: a hub name such as sentence-transformers/all-MiniLM-L6-v2, or
its folder), what pretraining buys: its mean-pooled embeddings + LogisticRegression, and, per --encoder-seeds, the
encoder fine-tuned end to end (a linear head on the mean-pooled states, AdamW up to ~0.9 x 5e-5, batch 16, 5 epochs,
the epoch picked on val; "over the grid" is then the test accuracy over the epochs):

    python bench/bench_classify.py --splits balanced --encoder sentence-transformers/all-MiniLM-L6-v2 \\
        --encoder-seeds 1337,1338,1339
"""

import argparse
import datetime
import os
import platform
import resource
import shlex
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import bpe  # noqa: E402
import classify  # noqa: E402

SPLITS = ("balanced", "book", "full")


def load_split(name, seed=123):
    """(texts, labels) per split, as classify.main builds them for --split name."""
    rows = classify.read_examples(classify.SMS_PATH, quoting=name == "book")
    s = classify.split_rows(rows, name, seed)
    return {k: [rows[i][0] for i in v] for k, v in s.items()}, {k: np.array([rows[i][1] == "spam" for i in v], int)
                                                                 for k, v in s.items()}


def spam_f1(y, pred):
    """F1 of the spam class (1), from classify's confusion matrix and scores."""
    return classify.scores(classify.confusion_matrix(y, pred, 2))["f1"][1]


def peers():
    """name -> (make vectorizer, make model from its hyperparameter, grid)."""
    from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.naive_bayes import MultinomialNB
    from sklearn.svm import LinearSVC
    features = {
        "word 1-2-gram TF-IDF": lambda: TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
        "char 2-6-gram TF-IDF": lambda: TfidfVectorizer(analyzer="char", ngram_range=(2, 6), sublinear_tf=True,
                                                        lowercase=False),
        "char-in-word 1-5-gram TF-IDF": lambda: TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 5),
                                                                sublinear_tf=True),
    }
    out = {}
    for fname, vec in features.items():
        out[f"sklearn {fname} + LogisticRegression"] = (vec, lambda c: LogisticRegression(C=c, max_iter=2000),
                                                        (1, 10, 100, 1000))
        out[f"sklearn {fname} + LinearSVC"] = (vec, lambda c: LinearSVC(C=c), (0.1, 0.3, 1, 3, 10))
    out["sklearn word counts + MultinomialNB"] = (CountVectorizer, lambda a: MultinomialNB(alpha=a), (0.1, 0.3, 1.0))
    out["sklearn char-in-word 1-5-gram counts + MultinomialNB"] = (
        lambda: CountVectorizer(analyzer="char_wb", ngram_range=(1, 5)), lambda a: MultinomialNB(alpha=a),
        (0.1, 0.3, 1.0))
    return out


def run_peer(make_vec, make_model, grid, texts, y):
    """Fit make_vec() on the training texts, make_model(h) for each h of grid; the h with the best val accuracy."""
    t0 = time.process_time()
    vec = make_vec()
    x = {"train": vec.fit_transform(texts["train"])}
    x.update({k: vec.transform(texts[k]) for k in ("val", "test")})
    best, tests = None, []
    for h in grid:
        m = make_model(h).fit(x["train"], y["train"])
        val = float((m.predict(x["val"]) == y["val"]).mean())
        tests.append(float((m.predict(x["test"]) == y["test"]).mean()))  # reported, never used to pick
        if best is None or val > best[0]:
            best = (val, h, m.predict(x["test"]))
    return dict(val=best[0], test=float((best[2] == y["test"]).mean()), f1=spam_f1(y["test"], best[2]),
                hyper=best[1], grid=f"{min(tests):.2%}-{max(tests):.2%}", cpu=time.process_time() - t0,
                pred=best[2])


def run_numpy_baseline(texts, y):
    t0 = time.process_time()
    tok = bpe.load_gpt2()
    seqs = {k: [classify.encode(tok, t, 1024) for t in v] for k, v in texts.items()}
    pred = classify.baseline(seqs, {k: v.tolist() for k, v in y.items()}, 2)
    return dict(val=float("nan"), test=float((pred == y["test"]).mean()), f1=spam_f1(y["test"], pred), hyper="-",
                grid="-", cpu=time.process_time() - t0)


def load_encoder(path):
    """A pretrained Hugging Face encoder -> (encoder, pooled: texts -> mean of the last hidden states over the
    real tokens, (B, C))."""
    from transformers import AutoModel, AutoTokenizer
    tok, enc = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)

    def pooled(batch):
        b = tok(batch, padding=True, truncation=True, max_length=128, return_tensors="pt")
        m = b["attention_mask"].unsqueeze(-1).float()
        return (enc(**b).last_hidden_state * m).sum(1) / m.sum(1)
    return enc, pooled


def run_encoder_frozen(path, texts, y):
    """The encoder's normalized embeddings as features, + LogisticRegression (C picked on val)."""
    import torch
    import torch.nn.functional as F
    from sklearn.linear_model import LogisticRegression
    t0 = time.process_time()
    enc, pooled = load_encoder(path)
    enc.eval()
    with torch.no_grad():
        x = {k: torch.cat([F.normalize(pooled(v[i:i + 64]), dim=-1) for i in range(0, len(v), 64)]).numpy()
             for k, v in texts.items()}
    r = run_peer(_Identity, lambda c: LogisticRegression(C=c, max_iter=5000), (0.1, 1, 10, 100, 1000), x, y)
    return {**r, "cpu": time.process_time() - t0}


class _Identity:
    """run_peer's vectorizer for features already computed."""

    def fit_transform(self, x):
        return x

    def transform(self, x):
        return x


def run_encoder_tuned(path, texts, y, seed, epochs=5, batch_size=16, lr=5e-5):
    """The encoder fine-tuned end to end with a linear head on its mean-pooled states (AdamW; the rate is a linear
    warmup over 10% of the steps times a linear decay over all of them, so it peaks near 0.9 lr), evaluated after
    each epoch; the epoch with the best val accuracy (the last of equals)."""
    import torch
    import torch.nn.functional as F
    t0 = time.process_time()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    enc, pooled = load_encoder(path)
    head = torch.nn.Linear(enc.config.hidden_size, 2)
    opt = torch.optim.AdamW(list(enc.parameters()) + list(head.parameters()), lr=lr, weight_decay=0.01)
    n = len(texts["train"])
    steps = epochs * -(-n // batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (0.1 * steps)) * (steps - s) / steps)
    best, tests = None, []
    for epoch in range(1, epochs + 1):
        enc.train()
        perm = rng.permutation(n)
        for i in range(0, n, batch_size):
            rows = perm[i:i + batch_size]
            loss = F.cross_entropy(head(pooled([texts["train"][j] for j in rows])), torch.tensor(y["train"][rows]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        enc.eval()
        with torch.no_grad():
            pred = {k: torch.cat([head(pooled(texts[k][i:i + 64])).argmax(-1) for i in range(0, len(texts[k]), 64)])
                    .numpy() for k in ("val", "test")}
        val = float((pred["val"] == y["val"]).mean())
        tests.append(float((pred["test"] == y["test"]).mean()))  # reported, never used to pick
        if best is None or val >= best[0]:
            best = (val, epoch, pred["test"])
    return dict(val=best[0], test=float((best[2] == y["test"]).mean()), f1=spam_f1(y["test"], best[2]),
                hyper=f"seed {seed}, epoch {best[1]}", grid=f"{min(tests):.2%}-{max(tests):.2%}",
                cpu=time.process_time() - t0)


def run_classify(split, seed, out_dir):
    """classify.py's default run (from scratch, CPU): its metrics.jsonl's final row, and the run's CPU seconds."""
    t0 = resource.getrusage(resource.RUSAGE_SELF)
    classify.main(["--split", split, "--seed", str(seed), "--out-dir", out_dir, "--device", "cpu"])
    t1 = resource.getrusage(resource.RUSAGE_SELF)
    rows = classify.MetricsLog.read(out_dir)
    last = rows[-1]
    val = [r["val_acc"] for r in rows if "val_acc" in r][-1]
    return dict(val=val, test=last["test_acc"], f1=last["test_f1"][1], hyper=f"seed {seed}", grid="-",
                cpu=(t1.ru_utime + t1.ru_stime) - (t0.ru_utime + t0.ru_stime))


def error_core(paths):
    """--errors: the test texts that classify.py's runs (their ckpt.pt files, one split) get wrong, how many of
    the runs miss each, and how many of the scikit-learn filters (picked on val) miss it too. -> report lines."""
    import torch
    runs = [classify.load_checkpoint(p) for p in paths]
    splits = {(r["args"]["split"], r["args"]["split_seed"]) for r in runs}
    if len(splits) != 1:
        sys.exit(f"--errors: the checkpoints come from different splits {sorted(splits)}; give one split's")
    split, split_seed = splits.pop()
    texts, y = load_split(split, split_seed)
    missed = np.zeros(len(y["test"]), int)
    for path, ckpt in zip(paths, runs):
        args = argparse.Namespace(**{**ckpt["args"], "out_dir": os.path.dirname(path)})
        model, tok = classify.build_model(args, len(ckpt["labels"]), ckpt)
        max_len = min(args.max_len or model.config.block_size, model.config.block_size)
        seqs = [classify.encode(tok, t, max_len, args.eot) for t in texts["test"]]
        spam = classify.predict_logits(model, seqs, 64, "cpu", torch.float32).argmax(1).numpy() == \
            ckpt["labels"].index("spam")
        missed += spam != y["test"]
    filters = peers()
    peer_missed = sum(run_peer(*spec, texts, y)["pred"] != y["test"] for spec in filters.values())
    n, lines = len(runs), [f"## test texts of the {split} split that classify.py's {len(runs)} runs get wrong", ""]
    for k in sorted({k for k in (n, n - 1, n - 2, (n + 1) // 2) if k > 0}, reverse=True):
        core = missed >= k
        lines.append(f"- missed by at least {k} of the {n} runs: {int(core.sum())} texts; of those, missed by all "
                     f"{len(filters)} scikit-learn filters too: {int((peer_missed[core] == len(filters)).sum())}")
    lines += ["", f"| runs that miss it (of {n}) | filters that miss it (of {len(filters)}) | label | text |",
              "|---|---|---|---|"]
    for i in sorted(np.flatnonzero(missed), key=lambda i: -missed[i]):
        text = texts["test"][i].replace("|", "/").replace("\n", " ")
        lines.append(f"| {missed[i]} | {peer_missed[i]} | {'spam' if y['test'][i] else 'ham'} | {text[:100]} |")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--splits", default=",".join(SPLITS), help="comma-separated: balanced, book, full")
    p.add_argument("--seeds", default="", help="also run classify.py's default with these seeds (comma-separated)")
    p.add_argument("--encoder", help="also a pretrained encoder per seed: a Hugging Face hub name or folder (e.g. "
                   "sentence-transformers/all-MiniLM-L6-v2), frozen + LogisticRegression and fine-tuned")
    p.add_argument("--encoder-seeds", default="1337", help="seeds of the fine-tuned encoder (comma-separated)")
    p.add_argument("--errors", nargs="+", metavar="CKPT", help="instead: which test texts these classify.py runs "
                   "(ckpt.pt files of one split) get wrong, and whether the scikit-learn filters miss them too")
    p.add_argument("--out", help="also write the report to this markdown file")
    args = p.parse_args()
    try:
        import sklearn
    except ImportError:
        sys.exit("bench_classify.py compares against scikit-learn: pip install -r requirements-dev.txt")
    lines = [f"# bench/bench_classify.py, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", "",
             f"command: `{' '.join(shlex.quote(a) for a in ['python'] + sys.argv)}`  ",
             f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python "
             f"{platform.python_version()}, scikit-learn {sklearn.__version__}, OMP_NUM_THREADS="
             f"{os.environ.get('OMP_NUM_THREADS', 'unset')}", ""]
    for split in [] if args.errors else args.splits.split(","):
        texts, y = load_split(split)
        train = set(texts["train"])
        leak = [i for i, t in enumerate(texts["test"]) if t in train]
        lines += [f"## split {split}: train {len(y['train'])}, val {len(y['val'])}, test {len(y['test'])} "
                  f"({int(y['test'].sum())} spam); test texts with a copy in train: {len(leak)} "
                  f"({int(y['test'][leak].sum()) if leak else 0} spam)", "",
                  "| method | picked | val acc | test acc | test spam F1 | test acc over the grid | CPU s |",
                  "|---|---|---|---|---|---|---|"]
        results = [("classify.baseline (numpy, bag of GPT-2 tokens)", run_numpy_baseline(texts, y))]
        results += [(name, run_peer(*spec, texts, y)) for name, spec in peers().items()]
        if args.encoder:
            name = "/".join(os.path.normpath(args.encoder).split(os.sep)[-2:])  # hub name, or folder's last two parts
            results.append((f"{name} (pretrained) embeddings + LogisticRegression",
                            run_encoder_frozen(args.encoder, texts, y)))
            results += [(f"{name} (pretrained) fine-tuned", run_encoder_tuned(args.encoder, texts, y, int(seed)))
                        for seed in args.encoder_seeds.split(",") if seed]
        with tempfile.TemporaryDirectory() as tmp:
            for seed in [int(s) for s in args.seeds.split(",") if s]:
                results.append(("classify.py default (tiny GPT from scratch)",
                                run_classify(split, seed, os.path.join(tmp, f"{split}-{seed}"))))
        for name, r in results:
            val = "-" if np.isnan(r["val"]) else f"{r['val']:.2%}"  # classify.baseline keeps its val score
            lines.append(f"| {name} | {r['hyper']} | {val} | {r['test']:.2%} | {r['f1']:.4f} | {r['grid']} | {r['cpu']:.1f} |")
        ours = [r["test"] for name, r in results if name.startswith("classify.py")]
        if ours:
            best_peer = max(r["test"] for name, r in results if not name.startswith("classify.py"))
            lines.append(f"\nclassify.py test accuracy {np.mean(ours):.2%} mean over {len(ours)} seeds (min "
                         f"{min(ours):.2%}, max {max(ours):.2%}); best peer {best_peer:.2%}")
        lines.append("")
        print("\n".join(lines[-len(results) - 6:]), flush=True)
    if args.errors:
        lines += error_core(args.errors)
        print("\n".join(lines))
    load = os.getloadavg()
    lines.append(f"load average (1/5/15 min) at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(lines[-1])
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
