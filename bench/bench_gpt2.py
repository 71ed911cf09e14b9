"""Benchmark gpt2.py's training step (forward + backward + AdamW) against transformers' GPT2LMHeadModel of
the same size, in the same run, plus parameter counts of the presets. With --gpu: tokens/s and MFU of
GPT-2 124M at T=1024 with bf16 autocast + torch.compile on a CUDA GPU (it stops with an error without one).

    python bench/bench_gpt2.py --steps 8                              # CPU: gpt2 (124M) shape, B=2, T=128
    python bench/bench_gpt2.py --gpu --out bench/results/gpt2_gpu.md  # CUDA: B=16, T=1024, bf16, compile

--out writes the report (date, command, machine, load, results) to a markdown file as well as stdout.
"""

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import gpt2  # noqa: E402
from gpt2 import GPT, GPTConfig  # noqa: E402

# defaults of a plain run and of --gpu; a flag given on the command line wins over both
CPU_DEFAULTS = dict(compile=False, batch_size=2, seq_len=128, steps=6, warmup=2)
GPU_DEFAULTS = dict(compile=True, batch_size=16, seq_len=1024, steps=30, warmup=5)  # + cuda, bfloat16

def param_table():
    rows = ["| preset | layers | heads | width | parameters | non-embedding |", "|---|---|---|---|---|---|"]
    for name in gpt2.PRESETS:
        with torch.device("meta"):
            m = GPT(GPTConfig.from_preset(name))
        c = m.config
        rows.append(f"| {name} | {c.n_layer} | {c.n_head} | {c.n_embd} | {m.num_params(False) / 1e6:.2f}M "
                    f"| {m.num_params() / 1e6:.2f}M |")
    return "\n".join(rows)


def make_step(model, opt, x, y, device, dtype, hf=False):
    """One training step; returns (forward + backward seconds, whole step seconds)."""
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def step():
        sync()
        t0 = time.perf_counter()
        with gpt2.autocast(device, dtype):
            loss = model(x, labels=x).loss if hf else model(x, y)[1]
        loss.backward()
        sync()
        t1 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return t1 - t0, time.perf_counter() - t0
    return step


def median(xs):
    return statistics.median(xs)  # robust to the odd slow step on a shared machine


def groups(model):
    ps = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("what to run")
    g.add_argument("--gpu", action="store_true",
                   help="the GPU measurement: --device cuda --dtype bfloat16 " + ", ".join(f"{k}={v}" for k, v in GPU_DEFAULTS.items()))
    g.add_argument("--model", default="gpt2", choices=list(gpt2.PRESETS), help="architecture preset to time")
    g.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 2; --gpu 16)")
    g.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 128; --gpu 1024)")
    g.add_argument("--steps", type=int, default=None, help="timed steps per contender (default 6; --gpu 30)")
    g.add_argument("--warmup", type=int, default=None, help="untimed steps first, compile included (default 2; --gpu 5)")
    g.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    g.add_argument("--out", default=None, help="also write the report to this markdown file")
    gpt2.add_common_args(ap)
    ap.set_defaults(compile=None)  # None = not given: --gpu turns it on, otherwise off
    args = ap.parse_args(argv)
    for k, v in (GPU_DEFAULTS if args.gpu else CPU_DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.gpu:
        if args.device not in ("auto", "cuda"):
            ap.error(f"--gpu runs on CUDA; drop --device {args.device} (or drop --gpu for a {args.device} run)")
        if not torch.cuda.is_available():
            raise SystemExit(f"bench_gpt2.py: --gpu needs a CUDA GPU, and torch {torch.__version__} sees none "
                             f"(torch.cuda.is_available() is False); run it on a GPU machine, or drop --gpu for "
                             f"a CPU run: python bench/bench_gpt2.py --steps 8")
        args.device, args.dtype = "cuda", "bfloat16" if args.dtype == "auto" else args.dtype
    return args


def machine_line(device, dtype, compile):
    if device == "cuda":
        where = (f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), "
                 f"{os.cpu_count()} cpus")
    else:
        where = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus"
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    load = f", load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}" if load else ""
    return (f"machine: {where}, torch {torch.__version__}, device {device}, dtype {dtype}, compile {compile}{load}")


