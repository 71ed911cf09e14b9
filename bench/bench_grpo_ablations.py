"""grpo.py's ablations on the arithmetic task: which of GRPO's pieces matter. Each setting changes one thing from
the task preset, on a short schedule (100 rollout batches of 8 prompts x 8 answers at the preset's constant lr),
from the pipeline's SFT model, over several seeds; greedy test accuracy every 25 batches. Writes a markdown table
(final accuracy, mean +- sd over the seeds) and a plot of the curves (accuracy; sampled reward, smoothed).

    OMP_NUM_THREADS=1 python bench/bench_grpo_ablations.py --jobs 2 --out bench/results/grpo_ablations_cpu.md
    python bench/bench_grpo_ablations.py --settings default,no-baseline --seeds 1     # a subset

Runs go to --runs-dir/<setting>-s<seed>; a run whose metrics.jsonl is complete is read, not run again (delete
the folder to re-run it). Needs out/task-sft/ckpt.pt (python sft.py) or --init.
"""

import argparse
import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from gpt2 import MetricsLog  # noqa: E402

SETTINGS = {  # name -> flags changed from the task preset
    "default": [],
    "lr2e-4": ["--lr", "2e-4"],  # 4x the learning rate
    "no-baseline": ["--no-baseline"],  # the raw reward (over the group std) as the advantage
    "no-std": ["--no-scale-rewards"],  # reward minus the group mean, not divided by the std (Dr. GRPO)
    "dr_grpo": ["--loss", "dr_grpo"],  # token losses summed over a constant length
    "dapo": ["--loss", "dapo"],  # token-level mean over the batch
    "off-policy": ["--updates", "4"],  # four gradient steps per rollout batch
    "kl": ["--beta", "0.04"],  # a k3 KL penalty to the SFT model
}
SCHEDULE = ["--max-steps", "100", "--prompts", "8", "--eval-interval", "25"]


def run_one(name, seed, args):
    """One grpo.py run in its own process -> (its metrics rows, CPU seconds or None when it was read)."""
    out = os.path.join(args.runs_dir, f"{name}-s{seed}")
    rows = MetricsLog.read(out) if os.path.exists(os.path.join(out, "metrics.jsonl")) else []
    if any(r.get("step") == 100 and "accuracy" in r for r in rows):
        return rows, None
    cmd = [sys.executable, "grpo.py", *SCHEDULE, "--seed", str(seed), "--out-dir", out, "--init", args.init,
           "--device", "cpu", *SETTINGS[name]]
    with open(out + ".log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own CPU time, whatever else runs beside it
    if status:
        raise SystemExit(f"{' '.join(cmd)} failed; see {out}.log")
    return MetricsLog.read(out), usage.ru_utime + usage.ru_stime


def curve(rows, key, window=1):
    """(steps, values) of one metric; window > 1: the trailing moving average."""
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    steps, vals = [s for s, _ in pts], [v for _, v in pts]
    return steps, [statistics.fmean(vals[max(0, i - window + 1):i + 1]) for i in range(len(vals))]


def plot(results, path):
    """Two panels: greedy test accuracy, and the sampled reward (10-batch average), each the mean over seeds."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, runs in results.items():
        for ax, key, window in ((axes[0], "accuracy", 1), (axes[1], "reward", 10)):
            curves = [curve(rows, key, window) for rows, _ in runs]
            steps = curves[0][0]
            mean = [statistics.fmean(c[1][i] for c in curves) for i in range(len(steps))]
            ax.plot(steps, [100 * m if key == "accuracy" else m for m in mean], label=name,
                    marker="o" if key == "accuracy" else None, linewidth=2.2 if name == "default" else 1.2)
    axes[0].set(xlabel="rollout batch", ylabel="greedy test accuracy (%)", title="test accuracy (mean of seeds)")
    axes[1].set(xlabel="rollout batch", ylabel="reward", title="sampled reward, 10-batch average (mean of seeds)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of: {', '.join(SETTINGS)}")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds; each setting runs once per seed")
    p.add_argument("--init", default="out/task-sft/ckpt.pt", help="the SFT model every run starts from")
    p.add_argument("--runs-dir", default="out/grpo-ablations", help="where the runs' folders go")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (one thread each with OMP_NUM_THREADS=1)")
    p.add_argument("--out", help="also write the report to this markdown file (and the plot beside it, .png)")
    args = p.parse_args()
    names, seeds = args.settings.split(","), [int(s) for s in args.seeds.split(",")]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        sys.exit(f"unknown setting(s) {unknown}; valid: {', '.join(SETTINGS)}")
    args.init, args.runs_dir = os.path.abspath(args.init), os.path.abspath(args.runs_dir)  # the runs start in ROOT
    if not os.path.exists(args.init):
        sys.exit(f"--init {args.init}: no such checkpoint; make it with `python train_gpt2.py --preset task && "
                 f"python sft.py`, or pass --init")
    os.makedirs(args.runs_dir, exist_ok=True)
    start = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.time()
    jobs = [(n, s) for n in names for s in seeds]
    with ThreadPoolExecutor(args.jobs) as pool:  # threads that wait on processes
        done = dict(zip(jobs, pool.map(lambda job: run_one(*job, args), jobs)))
    results = {n: [done[(n, s)] for s in seeds] for n in names}

    lines = [f"# bench/bench_grpo_ablations.py, {start:%Y-%m-%d %H:%M} UTC", "",
             f"command: `{' '.join(shlex.quote(a) for a in ['python'] + sys.argv)}`  ",
             f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python "
             f"{platform.python_version()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
             f"{args.jobs} run(s) at a time; wall {time.time() - t0:.0f} s", "",
             f"Each run: `python grpo.py {' '.join(SCHEDULE)} --seed S --init {os.path.relpath(args.init, ROOT)} FLAGS`; start accuracy "
             f"(the SFT model) {100 * results[names[0]][0][0][0]['accuracy']:.1f}%.", "",
             f"| setting | flags | test accuracy after 100 batches, seeds {' / '.join(map(str, seeds))} | mean +- sd "
             f"| sampled reward, last 20 batches | KL at end | CPU per run |", "|---|---|---|---|---|---|---|"]
    for n in names:
        accs = [100 * [r for r in rows if "accuracy" in r][-1]["accuracy"] for rows, _ in results[n]]
        rewards = [statistics.fmean(r["reward"] for r in [r for r in rows if "reward" in r][-20:])
                   for rows, _ in results[n]]
        kls = [[r for r in rows if "kl" in r][-1]["kl"] for rows, _ in results[n]]
        cpu = ", ".join("read" if c is None else f"{c:.0f} s" for _, c in results[n])
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(f"| {n} | `{' '.join(SETTINGS[n]) or '(task preset)'}` | {' / '.join(f'{a:.1f}' for a in accs)} "
                     f"| {statistics.fmean(accs):.1f} +- {sd:.1f} | {statistics.fmean(rewards):.3f} "
                     f"| {statistics.fmean(kls):.4f} | {cpu} |")
    load = os.getloadavg()
    lines += ["", f"load average (1/5/15 min) at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"]
    if args.out:
        png = plot(results, os.path.splitext(args.out)[0] + ".png")
        if png:
            lines += ["", f"![curves]({os.path.basename(png)})"]
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
