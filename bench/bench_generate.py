"""Benchmarks for generate.py, each a subcommand, printing markdown tables (ratios come from one process).

    python bench/bench_generate.py hf        # gpt2 (124M) shape, batch 1, greedy: ours vs transformers generate
    python bench/bench_generate.py cache     # KV cache vs recompute at 200 and 800 new tokens
    python bench/bench_generate.py batch     # throughput at batch 1, 8, 32
    python bench/bench_generate.py compile   # eager vs torch.compile'd decode step (CUDA graphs on a GPU)
    python bench/bench_generate.py train     # trains the Shakespeare draft and target for `spec` (minutes)
    python bench/bench_generate.py spec      # speculative decoding: speedup and acceptance for k = 2..7
    python bench/bench_generate.py verify    # what checking k + 1 tokens costs the target vs one step
    python bench/bench_generate.py layout    # one token's block matmuls: nn.Linear's (out, in) weights vs
                                             # transformers' GPT-2 Conv1D (in, out), the gap in `hf` at batch 1
    python bench/bench_generate.py gpu       # on a CUDA machine: hf, cache, compile and spec in one go,
                                             # written to bench/results/generate_gpu.md

On a GPU machine, the whole GPU table (training the speculative pair takes a few minutes there; without
it the spec section runs random-weight models of the same shapes and its heading says so):

    python bench/bench_generate.py train && python bench/bench_generate.py gpu

No GPT-2 weights are needed: the 124M-shaped models are random-init, written with save_pretrained and
loaded by both our GPT and transformers' GPT2LMHeadModel (the same weights; speed does not depend on them).
The speculative pair is trained here by train_gpt2.py on tiny Shakespeare (see `train`; ~45 minutes on 2 cores).
"""