def main(argv=None):
    args = parse_args(argv)
    try:
        device = gpt2.pick_device(args.device)
    except ValueError as e:
        raise SystemExit(f"bench_gpt2.py: {e}") from None
    dtype = gpt2.pick_dtype(args.dtype, device)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as train_gpt2.py
    lines = []

    def report(text=""):
        print(text, flush=True)
        lines.append(text)

    report("# gpt2.py training-step benchmark\n")
    report(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  ")
    report(f"command: `python {shlex.join(sys.argv if argv is None else ['bench/bench_gpt2.py', *argv])}`  ")
    report(machine_line(device, dtype, args.compile) + "\n")
    report(param_table() + "\n")

    B, T = args.batch_size, args.seq_len
    torch.manual_seed(0)
    vocab = 50304 if device == "cuda" else 50257  # a multiple of 128 feeds the GPU's tensor cores better
    cfg = GPTConfig.from_preset(args.model, vocab_size=vocab, block_size=max(1024, T))
    ours = GPT(cfg).to(device)
    opt = ours.configure_optimizer(0.1, 6e-4, device_type=device)
    x = torch.randint(0, 50257, (B, T), device=device)
    y = torch.randint(0, 50257, (B, T), device=device)
    steps = {"gpt2.py": make_step(gpt2.maybe_compile(ours, args.compile), opt, x, y, device, dtype)}
    if not args.no_hf:
        import transformers
        hc = transformers.GPT2Config(n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                                     n_head=cfg.n_head, vocab_size=vocab, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
        hf = transformers.GPT2LMHeadModel(hc).to(device)
        hf_opt = torch.optim.AdamW(groups(hf), lr=6e-4, betas=(0.9, 0.95), fused=True)  # same optimizer as ours
        steps["transformers"] = make_step(gpt2.maybe_compile(hf, args.compile), hf_opt, x, None, device, dtype, hf=True)

    for step in steps.values():  # warm up (and compile) every contender before any timing
        for _ in range(args.warmup):
            step()
    # interleave the contenders, a few steps at a time, so background load hits both alike
    results = {k: [] for k in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            results[name].append(step())
    flops = ours.flops_per_token(T)
    peak = gpt2.peak_flops(device)
    report(f"training step, {args.model} shape, B={B}, T={T} ({B * T} tokens), fp32 AdamW (fused) for both, "
           f"median of {args.steps} interleaved steps after {args.warmup} warm-up step(s)\n")
    report("| implementation | forward + backward | whole step | tokens/s | MFU |\n|---|---|---|---|---|")
    med, fb = {}, {}
    for name, ts in results.items():
        fb[name], med[name] = median([t[0] for t in ts]), median([t[1] for t in ts])
        tps = B * T / med[name]
        mfu = f"{tps * flops / peak:.1%}" if peak else "n/a"
        report(f"| {name} | {fb[name] * 1000:.0f} ms | {med[name] * 1000:.0f} ms | {tps:,.0f} | {mfu} |")
    if peak:
        report(f"\nMFU = tokens/s x {flops / 1e9:.3f} GFLOPs per token (6N + 12 L H Q T) / {peak / 1e12:.0f} "
               f"TFLOPS (dense bf16 peak of this GPU)")
    if device == "cuda":
        report(f"peak GPU memory allocated: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB (all contenders)")
    if "transformers" in med:
        report(f"\nratio gpt2.py / transformers: whole step {med['gpt2.py'] / med['transformers']:.3f}, "
               f"forward + backward {fb['gpt2.py'] / fb['transformers']:.3f} (<= 1.0 means gpt2.py is no slower)")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
