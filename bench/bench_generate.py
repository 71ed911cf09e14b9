"""Benchmarks for generate.py, each a subcommand, printing markdown tables (ratios come from one process).

    python bench/bench_generate.py hf        # gpt2 (124M) shape, batch 1, greedy: ours vs transformers generate
    python bench/bench_generate.py cache     # KV cache vs recompute at 200 and 800 new tokens
    python bench/bench_generate.py batch     # throughput at batch 1, 8, 32
    python bench/bench_generate.py compile   # eager vs torch.compile'd decode step (CUDA graphs on a GPU)
    python bench/bench_generate.py train     # trains the Shakespeare draft and target for `spec` (minutes)
    python bench/bench_generate.py spec      # speculative decoding: speedup and acceptance for k = 2..7

No GPT-2 weights are needed: the 124M-shaped models are random-init, written with save_pretrained and
loaded by both our GPT and transformers' GPT2LMHeadModel (the same weights; speed does not depend on them).
The speculative pair is trained here on tiny Shakespeare, character level (see `train`).
"""

import argparse
import math
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import generate as G  # noqa: E402
from gpt2 import GPT, GPTConfig, load_checkpoint, save_checkpoint  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def machine():
    return (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads" + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))


def timed(fn, repeats):
    """Best of `repeats` wall times (the machine is shared: the minimum is the least disturbed run)."""
    best, out = math.inf, None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best, out


SHAPES = {"gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
          "mini": dict(n_layer=6, n_head=6, n_embd=384)}  # 30M, for runs where 124M would take too long


def gpt2_dir(args):
    """A random-init model of the chosen shape (GPT-2 vocabulary, 1024 context) in HF layout, made once."""
    path = os.path.join(args.out, f"{args.shape}-random")
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        torch.manual_seed(0)
        GPT(GPTConfig(**SHAPES[args.shape])).save_pretrained(path)
    return path


def load_pair(args, dtype):
    from transformers import GPT2LMHeadModel
    path = gpt2_dir(args)
    ours = GPT.from_pretrained(path).to(args.device, dtype).eval()
    hf = GPT2LMHeadModel.from_pretrained(path, dtype=dtype).to(args.device).eval()
    return ours, hf


def prompt(n, batch=1, vocab=50257, seed=0):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------


def bench_hf(args):
    print(f"### {args.shape} shape {SHAPES[args.shape]} batch 1, prompt 16, {args.new} new tokens, greedy, {args.device} ({machine()})\n")
    print("| dtype | ours tok/s | transformers tok/s | ours / HF | identical tokens |\n|---|---|---|---|---|")
    for name in args.dtypes:
        dtype = DTYPES[name]
        ours, hf = load_pair(args, dtype)
        idx = prompt(16).to(args.device)
        run_ours = lambda: G.generate(ours, idx, args.new, temperature=0)
        run_hf = lambda: hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=args.new,
                                     do_sample=False, pad_token_id=0, eos_token_id=None)
        run_ours(), run_hf()  # warm-up
        t_ours, a, t_hf, b = math.inf, None, math.inf, None
        for _ in range(args.repeats):  # interleaved so a busy spell on the shared machine hits both
            t, a = timed(run_ours, 1)
            t_ours = min(t_ours, t)
            t, b = timed(run_hf, 1)
            t_hf = min(t_hf, t)
        assert a.shape == b.shape == (1, 16 + args.new), (a.shape, b.shape)
        same = torch.equal(a, b)
        agree = (a[0, 16:] == b[0, 16:]).float().mean().item()
        print(f"| {name} | {args.new / t_ours:.1f} | {args.new / t_hf:.1f} | {t_hf / t_ours:.2f}x | "
              f"{'yes' if same else f'no ({agree:.0%} of positions)'} |", flush=True)


def bench_cache(args):
    dtype = DTYPES[args.dtypes[0]]
    ours, _ = load_pair(args, dtype)
    print(f"### KV cache vs recompute, {args.shape} shape {SHAPES[args.shape]} batch 1, prompt 16, greedy, {args.dtypes[0]}, "
          f"{args.device} ({machine()})\n")
    print("| new tokens | cache tok/s | no cache tok/s | speedup | identical |\n|---|---|---|---|---|")
    idx = prompt(16).to(args.device)
    G.generate(ours, idx, 2, temperature=0)  # warm-up
    for n in args.lengths:
        t_c, a = timed(lambda: G.generate(ours, idx, n, temperature=0), args.repeats)
        t_n, b = timed(lambda: G.generate(ours, idx, n, temperature=0, use_cache=False), 1)
        print(f"| {n} | {n / t_c:.1f} | {n / t_n:.1f} | {t_n / t_c:.2f}x | {'yes' if torch.equal(a, b) else 'no'} |",
              flush=True)


