"""
Benchmarks of train_gpt2.py: training throughput (tokens/s) and, on a GPU, model FLOPs utilisation.

    python bench/bench_train_gpt2.py                    # CPU: the default run's model and batch (--rope)
    python bench/bench_train_gpt2.py --gpu              # GPT-2 124M, T=1024, bf16 + compile, random tokens
    python bench/bench_train_gpt2.py --repro            # the first steps of --preset gpt2-10b (downloads data)
    torchrun --nproc_per_node 8 bench/bench_train_gpt2.py --gpu     # the same on 8 GPUs

Each mode runs train_gpt2.main for a few steps in a temporary directory, reads its metrics.jsonl and
reports the median tokens/s (and MFU where the GPU's peak is known) over the steps after warm-up
(compilation happens in the first steps). Results are appended to bench/results/train_gpt2_<device>.md
with the command and the machine.
"""

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_gpt2  # noqa: E402
from gpt2 import MetricsLog  # noqa: E402


def machine():
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def random_shards(folder, n_tokens, seed=0):
    """Throughput does not depend on what the tokens say: random GPT-2 ids, no download needed."""
    rng = np.random.default_rng(seed)
    train_gpt2.write_shard(os.path.join(folder, "rand_train_000000.bin"), rng.integers(0, 50257, n_tokens))
    train_gpt2.write_shard(os.path.join(folder, "rand_val_000000.bin"), rng.integers(0, 50257, 1 << 16))
    return folder


def measure(argv, skip):
    with tempfile.TemporaryDirectory() as out:
        train_gpt2.main([*argv, "--out-dir", out])
        if int(os.environ.get("RANK", 0)) != 0:
            return None
        rows = MetricsLog.read(out)
    rows = [r for r in rows if "tokens_per_sec" in r][skip:]
    tps = statistics.median(r["tokens_per_sec"] for r in rows)
    mfu = statistics.median(r["mfu"] for r in rows) if all("mfu" in r for r in rows) else None
    return tps, mfu, len(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--gpu", action="store_true", help="GPT-2 124M at T=1024, bf16 + compile")
    mode.add_argument("--repro", action="store_true", help="first steps of --preset gpt2-10b on FineWeb-Edu")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="micro-batch (default: the preset's)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--note", default="", help="added to the results line, e.g. 'machine shared with 3 jobs'")
    args = p.parse_args()
    world = int(os.environ.get("WORLD_SIZE", 1))
    with tempfile.TemporaryDirectory() as data:
        if args.repro:
            steps = args.steps or 20
            argv = ["--preset", "gpt2-10b", "--rope", "--max-steps", "19073", "--stop-after", str(steps),
                    "--eval-interval", "0", "--hellaswag-interval", "0", "--checkpoint-interval", "0"]
            name, skip = "gpt2-10b preset, real data, first steps", 5
        elif args.gpu:
            steps = args.steps or 30
            B = args.batch_size or 64
            argv = ["--model", "gpt2", "--rope", "--data", random_shards(data, 20_000_000), "--seq-len", "1024",
                    "--batch-size", str(B), "--total-batch-size", str(B * 1024 * world), "--max-steps", str(steps),
                    "--dtype", "bfloat16", "--eval-interval", "0", "--checkpoint-interval", "0"]
            argv += ["--no-compile"] if args.no_compile else ["--compile"]
            name, skip = f"GPT-2 124M, T=1024, B={B}/GPU, bf16{'' if args.no_compile else ' + compile'}", 10
        else:
            steps = args.steps or 30
            argv = ["--rope", "--device", "cpu", "--max-steps", "400", "--stop-after", str(steps),
                    "--eval-interval", "0", "--checkpoint-interval", "0", "--log-interval", "5"]
            if args.batch_size:
                argv += ["--batch-size", str(args.batch_size)]
            name, skip = "default run (tiny, --rope, T=128, 1,024 tokens/step), CPU", 3
        result = measure(argv, skip)
    if result is None:
        return
    tps, mfu, n = result
    line = (f"| {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC | {name} | {world} proc | {tps:,.0f} tok/s | "
            f"{'n/a' if mfu is None else f'{mfu:.1%}'} | median of {n} steps | {machine()} | "
            f"`python bench/bench_train_gpt2.py {' '.join(sys.argv[1:])}` | {args.note} |")
    print(line)
    kind = "cuda" if (args.gpu or args.repro) and torch.cuda.is_available() else "cpu"
    path = os.path.join(ROOT, "bench", "results", f"train_gpt2_{kind}.md")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write(f"# train_gpt2.py benchmarks ({kind})\n\nAppended by bench/bench_train_gpt2.py.\n\n"
                    "| when | what | processes | tokens/s | MFU | steps | machine | command | note |\n"
                    "|---|---|---|---|---|---|---|---|---|\n")
    with open(path, "a") as f:
        f.write(line + "\n")


if __name__ == "__main__":
    main()