import argparse
import contextlib
import datetime
import io
import math
import os
import platform
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import generate as G  # noqa: E402
from gpt2 import GPT, GPTConfig, MetricsLog  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine():
    return (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads" + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))


def timed(fn, repeats):
    """Best of `repeats` wall times: the minimum is the run least disturbed by other work on the machine."""
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


def hf_greedy(hf, idx, mask, n):
    """transformers' generate, greedy, never stopping early: the same work as G.generate(..., G.GREEDY)."""
    return hf.generate(idx, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)


def prompt(n, batch=1, vocab=50257, seed=0):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


def heading(args, what, dtype_name):
    """The '### ...' line over a table of the 124M-shaped (or mini) random-init model."""
    return f"### {what}, {args.shape} shape {SHAPES[args.shape]}, {dtype_name}, {args.device} ({machine()})\n"


# -----------------------------------------------------------------------------


def bench_hf(args):
    print(heading(args, f"Ours vs transformers, batch 1, prompt 16, {args.new} new tokens, greedy", "fp32 / bf16"))
    print("| dtype | ours tok/s | transformers tok/s | ours / HF | identical tokens |\n|---|---|---|---|---|")
    for name in args.dtypes:
        ours, hf = load_pair(args, DTYPES[name])
        idx = prompt(16).to(args.device)
        run_ours = lambda: G.generate(ours, idx, args.new, G.GREEDY)
        run_hf = lambda: hf_greedy(hf, idx, torch.ones_like(idx), args.new)
        run_ours(), run_hf()  # warm-up
        t_ours, a, t_hf, b = math.inf, None, math.inf, None
        for _ in range(args.repeats):  # interleaved so a busy spell on the machine hits both
            t, a = timed(run_ours, 1)
            t_ours = min(t_ours, t)
            t, b = timed(run_hf, 1)
            t_hf = min(t_hf, t)
        assert a.shape == b.shape == (1, 16 + args.new), (a.shape, b.shape)
        same = torch.equal(a, b)
        agree = (a[0, 16:] == b[0, 16:]).float().mean().item()
        print(f"| {name} | {args.new / t_ours:.1f} | {args.new / t_hf:.1f} | {t_hf / t_ours:.2f}x | "
              f"{'yes' if same else f'no ({agree:.0%} of positions)'} |", flush=True)


def bench_layout(args):
    """One decode step's block matmuls (q/k/v, attention out, MLP in and out, per layer) at batch 1, alone:
    with gpt2.py's nn.Linear weights, (out, in) read as W.T, and with transformers' GPT-2 Conv1D weights,
    (in, out) read as they lie. Same numbers of bytes; what differs is the BLAS kernel each layout gets."""
    C, L = SHAPES[args.shape]["n_embd"], SHAPES[args.shape]["n_layer"]
    print(heading(args, "One token's block matmuls at batch 1: nn.Linear (out, in) vs Conv1D (in, out) weights",
                  "fp32 / bf16"))
    print("| dtype | nn.Linear ms | Conv1D ms | Linear / Conv1D time |\n|---|---|---|---|")
    for name in args.dtypes:
        dt = DTYPES[name]
        shapes = [(3 * C, C), (C, C), (4 * C, C), (C, 4 * C)] * L  # (out, in)
        lin = [torch.randn(o, i, dtype=dt, device=args.device) for o, i in shapes]
        conv = [w.t().contiguous() for w in lin]
        bias = [torch.zeros(o, dtype=dt, device=args.device) for o, _ in shapes]
        xs = {i: torch.randn(1, i, dtype=dt, device=args.device) for i in (C, 4 * C)}
        run_lin = lambda: [torch.nn.functional.linear(xs[w.shape[1]], w, b) for w, b in zip(lin, bias)]
        run_conv = lambda: [torch.addmm(b, xs[w.shape[0]], w) for w, b in zip(conv, bias)]
        run_lin(), run_conv()  # warm-up
        t_lin, t_conv = math.inf, math.inf
        for _ in range(args.repeats):  # interleaved, best of each
            t_lin = min(t_lin, timed(lambda: [run_lin() for _ in range(10)], 1)[0] / 10)
            t_conv = min(t_conv, timed(lambda: [run_conv() for _ in range(10)], 1)[0] / 10)
        print(f"| {name} | {t_lin * 1e3:.2f} | {t_conv * 1e3:.2f} | {t_lin / t_conv:.2f}x |", flush=True)


def bench_cache(args, dtype_name=None):
    dtype_name = dtype_name or args.dtypes[0]
    ours, _ = load_pair(args, DTYPES[dtype_name])
    print(heading(args, "KV cache vs recompute, batch 1, prompt 16, greedy", dtype_name))
    print("| new tokens | cache tok/s | no cache tok/s | speedup | identical |\n|---|---|---|---|---|")
    idx = prompt(16).to(args.device)
    G.generate(ours, idx, 2, G.GREEDY)  # warm-up, of both paths
    G.generate(ours, idx, 2, G.GREEDY, use_cache=False)
    for n in args.lengths:  # the same number of runs each (the best is kept)
        t_c, a = timed(lambda: G.generate(ours, idx, n, G.GREEDY), args.repeats)
        t_n, b = timed(lambda: G.generate(ours, idx, n, G.GREEDY, use_cache=False), args.repeats)
        print(f"| {n} | {n / t_c:.1f} | {n / t_n:.1f} | {t_n / t_c:.2f}x | {'yes' if torch.equal(a, b) else 'no'} |",
              flush=True)


def bench_batch(args):
    ours, hf = load_pair(args, DTYPES[args.dtypes[0]])
    print(heading(args, f"Throughput, prompts of 8..32 tokens left-padded, {args.new} new tokens, greedy", args.dtypes[0]))
    print("| batch | ours tok/s | transformers tok/s | ours / HF | identical |\n|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for B in args.batches:
        lens = torch.randint(8, 33, (B,), generator=g).tolist()
        idx, mask = G.left_pad([torch.randint(0, 50257, (n,), generator=g).tolist() for n in lens])
        idx, mask = idx.to(args.device), mask.to(args.device)
        run_ours = lambda: G.generate(ours, idx, args.new, G.GREEDY, attention_mask=mask)
        G.generate(ours, idx, 2, G.GREEDY, attention_mask=mask)  # warm-up both: first calls pay one-off costs
        hf_greedy(hf, idx, mask, 2)
        t_o, a = timed(run_ours, args.repeats)
        t_h, b = timed(lambda: hf_greedy(hf, idx, mask, args.new), args.repeats)
        print(f"| {B} | {B * args.new / t_o:.1f} | {B * args.new / t_h:.1f} | {t_h / t_o:.2f}x | "
              f"{'yes' if torch.equal(a, b) else 'no'} |", flush=True)


def bench_compile(args, dtype_name=None):
    dtype_name = dtype_name or args.dtypes[0]
    ours, _ = load_pair(args, DTYPES[dtype_name])
    idx = prompt(16).to(args.device)
    graphs = " (mode reduce-overhead: CUDA graphs)" if args.device.startswith("cuda") else ""
    print(heading(args, f"Compiled decode step{graphs}, batch 1, {args.new} new tokens, greedy", dtype_name))
    G.generate(ours, idx, 2, G.GREEDY)  # warm-up
    t_e, a = timed(lambda: G.generate(ours, idx, args.new, G.GREEDY), args.repeats)
    t0 = time.perf_counter()
    G.generate(ours, idx, args.new, G.GREEDY, compile=True)  # the first call compiles
    t_first = time.perf_counter() - t0
    t_c, b = timed(lambda: G.generate(ours, idx, args.new, G.GREEDY, compile=True), args.repeats)
    print("| decode step | tok/s | first call (incl. compile) s | identical |\n|---|---|---|---|")
    print(f"| eager | {args.new / t_e:.1f} | | |")
    print(f"| torch.compile | {args.new / t_c:.1f} | {t_first:.1f} | {'yes' if torch.equal(a, b) else 'no'} |", flush=True)


# -----------------------------------------------------------------------------
# Speculative decoding on a pair trained here


# The speculative pair, both trained by train_gpt2.py on the bundled tiny Shakespeare with the GPT-2 tokenizer.
# On a CPU a decode step costs about the bytes of weights it reads (the 50,257-row embedding included), so the
# draft is kept narrow; the target is as large as trains in ~40 minutes on 2 cores (about 2 epochs).
SPEC_SHAPES = {"target": dict(n_layer=12, n_head=8, n_embd=512), "draft": dict(n_layer=2, n_head=2, n_embd=64)}
SPEC_TRAIN_FLAGS = {"target": ["--lr", "1e-3", "--dropout", "0.1"], "draft": []}
SPEC_BLOCK_SIZE = 256  # train_gpt2.py's shakespeare preset


def train(args):
    """Runs train_gpt2.py once per model (the commands are printed); checkpoints land in <out>/<name>/."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "train_gpt2.py")
    for name in args.which:
        shape = [f for k, v in SPEC_SHAPES[name].items() for f in (f"--{k.replace('_', '-')}", str(v))]
        cmd = [sys.executable, script, "--rope", *shape, *SPEC_TRAIN_FLAGS[name], "--max-steps", str(args.spec_steps),
               "--eval-interval", "100", "--out-dir", os.path.join(args.out, name)]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True)


def last_val_loss(run_dir):
    step, loss = [(r["step"], r["val_loss"]) for r in MetricsLog.read(run_dir) if "val_loss" in r][-1]
    return f"val loss {loss:.3f} after {step} steps"


def spec_pair(args, pair):
    """(target, draft, prompts, description). pair: trained (what `train` wrote to <out>/target and
    <out>/draft), random (random-init models of the same shapes), or auto (trained if there, else random)."""
    dirs = [os.path.join(args.out, n) for n in ("target", "draft")]
    trained = all(os.path.exists(os.path.join(d, "ckpt.pt")) for d in dirs)
    if pair == "trained" and not trained:
        sys.exit(f"no trained pair in {args.out}/target and {args.out}/draft: run `python bench/bench_generate.py "
                 f"train --out {args.out}` first (or pass --pair random for random-weight models)")
    shape = lambda m: f"{m.config.n_layer}L/{m.config.n_embd}d ({m.num_params() / 1e6:.1f}M)"
    if trained and pair != "random":
        from train_gpt2 import read_shard, resolve_data
        target, draft = (GPT.from_pretrained(os.path.join(d, "ckpt.pt")).to(args.device).eval() for d in dirs)
        val = torch.from_numpy(read_shard(resolve_data("shakespeare", 0)[1][0]).astype("int64"))
        prompts = [val[i:i + 32][None].to(args.device) for i in (0, 8000, 16000, 24000)]  # 32 + 200 <= 256
        return target, draft, prompts, (
            f"tiny Shakespeare, GPT-2 tokens, both trained by train_gpt2.py: target {shape(target)}, "
            f"{last_val_loss(dirs[0])}; draft {shape(draft)}, {last_val_loss(dirs[1])}; 4 validation prompts")
    torch.manual_seed(0)
    target, draft = (GPT(GPTConfig(block_size=SPEC_BLOCK_SIZE, pos_emb="rope", **SPEC_SHAPES[n])).to(args.device).eval()
                     for n in ("target", "draft"))
    prompts = [prompt(32, seed=i).to(args.device) for i in range(4)]
    return target, draft, prompts, (
        f"RANDOM-WEIGHT target {shape(target)} and draft {shape(draft)} (no trained pair used): the costs are "
        f"real, the acceptance rates say nothing about trained models; 4 random prompts")


def bench_spec(args, pair=None):
    target, draft, prompts, what = spec_pair(args, pair or args.pair or "trained")
    n = args.new
    print(f"### Speculative decoding, {what} of 32 tokens x {n} new, batch 1, {args.device} ({machine()})\n")
    seed = lambda: torch.Generator(args.device).manual_seed(0)
    for mode, s in (("greedy", G.GREEDY), ("sampled, temperature 0.8", G.Sampling(temperature=0.8))):
        t_base = timed(lambda: [G.generate(target, p, n, s, generator=seed()) for p in prompts], args.repeats)[0]
        ref = [G.generate(target, p, n, s) for p in prompts] if s.greedy else None
        t_draft = timed(lambda: [G.generate(draft, p, n, s, generator=seed()) for p in prompts], args.repeats)[0]
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
    if not what.startswith("RANDOM"):
        import bpe
        tok = bpe.load_gpt2()
        sample = G.speculative_generate(target, draft, prompts[0], n, G.Sampling(temperature=0.8), num_draft=4,
                                        generator=seed())
        print("\nSample (temperature 0.8, k=4), prompt | continuation:\n\n```\n" + tok.decode(sample[0, :32].tolist())
              + " | " + tok.decode(sample[0, 32:].tolist()) + "\n```")


@torch.no_grad()
def bench_verify(args):
    """What a speculative check of M tokens costs the spec target, against one decode step; and its lm_head
    as nn.Linear computes it (x @ W.T) vs as gpt2.py computes it on CPU for M > 1 (W @ x.T)."""
    target = GPT.from_pretrained(os.path.join(args.out, "target", "ckpt.pt")).to(args.device).eval()
    W = target.lm_head.weight
    print(f"### Cost of scoring M tokens with the cache, spec target {target.config.n_layer}L/{target.config.n_embd}d, "
          f"100 tokens cached, {args.device} ({machine()})\n")
    print("| M | forward ms | vs M=1 | lm_head as x @ W.T ms | as W @ x.T ms |\n|---|---|---|---|---|")
    cache = target.new_cache(1, 128)
    target(torch.randint(0, W.size(0), (1, 100), device=args.device), cache=cache)
    one = None
    for M in (1, 2, 3, 4, 6, 8):
        idx = torch.randint(0, W.size(0), (1, M), device=args.device)
        x = torch.randn(M, W.size(1), device=args.device)

        def step():
            target(idx, cache=cache)
            cache.crop(100)
        ms = [1e3 * timed(lambda: [f() for _ in range(10)], args.repeats)[0] / 10
              for f in (step, lambda: torch.nn.functional.linear(x, W), lambda: (W @ x.T).T.contiguous())]
        one = one or ms[0]
        print(f"| {M} | {ms[0]:.1f} | {ms[0] / one:.2f}x | {ms[1]:.1f} | {ms[2]:.1f} |", flush=True)


# -----------------------------------------------------------------------------
# The GPU table in one command


class Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self):
        for s in self.streams:
            s.flush()


def write_atomic(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(f"{path}.tmp", "w") as f:
        f.write(text)
    os.replace(f"{path}.tmp", path)


def bench_gpu(args):
    """hf (fp32 and bf16), cache (200 / 800 tokens), compile (eager vs CUDA graphs) for each dtype, and spec
    (k = 2..7): printed, and written to --results after each section so a run cut short keeps what it has."""
    if not torch.cuda.is_available():
        sys.exit("error: `gpu` needs a CUDA GPU, and torch.cuda.is_available() is False here (torch "
                 f"{torch.__version__}); on this machine run the subcommands one by one (hf, cache, compile, spec)")
    if not args.device.startswith("cuda"):
        sys.exit(f"error: `gpu` measures on the GPU; drop --device {args.device}")
    import transformers
    command = "python bench/bench_generate.py " + " ".join(sys.argv[1:])
    text = (f"# generate.py benchmarks on {torch.cuda.get_device_name()}\n\n"
            f"Raw output of `{command}`, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. "
            f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
            f"Python {platform.python_version()}, {os.cpu_count()} CPUs. Models: random init with GPT-2 shapes "
            f"unless a section says otherwise; best of {args.repeats} runs.\n")
    sections = [("hf", lambda: bench_hf(args))]
    sections += [(f"cache, {d}", lambda d=d: bench_cache(args, d)) for d in args.dtypes]
    sections += [(f"compile, {d}", lambda d=d: bench_compile(args, d)) for d in args.dtypes]
    sections += [("spec", lambda: bench_spec(args, args.pair or "auto"))]
    for name, run in sections:
        out = io.StringIO()
        print(f"\n## {name}\n", flush=True)
        with contextlib.redirect_stdout(Tee(sys.stdout, out)):
            run()
        text += f"\n## {name}\n\n{out.getvalue()}"
        write_atomic(args.results, text)
    print(f"\nwritten to {args.results}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["hf", "cache", "batch", "compile", "train", "spec", "verify", "layout", "gpu"],
                   help="which benchmark (see above)")
    g = p.add_argument_group("models and machine")
    g.add_argument("--out", default="out_generate", help="where models are written (ignored by git)")
    g.add_argument("--shape", default="gpt2", choices=list(SHAPES), help="random-init model shape")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu | cuda | mps")
    g.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES),
                   help="hf: every one; cache / batch / compile: the first (gpu: every one)")
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    g = p.add_argument_group("what to measure")
    g.add_argument("--new", type=int, default=200, help="new tokens per generation")
    g.add_argument("--lengths", type=int, nargs="+", default=[200, 800], help="cache: new-token counts")
    g.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="batch: batch sizes")
    g.add_argument("--ks", type=int, nargs="+", default=[2, 3, 4, 5, 6, 7], help="spec: tokens drafted per round")
    g.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the best one counts")
    g = p.add_argument_group("speculative pair")
    g.add_argument("--which", nargs="+", default=["draft", "target"], choices=list(SPEC_SHAPES),
                   help="train: which models")
    g.add_argument("--spec-steps", type=int, default=600, help="train: optimizer steps of 1,024 tokens per model")
    g.add_argument("--pair", choices=["trained", "random", "auto"], default=None,
                   help="spec: the pair `train` wrote (spec's default), random-init models of the same shapes, "
                        "or auto = trained if there, else random (gpu's default)")
    g = p.add_argument_group("gpu")
    g.add_argument("--results", default=os.path.join(RESULTS, "generate_gpu.md"), help="gpu: the results file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    {"hf": bench_hf, "cache": bench_cache, "batch": bench_batch, "compile": bench_compile, "train": train,
     "spec": bench_spec, "verify": bench_verify, "layout": bench_layout, "gpu": bench_gpu}[args.what](args)


if __name__ == "__main__":
    main()
