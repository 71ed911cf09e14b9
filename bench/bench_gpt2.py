"""Benchmark gpt2.py's training step (forward + backward + AdamW) against transformers' GPT2LMHeadModel of
the same size, in the same run, plus parameter counts of the presets. On a CUDA GPU: tokens/s and MFU of
GPT-2 124M at T=1024 with bf16 autocast + torch.compile.

    python bench/bench_gpt2.py                      # CPU: gpt2 (124M) shape, B=2, T=128
    python bench/bench_gpt2.py --batch-size 16 --seq-len 1024 --steps 30   # on a GPU
"""

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import gpt2  # noqa: E402
from gpt2 import GPT, GPTConfig  # noqa: E402


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
    return sorted(xs)[len(xs) // 2]  # robust to the odd slow step on a shared machine


def groups(model):
    ps = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2", choices=list(gpt2.PRESETS))
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    gpt2.add_common_args(ap)
    args = ap.parse_args()
    device = gpt2.pick_device(args.device)
    dtype = gpt2.pick_dtype(args.dtype, device)
    print(f"# gpt2.py training-step benchmark\n\nmachine: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cpus, torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else "")
          + f", dtype {dtype}, compile {args.compile}\n")
    print(param_table() + "\n")

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
    print(f"training step, {args.model} shape, B={B}, T={T} ({B * T} tokens), fp32 AdamW (fused) for both, "
          f"median of {args.steps} interleaved steps\n")
    print("| implementation | forward + backward | whole step | tokens/s | MFU |\n|---|---|---|---|---|")
    med, fb = {}, {}
    for name, ts in results.items():
        fb[name], med[name] = median([t[0] for t in ts]), median([t[1] for t in ts])
        tps = B * T / med[name]
        mfu = f"{tps * flops / peak:.1%}" if peak else "n/a"
        print(f"| {name} | {fb[name] * 1000:.0f} ms | {med[name] * 1000:.0f} ms | {tps:,.0f} | {mfu} |")
    if "transformers" in med:
        print(f"\nratio gpt2.py / transformers: whole step {med['gpt2.py'] / med['transformers']:.3f}, "
              f"forward + backward {fb['gpt2.py'] / fb['transformers']:.3f} (<= 1.0 means gpt2.py is no slower)")


if __name__ == "__main__":
    main()
