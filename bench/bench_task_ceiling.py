"""What the arithmetic task's models know: greedy test accuracy of each checkpoint of the CPU pipeline, asked two
ways, and split by whether the problem has a carry (or borrow), the one thing sft.py's sloppy teacher gets wrong.

    python bench/bench_task_ceiling.py base=out/task-base/ckpt.pt sft=out/task-sft/ckpt.pt grpo=out/task-grpo/ckpt.pt
    python bench/bench_task_ceiling.py --data data/task-columns base=out/task-columns-base/ckpt.pt ...

Answers are read up to 64 new tokens (the longest worked answer in columns is 48 bytes).

- pretraining format: "Q: What is 38 + 76?\\nA:", the way train_gpt2.py --preset task's text writes every problem,
  so the base model can be asked without SFT; the answer is read up to the end of its line.
- template: the prompt template sft.py trains on and grpo.py evaluates with (bpe.prompt_ids, no preamble), the
  answer read up to the end-of-text, as in grpo.accuracy.

The base model's accuracy in its own format is what pretraining put in the weights. SFT on the teacher's
demonstrations teaches the template and the teacher's slip; RL with the verifier (grpo.py) can win back what the
slip hid, but has no source for arithmetic the base model never learned.
"""

import argparse
import datetime
import json
import os
import platform
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
import bpe  # noqa: E402
from gpt2 import left_pad, load_with_tokenizer, sample  # noqa: E402


def has_carry(prompt):
    """'What is 58 + 67?' -> True (forgetting the carries changes the answer); 'What is 1 + 46?' -> False."""
    a, op, b = prompt.removeprefix("What is ").rstrip("?").split()
    right = int(a) + int(b) if op == "+" else int(a) - int(b)
    return bpe.forget_carries(int(a), op, int(b)) != right


def answers(model, tok, prompts, stop, max_new_tokens=64, batch_size=100):
    """Greedy completions (text) of prompts (lists of ids), each cut at the stop id."""
    out = []
    for k in range(0, len(prompts), batch_size):
        idx, attn = left_pad(prompts[k:k + batch_size], stop)
        with torch.no_grad():
            tokens, mask, _ = sample(model, idx, max_new_tokens, attention_mask=attn, temperature=0, eos_id=stop,
                                     vocab_size=tok.n_vocab)
        out += [tok.decode([t for t, m in zip(ts, ms) if m and t != stop]) for ts, ms in zip(tokens.tolist(),
                                                                                              mask.tolist())]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="name=checkpoint pairs, in the order of the table's rows")
    p.add_argument("--data", default=os.path.join(ROOT, "data", "task"), help="the task folder (its test.jsonl)")
    args = p.parse_args()
    with open(os.path.join(args.data, "test.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    carry = [has_carry(r["prompt"]) for r in rows]
    n_carry = sum(carry)
    print(f"### Greedy accuracy on {len(rows)} test problems ({n_carry} with a carry or borrow), "
          f"{platform.machine()}, torch {torch.__version__}, {datetime.date.today()}\n")
    print("| model | pretraining format | template | template, no carry | template, with carry |")
    print("|---|---|---|---|---|")
    for spec in args.models:
        name, path = spec.split("=", 1)
        model, tok, _ = load_with_tokenizer(path)
        model.eval()
        plain = answers(model, tok, [tok.encode(f"Q: {r['prompt']}\nA:") for r in rows], tok.eot_token)
        plain = [bpe.reward(a.split("\n")[0], r["answer"]) for a, r in zip(plain, rows)]
        stop = bpe.stop_id(tok, "alpaca")
        tmpl = answers(model, tok, [bpe.prompt_ids(tok, r["prompt"], "alpaca", False, None) for r in rows], stop)
        tmpl = [bpe.reward(a, r["answer"]) for a, r in zip(tmpl, rows)]
        pct = lambda hits, keep: f"{100 * sum(h for h, k in zip(hits, keep) if k) / max(1, sum(keep)):.1f}%"
        print(f"| {name} | {pct(plain, [True] * len(rows))} | {pct(tmpl, [True] * len(rows))} | "
              f"{pct(tmpl, [not c for c in carry])} | {pct(tmpl, carry)} |", flush=True)


if __name__ == "__main__":
    main()
