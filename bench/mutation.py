"""Mutation testing: do the tests fail when the code is wrong? Each mutant is one plausible bug written as a text
replacement in one file (a sign, an off-by-one, a swapped argument, a flag ignored); for each, this script applies
it to a copy of the repository, runs the topic's tests with -x, and reports whether they caught it (KILLED) or
not (SURVIVED), or ERROR when pytest stopped without a failing test to name (not counted as caught). The working
tree is never touched.

    python bench/mutation.py grpo                          # every mutant of bench/mutants/grpo.json
    python bench/mutation.py grpo --tests-at 7d22fee       # the same mutants against the tests of an older commit
    python bench/mutation.py classify --only collate_last_off_by_one,scores_pr_swapped
    python bench/mutation.py grpo sft --jobs 2 --out bench/results/mutation_cpu.md

A mutant list, bench/mutants/<topic>.json: [{"id", "file", "old", "new", "what"}], `old` occurring exactly once in
`file` (or lists of olds and news, replaced in turn). The tests run are tests/test_<topic>.py, plus
tests/test_<stem>.py of a mutated file other than the topic's (a mutant of bpe.py also runs tests/test_bpe.py).
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MUTANTS = os.path.join(ROOT, "bench", "mutants")


def load_mutants(topic):
    """bench/mutants/<topic>.json -> its list of mutants, each checked to apply to exactly one place."""
    with open(os.path.join(MUTANTS, f"{topic}.json")) as f:
        mutants = json.load(f)
    sources = {}
    for m in mutants:
        if m["file"] not in sources:
            with open(os.path.join(ROOT, m["file"])) as f:
                sources[m["file"]] = f.read()
        try:
            mutated = apply(sources[m["file"]], m)
        except ValueError as e:
            raise SystemExit(f"mutant {topic}/{m['id']}: {e}; the code changed since the list was written: "
                             f"update the mutant") from None
        try:  # a mutant that does not compile would fail every test: a kill that proves nothing
            if m["file"].endswith(".py"):
                compile(mutated, m["file"], "exec")
        except SyntaxError as e:
            raise SystemExit(f"mutant {topic}/{m['id']}: its {m['file']} does not compile ({e.msg}, line "
                             f"{e.lineno}); fix the mutant's text") from None
    return mutants


def apply(src, m):
    """src with the mutant's replacement(s) made; each old text must occur exactly once."""
    olds, news = (m["old"], m["new"]) if isinstance(m["old"], list) else ([m["old"]], [m["new"]])
    for old, new in zip(olds, news):
        if src.count(old) != 1:
            raise ValueError(f"its text occurs {src.count(old)} times in {m['file']} (needs exactly 1)")
        src = src.replace(old, new)
    return src


def copy_tree(dst, tests_at=None):
    """The repository's tracked files (as they are in the working tree) under dst; with tests_at, tests/ as
    they were at that commit."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if os.path.exists(os.path.join(ROOT, f)):
            os.makedirs(os.path.dirname(os.path.join(dst, f)) or dst, exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), os.path.join(dst, f))
    if tests_at:
        shutil.rmtree(os.path.join(dst, "tests"))
        archive = subprocess.run(["git", "archive", tests_at, "tests"], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", dst], input=archive.stdout, check=True)


def test_files(topic, m, root):
    """The tests a mutant of `topic` runs: tests/test_<topic>.py, and the tests of the file it changes."""
    tests = [f"tests/test_{topic}.py"]
    stem = os.path.splitext(os.path.basename(m["file"]))[0]
    if stem != topic and os.path.exists(os.path.join(root, "tests", f"test_{stem}.py")):
        tests.append(f"tests/test_{stem}.py")
    return tests


def check_unmutated(topic, mutants, base):
    """Every test file the mutants will run must pass on the unmutated code: else every mutant reads KILLED."""
    tests = sorted({t for m in mutants for t in test_files(topic, m, base)})
    r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=base,
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode:
        last = (r.stdout.strip() or r.stderr.strip() or "no output").splitlines()[-1]
        raise SystemExit(f"{topic}: {' '.join(tests)} fail on the unmutated code ({last}); a mutant run would "
                         f"count every mutant as killed. Fix the tests (or --tests-at) first")


def run_mutant(topic, m, base):
    """Apply one mutant in a fresh copy of base, run its tests; -> (status, seconds, first failing test)."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{topic}-") as top:
        tmp = os.path.join(top, "repo")
        shutil.copytree(base, tmp)
        path = os.path.join(tmp, m["file"])
        with open(path) as f:
            src = f.read()
        with open(path, "w") as f:
            f.write(apply(src, m))
        tests = test_files(topic, m, tmp)
        t = time.time()
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=tmp,
                           capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        failed = next((line.split()[1] for line in r.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))), "")
        if r.returncode and not failed:  # pytest itself did not run (a usage or internal error): no verdict
            why = (r.stdout.strip() or r.stderr.strip() or "no output").splitlines()[-1]
            return "ERROR", time.time() - t, f"pytest exit {r.returncode}: {why}"
        return ("KILLED" if r.returncode else "SURVIVED"), time.time() - t, failed


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("topics", nargs="+", help="names of bench/mutants/*.json (grpo, classify, sft, ...)")
    p.add_argument("--only", help="comma-separated mutant ids to run")
    p.add_argument("--tests-at", help="a git commit: run its tests/ instead of the working tree's")
    p.add_argument("--jobs", type=int, default=1, help="mutants run at once (each pytest uses one thread)")
    p.add_argument("--out", help="also write the markdown report to this file")
    args = p.parse_args()
    only = set(args.only.split(",")) if args.only else None
    lines = [f"# Mutation testing, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"\n{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; command: "
             f"`python bench/mutation.py {' '.join(sys.argv[1:])}`; tests from "
             f"{args.tests_at or 'the working tree'}"]
    print("\n".join(lines), flush=True)
    base = tempfile.TemporaryDirectory(prefix="mutation-base-")  # the tree every mutant starts from, made once
    copy_tree(base.name, args.tests_at)
    for topic in args.topics:
        mutants = [m for m in load_mutants(topic) if only is None or m["id"] in only]
        if mutants:
            check_unmutated(topic, mutants, base.name)
        with ThreadPoolExecutor(args.jobs) as pool:
            results = pool.map(lambda m: run_mutant(topic, m, base.name), mutants)
            rows, killed = [], 0
            for m, (status, secs, failed) in zip(mutants, results):
                rows.append(f"| {m['id']} | {m['file']} | {m['what']} | {status} | {failed} |")
                killed += status == "KILLED"
                print(f"  {topic}/{m['id']}: {status} ({secs:.0f} s)", file=sys.stderr, flush=True)
        block = [f"\n## {topic}: {killed} of {len(rows)} mutants killed\n",
                 "| mutant | file | the bug | tests | first failing test |", "|---|---|---|---|---|", *rows]
        print("\n".join(block), flush=True)
        lines += block
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
