"""
Benchmarks of train_gpt2.py: training throughput (tokens/s), model FLOPs utilisation (MFU) on a GPU, and
the first steps of the GPT-2 124M reproduction with the wall time of the whole run extrapolated from them.

    python bench/bench_train_gpt2.py            # CPU: the default run's model and batch (--rope)
    python bench/bench_train_gpt2.py --gpu      # GPT-2 124M, T=1024, bf16 + compile + fused AdamW, random tokens
    python bench/bench_train_gpt2.py --repro    # the first 200 steps of --preset gpt2-10b, full-run time
    torchrun --standalone --nproc_per_node 8 bench/bench_train_gpt2.py --gpu    # the same on 8 GPUs
    python bench/bench_train_gpt2.py --repro --smoke   # the --repro code path on a CPU with a toy model

Each mode runs train_gpt2.main in a temporary directory and reads its metrics.jsonl: the median tokens/s
and MFU over the steps after warm-up (compilation happens in the first steps). --gpu and --repro need a
CUDA GPU and stop with an error without one.

--repro trains on the data at hand: by default the bundled tiny Shakespeare in GPT-2 tokens, repeated
until a step's 512 windows of 1,024 tokens fit (it is 0.3M tokens; FineWeb-Edu is 10B), or --data (a
text file, a folder of text or of llm.c shards, e.g. the FineWeb-Edu shards when they are at hand). It
checks that the loss falls and extrapolates the full run (19,073 steps and its validation passes) to 1
and 8 GPUs from the measured step and evaluation times; the 8-GPU figure assumes linear scaling.
HellaSwag is left out of the extrapolation unless --hellaswag-file is given.

Results are appended to bench/results/train_gpt2_cpu.md or train_gpt2_gpu.md with the date, the
machine (GPU, torch and CUDA versions), the command and the numbers.
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

REPRO = train_gpt2.RUN_PRESETS["gpt2-10b"]
# the model of a --smoke run: the same code path as --gpu / --repro, sized for a CPU
SMOKE = ["--model", "tiny", "--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--seq-len", "64",
         "--batch-size", "4", "--total-batch-size", "512", "--eval-tokens", "1024", "--device", "cpu",
         "--no-compile"]


def machine():
    gpu = f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}" if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def random_shards(folder, n_tokens, seed=0):
    """Throughput does not depend on what the tokens say: random GPT-2 ids, no download needed."""
    rng = np.random.default_rng(seed)
    train_gpt2.write_shard(os.path.join(folder, "rand_train_000000.bin"), rng.integers(0, 50257, n_tokens))
    train_gpt2.write_shard(os.path.join(folder, "rand_val_000000.bin"), rng.integers(0, 50257, 1 << 16))
    return folder


def repeated_shards(folder, source, min_train, min_val):
    """The GPT-2 tokens of the text `source` (tokenized once, cached), each split repeated until it holds
    at least min_train / min_val tokens: a real text's statistics, and as many windows per step and per
    evaluation as the reproduction has (so that evaluations take as long as they will on FineWeb-Edu)."""
    files = train_gpt2.resolve_data(source, 0)
    sizes = []
    for split, paths, least in zip(("train", "val"), files, (min_train, min_val)):
        tokens = np.concatenate([train_gpt2.read_shard(f) for f in paths])
        sizes.append(len(tokens))
        train_gpt2.write_shard(os.path.join(folder, f"text_{split}_000000.bin"),
                               np.tile(tokens, -(-least // len(tokens))))
    return folder, f"{source}: {sizes[0]:,} GPT-2 train and {sizes[1]:,} val tokens, each repeated"


def run(argv):
    """train_gpt2.main in a temporary directory -> its metrics rows (None on ranks other than 0)."""
    with tempfile.TemporaryDirectory() as out:
        train_gpt2.main([*argv, "--out-dir", out])
        return MetricsLog.read(out) if int(os.environ.get("RANK", 0)) == 0 else None


def speed(rows, skip):
    """(median tokens/s, median MFU or None, steps measured) over the steps after `skip` warm-up steps."""
    rows = [r for r in rows if "tokens_per_sec" in r][skip:]
    tps = statistics.median(r["tokens_per_sec"] for r in rows)
    mfu = statistics.median(r["mfu"] for r in rows) if all("mfu" in r for r in rows) else None
    return tps, mfu, len(rows)


def hours(seconds):
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def repro(args, world, folder):
    """--repro: returns the rows of its results table and whether the loss fell."""
    source = args.data or "shakespeare"
    if os.path.isdir(source) and any(f.endswith(".bin") for f in os.listdir(source)):
        data, what = source, f"{source} (token shards)"
    else:
        data, what = repeated_shards(folder, source, 4 * REPRO["total_batch_size"], int(REPRO["eval_tokens"] * 1.01))
    steps = args.steps or 200
    if steps < 20:
        sys.exit("--repro --steps: at least 20 (10 warm-up steps, then evaluations at steps/2 and steps)")
    argv = ["--preset", "gpt2-10b", "--rope", "--data", data, "--stop-after", str(steps), "--eval-interval",
            str(steps // 2), "--checkpoint-interval", "0", "--sample-tokens", "0", "--log-interval", "10"]
    argv += ["--hellaswag-interval", str(steps // 2), "--hellaswag-file", args.hellaswag_file] if args.hellaswag_file \
        else ["--hellaswag-interval", "0"]
    argv += SMOKE if args.smoke else []
    argv += ["--batch-size", str(args.batch_size)] if args.batch_size else []
    rows = run(argv)
    if rows is None:
        return None, True
    tps, mfu, n = speed(rows, 10)
    tokens_per_step = int(SMOKE[SMOKE.index("--total-batch-size") + 1]) if args.smoke else REPRO["total_batch_size"]
    step_s = tokens_per_step / tps
    ema = {r["step"]: r["train_loss_ema"] for r in rows if "train_loss_ema" in r}
    val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    first_loss = next(r["train_loss"] for r in rows if "train_loss" in r)
    fell = ema[max(ema)] < first_loss - 1.0
    eval_s = statistics.median(r["eval_seconds"] for r in rows if "eval_seconds" in r and r["step"] > 0)
    full_steps = REPRO["max_steps"]
    n_evals = len({*range(0, full_steps, REPRO["eval_interval"]), full_steps})
    one_gpu = (full_steps * step_s + n_evals * eval_s) * world  # measured on `world` GPUs
    shown = [s for s in sorted(ema) if s in (10, steps // 4, steps // 2, 3 * steps // 4, steps)]
    table = [("data", what),
             ("tokens/s (median of the steps after the first 10)", f"{tps:,.0f} over {world} process(es), {n} steps"),
             ("MFU", "n/a" if mfu is None else f"{mfu:.1%}"),
             ("step time (524,288 tokens)" if not args.smoke else "step time", f"{step_s:.3f} s"),
             ("peak GPU memory", f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if torch.cuda.is_available()
              else "n/a"),
             (f"first train loss; smoothed (EMA) at steps {' / '.join(map(str, shown))}",
              f"{first_loss:.3f}; " + " / ".join(f"{ema[s]:.3f}" for s in shown)),
             (f"val loss at steps {' / '.join(map(str, sorted(val)))}", " / ".join(f"{v:.3f}" for v in val.values())),
             ("the loss falls (smoothed loss at the end < first loss - 1 nat)", "yes" if fell else "**NO**"),
             ("one evaluation (median of those after step 0)", f"{eval_s:.1f} s" +
              (" (val loss + HellaSwag)" if args.hellaswag_file else " (val loss; no HellaSwag)")),
             (f"full run extrapolated: {full_steps:,} steps + {n_evals} evaluations, 1 GPU"
              + (f" (measured on {world}, linear scaling assumed)" if world > 1 else ""), hours(one_gpu)),
             ("the same on 8 GPUs, linear scaling assumed (not measured)", hours(one_gpu / 8))]
    return table, fell


def append(kind, header, text):
    """Append to bench/results/train_gpt2_<kind>.md, starting a new file with `header`."""
    path = os.path.join(ROOT, "bench", "results", f"train_gpt2_{kind}.md")
    new = not os.path.exists(path)
    with open(path, "a") as f:
        f.write((header if new else "") + text)
    print(f"appended to {path}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--gpu", action="store_true", help="GPT-2 124M at T=1024, bf16 + compile, random tokens")
    mode.add_argument("--repro", action="store_true", help="the first steps of --preset gpt2-10b; full-run time")
    p.add_argument("--steps", type=int, default=None, help="steps to run (default 30 for --gpu and CPU, 200 --repro)")
    p.add_argument("--batch-size", type=int, default=None, help="micro-batch per process (default: the preset's)")
    p.add_argument("--no-compile", action="store_true", help="--gpu without torch.compile")
    p.add_argument("--data", help="--repro's data: a text file or folder, or a folder of shards (default: "
                                  "tiny Shakespeare, repeated)")
    p.add_argument("--hellaswag-file", help="--repro: also time HellaSwag on this .jsonl (all of it)")
    p.add_argument("--smoke", action="store_true", help="--gpu / --repro code path on a CPU with a toy model; "
                                                        "prints the results, writes no file")
    p.add_argument("--note", default="", help="added to the results, e.g. 'machine shared with 3 jobs'")
    args = p.parse_args()
    gpu = args.gpu or args.repro
    if gpu and not args.smoke and not torch.cuda.is_available():
        sys.exit(f"bench_train_gpt2.py {'--gpu' if args.gpu else '--repro'} needs a CUDA GPU, and torch "
                 f"{torch.__version__} sees none (torch.cuda.is_available() is False"
                 f"{'' if torch.version.cuda else '; this torch build has no CUDA'}). Run it on a GPU "
                 f"machine, or with --smoke to try the code path on a CPU.")
    world = int(os.environ.get("WORLD_SIZE", 1))
    command = f"`{'torchrun --nproc_per_node ' + str(world) + ' ' if world > 1 else 'python '}bench/" \
              f"bench_train_gpt2.py {' '.join(sys.argv[1:])}`"
    stamp = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    with tempfile.TemporaryDirectory() as folder:
        if args.repro:
            table, ok = repro(args, world, folder)
            if table is None:
                return
            title = f"--repro: the first {args.steps or 200} steps of --preset gpt2-10b --rope"
        elif args.gpu:
            steps, B = args.steps or 30, args.batch_size or REPRO["batch_size"]
            argv = ["--model", "gpt2", "--rope", "--data", random_shards(folder, 20_000_000), "--seq-len", "1024",
                    "--batch-size", str(B), "--total-batch-size", str(B * 1024 * world), "--max-steps", str(steps),
                    "--dtype", "bfloat16", "--eval-interval", "0", "--checkpoint-interval", "0"]
            argv += ["--no-compile"] if args.no_compile else ["--compile"]
            rows = run(argv + (SMOKE if args.smoke else []))
            if rows is None:
                return
            tps, mfu, n = speed(rows, 10)
            ok, title = True, f"--gpu: GPT-2 124M, T=1024, B={B}/GPU, bf16{'' if args.no_compile else ' + compile'}" \
                              f" + fused AdamW, random tokens"
            table = [("tokens/s (median of the steps after the first 10)", f"{tps:,.0f} over {world} process(es), "
                                                                              f"{n} steps"),
                     ("tokens/s per GPU", f"{tps / world:,.0f}"), ("MFU", "n/a" if mfu is None else f"{mfu:.1%}"),
                     ("peak GPU memory", f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
                      if torch.cuda.is_available() else "n/a")]
        else:
            steps = args.steps or 30
            argv = ["--rope", "--device", "cpu", "--max-steps", "400", "--stop-after", str(steps),
                    "--eval-interval", "0", "--checkpoint-interval", "0", "--log-interval", "5"]
            argv += ["--batch-size", str(args.batch_size)] if args.batch_size else []
            rows = run(argv)
            if rows is None:
                return
            tps, mfu, n = speed(rows, 3)
            line = (f"| {stamp} | default run (tiny, --rope, T=128, 1,024 tokens/step), CPU | {world} proc | "
                    f"{tps:,.0f} tok/s | n/a | median of {n} steps | {machine()} | {command} | {args.note} |")
            print(line)
            append("cpu", f"# train_gpt2.py benchmarks (cpu)\n\nAppended by bench/bench_train_gpt2.py.\n\n"
                          "| when | what | processes | tokens/s | MFU | steps | machine | command | note |\n"
                          "|---|---|---|---|---|---|---|---|---|\n", line + "\n")
            return
    title += " [--smoke: a toy model on a CPU, not these sizes]" if args.smoke else ""
    report = (f"\n## {stamp}: {title}\n\nMachine: {machine()}, {world} process(es).  \nCommand: {command}"
              f"{'  ' + chr(10) + 'Note: ' + args.note if args.note else ''}\n\n| quantity | value |\n|---|---|\n"
              + "".join(f"| {k} | {v} |\n" for k, v in table))
    print(report)
    if not args.smoke:
        append("gpu", "# train_gpt2.py on GPUs\n\nAppended by bench/bench_train_gpt2.py --gpu / --repro.\n", report)
    if not ok:
        sys.exit("the loss did not fall: see the table above")


if __name__ == "__main__":
    main()
