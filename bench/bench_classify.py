"""classify.py against what a user would pick instead for SMS spam: scikit-learn's TF-IDF + linear models, on the
same splits, each peer's regularization picked on the same validation texts. Also counts the test texts that
have a copy in training (the leak of a split that does not keep repeated texts together).

    python bench/bench_classify.py                                  # the peers on the balanced, book and full splits
    OMP_NUM_THREADS=1 python bench/bench_classify.py --seeds 1337,1338,1339 --out bench/results/classify_peers_cpu.md
                                                                    # + classify.py's default run per seed, side by side

Peers (fit on the training texts, C / alpha picked by val accuracy, the first of equals; the test accuracy of
every grid point is reported beside, never used to pick):
  - classify.baseline: the file's own numpy bag-of-GPT-2-tokens logistic regression;
  - word 1-2-gram, char 2-6-gram and char-in-word 1-5-gram TF-IDF, each + LogisticRegression and + LinearSVC;
  - word counts and char-in-word 1-5-gram counts + MultinomialNB (the classic spam filter).
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
                hyper=best[1], grid=f"{min(tests):.2%}-{max(tests):.2%}", cpu=time.process_time() - t0)


def run_numpy_baseline(texts, y):
    t0 = time.process_time()
    tok = bpe.load_gpt2()
    seqs = {k: [classify.encode(tok, t, 1024) for t in v] for k, v in texts.items()}
    pred = classify.baseline(seqs, {k: v.tolist() for k, v in y.items()}, 2)
    return dict(val=float("nan"), test=float((pred == y["test"]).mean()), f1=spam_f1(y["test"], pred), hyper="-",
                grid="-", cpu=time.process_time() - t0)


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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--splits", default=",".join(SPLITS), help="comma-separated: balanced, book, full")
    p.add_argument("--seeds", default="", help="also run classify.py's default with these seeds (comma-separated)")
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
    for split in args.splits.split(","):
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
    load = os.getloadavg()
    lines.append(f"load average (1/5/15 min) at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(lines[-1])
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