def bench_batch(args):
    dtype = DTYPES[args.dtypes[0]]
    ours, hf = load_pair(args, dtype)
    print(f"### Throughput, {args.shape} shape {SHAPES[args.shape]}, prompts of 8..32 tokens left-padded, {args.new} new tokens, greedy, "
          f"{args.dtypes[0]}, {args.device} ({machine()})\n")
    print("| batch | ours tok/s | transformers tok/s | ours / HF | identical |\n|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for B in args.batches:
        lens = torch.randint(8, 33, (B,), generator=g).tolist()
        idx, mask = G.left_pad([torch.randint(0, 50257, (n,), generator=g).tolist() for n in lens])
        idx, mask = idx.to(args.device), mask.to(args.device)
        run_ours = lambda: G.generate(ours, idx, args.new, temperature=0, attention_mask=mask)
        run_hf = lambda: hf.generate(idx, attention_mask=mask, max_new_tokens=args.new,
                                     do_sample=False, pad_token_id=0, eos_token_id=None)
        G.generate(ours, idx, 2, temperature=0, attention_mask=mask)  # warm-up both: first calls pay one-off costs
        hf.generate(idx, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0, eos_token_id=None)
        t_o, a = timed(run_ours, args.repeats)
        t_h, b = timed(run_hf, args.repeats)
        print(f"| {B} | {B * args.new / t_o:.1f} | {B * args.new / t_h:.1f} | {t_h / t_o:.2f}x | "
              f"{'yes' if torch.equal(a, b) else 'no'} |", flush=True)


def bench_compile(args):
    dtype = DTYPES[args.dtypes[0]]
    ours, _ = load_pair(args, dtype)
    idx = prompt(16).to(args.device)
    print(f"### Compiled decode step, {args.shape} shape {SHAPES[args.shape]} batch 1, {args.new} new tokens, greedy, {args.dtypes[0]}, "
          f"{args.device} ({machine()})\n")
    G.generate(ours, idx, 2, temperature=0)  # warm-up
    t_e, a = timed(lambda: G.generate(ours, idx, args.new, temperature=0), args.repeats)
    t0 = time.perf_counter()
    G.generate(ours, idx, args.new, temperature=0, compile=True)  # compiles (and recompiles once, see below)
    t_first = time.perf_counter() - t0
    t_c, b = timed(lambda: G.generate(ours, idx, args.new, temperature=0, compile=True), args.repeats)
    print("| decode step | tok/s | first call (incl. compile) s | identical |\n|---|---|---|---|")
    print(f"| eager | {args.new / t_e:.1f} | | |")
    print(f"| torch.compile | {args.new / t_c:.1f} | {t_first:.1f} | {'yes' if torch.equal(a, b) else 'no'} |")


# -----------------------------------------------------------------------------
# Speculative decoding on a pair trained here


SPEC_MODELS = {  # character-level tiny Shakespeare; sizes chosen so both train in minutes on 2 CPU cores
    "target": dict(n_layer=4, n_head=4, n_embd=256, block_size=256),
    "draft": dict(n_layer=2, n_head=2, n_embd=64, block_size=256),
}


def shakespeare(args):
    text = open(os.path.join(os.path.dirname(__file__), "..", "data", "tinyshakespeare.txt")).read()
    chars = "".join(sorted(set(text)))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    n = int(0.9 * len(data))
    return chars, data[:n], data[n:]


@torch.no_grad()
def val_loss(model, val, T=256, batches=20):
    g = torch.Generator().manual_seed(0)
    ix = torch.randint(0, len(val) - T - 1, (batches,), generator=g)
    x = torch.stack([val[i:i + T] for i in ix])
    y = torch.stack([val[i + 1:i + T + 1] for i in ix])
    return model.eval()(x, y)[1].item()


def train(args):
    """A minimal AdamW loop: batch x 128 characters, warmup then cosine learning rate, for a wall-clock budget
    (steps, not tokens, are what a 2-core CPU is short of, so the batch is small)."""
    chars, tr, val = shakespeare(args)
    for name in args.which:
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=len(chars), **SPEC_MODELS[name]))
        opt = model.configure_optimizer(0.1, args.lr)
        budget, t0, step = args.minutes[name] * 60, time.time(), 0
        while time.time() - t0 < budget:
            lr = args.lr * min(1.0, (step + 1) / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (time.time() - t0) / budget))))
            for gr in opt.param_groups:
                gr["lr"] = lr
            ix = torch.randint(0, len(tr) - 129, (args.batch_size,))
            x, y = torch.stack([tr[i:i + 128] for i in ix]), torch.stack([tr[i + 1:i + 129] for i in ix])
            loss = model.train()(x, y)[1]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % 100 == 0:
                print(f"{name} step {step} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
        vl = val_loss(model, val)
        print(f"{name}: {model.num_params() / 1e6:.2f}M params, {step} steps in {time.time() - t0:.0f}s, "
              f"val loss {vl:.3f}", flush=True)
        save_checkpoint(os.path.join(args.out, f"shakespeare-{name}.pt"), model, vocab=chars, steps=step,
                        val_loss=vl)


def bench_spec(args):
    paths = [os.path.join(args.out, f"shakespeare-{n}.pt") for n in ("target", "draft")]
    if not all(os.path.exists(p) for p in paths):
        sys.exit(f"no trained pair in {args.out}: run `python bench/bench_generate.py train` first")
    target, draft = (GPT.from_pretrained(p).to(args.device).eval() for p in paths)
    ckpt = load_checkpoint(paths[0])
    chars = ckpt["vocab"]
    _, _, val = shakespeare(args)
    prompts = [val[i:i + 32][None].to(args.device) for i in (0, 20000, 40000, 60000)]  # 32 + 200 <= 256
    n = args.new
    shape = lambda m: f"{m.config.n_layer}L/{m.config.n_embd}d ({m.num_params() / 1e6:.2f}M)"
    dckpt = load_checkpoint(paths[1])
    print(f"### Speculative decoding, char-level Shakespeare: target {shape(target)}, val loss "
          f"{ckpt['val_loss']:.2f} after {ckpt['steps']} steps; draft {shape(draft)}, val loss {dckpt['val_loss']:.2f} "
          f"after {dckpt['steps']} steps; batch 1, {len(prompts)} prompts of 32 characters x {n} new, {args.device} "
          f"({machine()})\n")
    for mode, s in (("greedy", G.Sampling(temperature=0)), ("sampled, temperature 0.8", G.Sampling(temperature=0.8))):
        seed = lambda: torch.Generator(args.device).manual_seed(0)
        t_base = timed(lambda: [G.generate(target, p, n, temperature=s.temperature, generator=seed())
                                for p in prompts], args.repeats)[0]
        ref = [G.generate(target, p, n, temperature=0) for p in prompts] if s.greedy else None
        t_draft = timed(lambda: [G.generate(draft, p, n, temperature=s.temperature, generator=seed())
                                 for p in prompts], args.repeats)[0]
        print(f"\n{mode}: target alone {len(prompts) * n / t_base:.1f} tok/s, draft alone "
              f"{len(prompts) * n / t_draft:.1f} tok/s\n")
        print("| k | tok/s | speedup vs target alone | acceptance | tokens per target pass | equals target greedy |")
        print("|---|---|---|---|---|---|")
        for k in args.ks:
            stats, total = {}, {"proposed": 0, "accepted": 0, "target_passes": 0}

            def run():
                for key in total:
                    total[key] = 0
                outs = []
                for p in prompts:
                    outs.append(G.speculative_generate(target, draft, p, n, s, num_draft=k, generator=seed(), stats=stats))
                    for key in total:
                        total[key] += stats[key]
                return outs
            t, outs = timed(run, args.repeats)
            same = "yes" if ref and all(torch.equal(a, b) for a, b in zip(outs, ref)) else ("no" if ref else "n/a")
            print(f"| {k} | {len(prompts) * n / t:.1f} | {t_base / t:.2f}x | {total['accepted'] / total['proposed']:.1%} "
                  f"| {len(prompts) * n / total['target_passes']:.2f} | {same} |", flush=True)
    sample = G.speculative_generate(target, draft, prompts[0], n, G.Sampling(temperature=0.8), num_draft=4,
                                    generator=torch.Generator().manual_seed(0))
    print("\nSample (temperature 0.8, k=4), prompt | continuation:\n\n```\n" +
          "".join(chars[i] for i in sample[0, :32].tolist()) + " | " +
          "".join(chars[i] for i in sample[0, 32:].tolist()) + "\n```")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["hf", "cache", "batch", "compile", "train", "spec"])
    p.add_argument("--out", default="out_generate", help="where models are written (ignored by git)")
    p.add_argument("--shape", default="gpt2", choices=list(SHAPES), help="random-init model shape")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    p.add_argument("--new", type=int, default=200, help="new tokens per generation")
    p.add_argument("--lengths", type=int, nargs="+", default=[200, 800], help="cache: new-token counts")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--ks", type=int, nargs="+", default=[2, 3, 4, 5, 6, 7])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--which", nargs="+", default=["draft", "target"], help="train: which models")
    p.add_argument("--target-minutes", type=float, default=8.0)
    p.add_argument("--draft-minutes", type=float, default=2.5)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=8, help="train: sequences of 128 characters per step")
    args = p.parse_args()
    args.minutes = {"target": args.target_minutes, "draft": args.draft_minutes}
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    {"hf": bench_hf, "cache": bench_cache, "batch": bench_batch, "compile": bench_compile, "train": train,
     "spec": bench_spec}[args.what](args)


if __name__ == "__main__":
    main()
