"""Benchmarks for bpe.py, side by side with the references, in one run on one machine.

  python bench/bench_bpe.py encode   # GPT-2 encoding of a 9.5 MB text: bpe.py vs tiktoken (1 thread)
  python bench/bench_bpe.py train    # 16,384-token training on 90% of it: bpe.py vs HF tokenizers
  python bench/bench_bpe.py scale    # training on a generated >= 200 MB file with 1 and 2 processes

Needs ../shared/data/shakespeare_complete.txt (or --file), tiktoken and tokenizers. Prints markdown.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import bpe  # noqa: E402

DEFAULT_FILE = ROOT.parent / "shared" / "data" / "shakespeare_complete.txt"


def gpt2_pat_str():
    """The pattern tiktoken's own "gpt2" encoding uses (an equivalent, faster spelling of GPT-2's);
    never bpe.py's own, so that the comparison stays a comparison."""
    from tiktoken_ext.openai_public import r50k_pat_str
    return r50k_pat_str


def tiktoken_gpt2():
    import tiktoken
    import tiktoken.load
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(str(ROOT / "data/gpt2/vocab.bpe"),
                                                          str(ROOT / "data/gpt2/encoder.json"))
    return tiktoken.Encoding(name="gpt2", pat_str=gpt2_pat_str(), mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


def bench_encode(path, repeats):
    text = Path(path).read_text(encoding="utf-8")
    mb = len(text.encode("utf-8")) / 1e6
    enc = tiktoken_gpt2()
    enc.encode_ordinary(text[:10000])  # warm up the regex
    rows = []
    for r in range(repeats):
        t0 = time.perf_counter()
        ref = enc.encode_ordinary(text)
        t_tt = time.perf_counter() - t0
        tok = bpe.load_gpt2()  # fresh tokenizer: empty chunk cache
        bpe.get_splitter(tok.pattern)("warm up: build the character classes")
        t0 = time.perf_counter()
        ids = tok.encode_ordinary(text)
        t_cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        ids2 = tok.encode_ordinary(text)
        t_warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        bpe.get_splitter(tok.pattern)(text)
        t_split = time.perf_counter() - t0
        assert ids == ref == ids2, "ids differ from tiktoken"
        rows.append((t_tt, t_cold, t_warm, t_split))
    print(f"### Encoding {Path(path).name} ({mb:.2f} MB, {len(ref):,} GPT-2 tokens), ids identical to tiktoken\n")
    print("| run | tiktoken 1 thread | bpe.py cold cache | bpe.py warm cache | (bpe.py regex split alone) | cold / tiktoken speed |")
    print("|---|---|---|---|---|---|")
    for r, (a, b, c, d) in enumerate(rows):
        print(f"| {r + 1} | {a:.2f} s ({mb / a:.1f} MB/s) | {b:.2f} s ({mb / b:.1f} MB/s) | "
              f"{c:.2f} s ({mb / c:.1f} MB/s) | {d:.2f} s | {a / b:.2f}x |")
    best = [min(col) for col in zip(*rows)]
    print(f"\nbest of {repeats}: tiktoken {mb / best[0]:.1f} MB/s, bpe.py cold {mb / best[1]:.1f} MB/s "
          f"({best[0] / best[1]:.2f}x tiktoken), warm {mb / best[2]:.1f} MB/s ({best[0] / best[2]:.2f}x)\n")


def _hf_train(train_path, vocab_size, out_json):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t0 = time.perf_counter()
    tk.train([str(train_path)], trainer)
    dt = time.perf_counter() - t0
    tk.save(str(out_json))
    print(json.dumps({"seconds": dt, "vocab": tk.get_vocab_size()}))


def bench_train(path, vocab_size, workdir):
    text = Path(path).read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    cut = text.index("\n", cut) + 1
    train, held = text[:cut], text[cut:]
    workdir.mkdir(parents=True, exist_ok=True)
    train_path = workdir / "train90.txt"
    train_path.write_text(train, encoding="utf-8")
    held_bytes = len(held.encode("utf-8"))
    rows = []
    for threads in (None, "1"):  # HF in a fresh process each: its thread pool is fixed at start
        env = dict(os.environ)
        if threads:
            env["RAYON_NUM_THREADS"] = threads
        out = workdir / f"hf_{threads or 'default'}.json"
        res = subprocess.run([sys.executable, __file__, "hf-train", "--file", str(train_path), "--vocab-size",
                              str(vocab_size), "--out", str(out)], env=env, capture_output=True, text=True, check=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        from tokenizers import Tokenizer as HFTokenizer
        hf = HFTokenizer.from_file(str(out))
        n = len(hf.encode(held).ids)
        label = f"HF tokenizers {'RAYON_NUM_THREADS=1' if threads else f'default threads ({os.cpu_count()} cores)'}"
        rows.append((label, r["seconds"], None, held_bytes / n, r["vocab"]))
    for processes in (1, 2):
        t0 = time.perf_counter()
        tok = bpe.Tokenizer("gpt2").train([train_path], vocab_size, processes=processes)
        dt = time.perf_counter() - t0
        s = tok.train_stats
        n = len(tok.encode_ordinary(held))
        rows.append((f"bpe.py processes={processes}", dt, s, held_bytes / n, len(tok.vocab)))
    hf_best = min(r[1] for r in rows[:2])
    hf_bpt = rows[0][3]
    print(f"### Training a {vocab_size:,}-token tokenizer on 90% of {Path(path).name} "
          f"({len(train.encode()) / 1e6:.2f} MB), GPT-2 split pattern\n")
    print(f"bytes/token measured on the held-out 10% ({held_bytes / 1e6:.2f} MB). bpe.py phases: counting unique "
          f"chunks / merge loop.\n")
    print("| trainer | time | phases | vs fastest HF | held-out bytes/token | vs HF (default threads) |")
    print("|---|---|---|---|---|---|")
    for label, dt, s, bpt, v in rows:
        phases = f"{s['count_s']:.1f} s / {s['merge_s']:.1f} s ({s['unique_chunks']:,} unique chunks)" if s else ""
        print(f"| {label} | {dt:.2f} s | {phases} | {dt / hf_best:.2f}x | {bpt:.4f} | {100 * (bpt / hf_bpt - 1):+.2f}% |")
    print()


def make_scaling_file(src, dst, target_mb, seed=0):
    """Concatenate copies of src, each with ~0.5% of its ASCII letters replaced by random lowercase
    letters (a different random set per copy), so that the number of unique chunks keeps growing."""
    data = np.frombuffer(Path(src).read_bytes(), dtype=np.uint8)
    letters = np.flatnonzero(((data >= 65) & (data <= 90)) | ((data >= 97) & (data <= 122)))
    rng = np.random.default_rng(seed)
    with open(dst, "wb") as f:
        written = 0
        while written < target_mb * 1e6:
            copy = data.copy()
            pick = rng.choice(letters, size=len(letters) // 200, replace=False)
            copy[pick] = rng.integers(97, 123, size=len(pick), dtype=np.uint8)
            f.write(copy.tobytes())
            written += len(copy)
    return written


def _scale_run(path, vocab_size, processes):
    t0 = time.perf_counter()
    tok = bpe.Tokenizer("gpt2").train([path], vocab_size, processes=processes)
    dt = time.perf_counter() - t0
    s = dict(tok.train_stats, total_s=dt,
             rss_parent_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
             rss_child_mb=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    print(json.dumps(s))


def bench_scale(src, target_mb, vocab_size, workdir):
    workdir.mkdir(parents=True, exist_ok=True)
    big = workdir / f"scale_{target_mb}mb.txt"
    if not big.exists():
        make_scaling_file(src, big, target_mb)
    size = big.stat().st_size / 1e6
    print(f"### Training {vocab_size:,} tokens on a {size:.0f} MB generated file\n")
    print(f"The file: copies of {Path(src).name}, each with 0.5% of its ASCII letters replaced at random "
          f"(bench_bpe.make_scaling_file), so unique chunks keep growing. Each run in a fresh process; peak RSS "
          f"from getrusage (parent, and the largest worker).\n")
    print("| processes | counting | merge loop | total | unique chunks | peak RSS parent | peak RSS worker |")
    print("|---|---|---|---|---|---|---|")
    for p in (1, 2):
        res = subprocess.run([sys.executable, __file__, "scale-run", "--file", str(big), "--vocab-size",
                              str(vocab_size), "--processes", str(p)], capture_output=True, text=True, check=True)
        s = json.loads(res.stdout.strip().splitlines()[-1])
        worker = f"{s['rss_child_mb']:,.0f} MB" if p > 1 else "(no workers)"
        print(f"| {p} | {s['count_s']:.1f} s | {s['merge_s']:.1f} s | {s['total_s']:.1f} s | {s['unique_chunks']:,} "
              f"| {s['rss_parent_mb']:,.0f} MB | {worker} |")
    print()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["encode", "train", "scale", "all", "hf-train", "scale-run"])
    p.add_argument("--file", default=str(DEFAULT_FILE))
    p.add_argument("--vocab-size", type=int, default=16384)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--scale-mb", type=int, default=200)
    p.add_argument("--scale-vocab-size", type=int, default=16384)
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--out")
    p.add_argument("--workdir", default="/tmp/bench_bpe")
    a = p.parse_args()
    if not Path(a.file).is_file():
        sys.exit(f"{a.file} not found: pass --file with a large UTF-8 text")
    workdir = Path(a.workdir)
    if a.what == "hf-train":
        return _hf_train(a.file, a.vocab_size, a.out)
    if a.what == "scale-run":
        return _scale_run(a.file, a.vocab_size, a.processes)
    if a.what in ("encode", "all"):
        bench_encode(a.file, a.repeats)
    if a.what in ("train", "all"):
        bench_train(a.file, a.vocab_size, workdir)
    if a.what in ("scale", "all"):
        bench_scale(a.file, a.scale_mb, a.scale_vocab_size, workdir)


if __name__ == "__main__":
    main()
