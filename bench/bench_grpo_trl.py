"""Time one GRPO step of grpo.py against TRL's GRPOTrainer on the CPU: the same random GPT-2-shaped model (loaded
into both from one HF folder), the same byte-level tokenizer, prompts and reward, the same settings. A step is a
rollout (8 prompts x 8 sampled answers, up to 24 new tokens, temperature 1) and one optimizer step on it (loss
"grpo", beta 0, clip 0.2 / 0.28, AdamW, lr 1e-4, gradient clip 1.0). Reports the median step time after warmup.

    OMP_NUM_THREADS=1 python bench/bench_grpo_trl.py --steps 8 --out bench/results/grpo_trl_cpu.md

The reward is the fraction of an answer's characters that are digits: a random model never gets an arithmetic
answer right, so the task's verifier would score every answer 0, and grpo.py skips the update of a batch whose
advantages are all 0 (TRL does not). The digit reward differs within every group, so both do the full update.
--out writes the report (date, command, machine, load, results) to a markdown file as well as stdout.
"""

import argparse
import datetime
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import bpe  # noqa: E402
import grpo  # noqa: E402
from gpt2 import GPT, GPTConfig  # noqa: E402


def digits(text):
    """The toy reward: the fraction of characters that are digits. digits("12 apples") -> 0.22"""
    text = text.replace(bpe.ENDOFTEXT, "")
    return sum(c.isdigit() for c in text) / max(1, len(text))


def hf_byte_tokenizer():
    """transformers' fast tokenizer with the ids of bpe.byte_tokenizer(): byte b -> id b, <|endoftext|> -> 256."""
    import tokenizers
    import transformers
    vocab = {ch: b for b, ch in bpe.bytes_to_unicode().items()}
    vocab[bpe.ENDOFTEXT] = 256
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens([bpe.ENDOFTEXT])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=bpe.ENDOFTEXT,
                                                pad_token=bpe.ENDOFTEXT, bos_token=bpe.ENDOFTEXT)


def task_rows(n, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q, _, answer = bpe.task_text(*bpe.task_problem(rng))
        rows.append({"prompt": q, "answer": answer})
    return rows


def time_ours(folder, rows, a):
    """grpo.py's loop body, as main() runs it: rollout, reward, train_step (with the frozen reference, whose
    forward main() always runs for the KL metric, or without it: ref=None)."""
    tok = bpe.byte_tokenizer()
    model = GPT.from_pretrained(folder).eval()
    ref = grpo.copy.deepcopy(model).requires_grad_(False) if a.ref else None
    args = grpo.parse_args(["--device", "cpu", "--prompts", str(a.prompts), "--group-size", str(a.group_size),
                            "--max-new-tokens", str(a.max_new_tokens), "--loss", "grpo", "--lr", str(a.lr),
                            "--beta", "0", "--clip-low", "0.2", "--clip-high", "0.28", "--seed", str(a.seed)])
    optimizer = model.configure_optimizer(args.weight_decay, args.lr, (0.9, 0.99), "cpu")
    torch.manual_seed(a.seed)
    times, cpu, rollout, lengths = [], [], [], []
    for step in range(a.warmup + a.steps):
        batch_rows = [rows[i] for i in grpo.batch_rows(step, len(rows), args.prompts, args.seed)]
        t0, c0 = time.perf_counter(), time.process_time()
        batch = grpo.rollout(model, tok, batch_rows, args.group_size, args, "cpu", torch.float32)
        t1 = time.perf_counter()
        batch["rewards"] = torch.tensor([digits(t) for t in batch["texts"]])
        s = grpo.train_step(model, ref, optimizer, batch, args, "cpu", torch.float32)
        t2, c2 = time.perf_counter(), time.process_time()
        assert s["skipped"] == 0, "a zero-signal batch: nothing to time"
        if step >= a.warmup:
            times.append(t2 - t0), cpu.append(c2 - c0), rollout.append(t1 - t0)
            lengths.append(float(batch["mask"].sum(1).mean()))
    return times, cpu, rollout, lengths


def time_trl(folder, rows, a, out_dir):
    """TRL's GRPOTrainer.train() for warmup + steps steps; a callback times each step (generation, reward,
    loss, backward, optimizer step), and a wrapper around its generation times the rollout part."""
    import datasets
    import transformers
    from trl import GRPOConfig, GRPOTrainer

    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    tok = hf_byte_tokenizer()
    prompts = [bpe.format_prompt(r["prompt"], preamble=False) for r in rows]
    assert tok(prompts[0])["input_ids"] == bpe.byte_tokenizer().encode(prompts[0])
    data = datasets.Dataset.from_list([{"prompt": p, "answer": r["answer"]} for p, r in zip(prompts, rows)])

    def digit_reward(completions, **unused):
        return [digits(c) for c in completions]

    config = GRPOConfig(output_dir=out_dir, use_cpu=True, bf16=False, fp16=False, seed=a.seed, report_to="none",
                        per_device_train_batch_size=a.prompts * a.group_size, num_generations=a.group_size,
                        gradient_accumulation_steps=1, num_iterations=1, max_completion_length=a.max_new_tokens,
                        temperature=1.0, top_p=1.0, top_k=0, learning_rate=a.lr, lr_scheduler_type="constant",
                        warmup_steps=0, weight_decay=0.0, adam_beta2=0.99, max_grad_norm=1.0, beta=0.0,
                        loss_type="grpo", epsilon=0.2, epsilon_high=0.28, scale_rewards="group",
                        max_steps=a.warmup + a.steps, logging_steps=10 ** 6, save_strategy="no",
                        disable_tqdm=True, dataloader_num_workers=0,
                        gradient_checkpointing=False)  # TRL's default (True) recomputes every block in backward
    assert not config.gradient_checkpointing  # grpo.py keeps the activations: the same work on both sides
    trainer = GRPOTrainer(model=model, reward_funcs=digit_reward, args=config, train_dataset=data,
                          processing_class=tok)
    times, cpu, rollout, lengths, threads = [], [], [], [], set()

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, *unused, **kw):
            self.t0, self.c0 = time.perf_counter(), time.process_time()
            threads.add(torch.get_num_threads())

        def on_step_end(self, *unused, **kw):
            times.append(time.perf_counter() - self.t0), cpu.append(time.process_time() - self.c0)

    generate = trainer._generate_single_turn

    def timed_generate(*args, **kw):
        t0 = time.perf_counter()
        completion_ids, logprobs = generate(*args, **kw)
        rollout.append(time.perf_counter() - t0)
        lengths.append(sum(map(len, completion_ids)) / len(completion_ids))
        return completion_ids, logprobs

    trainer._generate_single_turn = timed_generate
    trainer.add_callback(StepTimer())
    trainer.train()
    w = a.warmup
    return times[w:], cpu[w:], rollout[w:], lengths[w:], threads


def summary(name, times, cpu, rollout, lengths):
    """-> (median wall, median CPU time, a table row)"""
    med, med_cpu, med_roll = statistics.median(times), statistics.median(cpu), statistics.median(rollout)
    return med, med_cpu, (f"| {name} | {med:.3f} s | {min(times):.3f} / {max(times):.3f} s | {med_cpu:.3f} s "
                          f"| {med_roll:.3f} s | {med - med_roll:.3f} s | {statistics.mean(lengths):.1f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="timed GRPO steps of each (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--prompts", type=int, default=8, help="prompts per rollout batch")
    p.add_argument("--group-size", type=int, default=8, help="answers sampled per prompt")
    p.add_argument("--max-new-tokens", type=int, default=24, help="longest answer")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--layers", type=int, default=4, help="model depth")
    p.add_argument("--width", type=int, default=128, help="model width (4 heads)")
    p.add_argument("--ref", action=argparse.BooleanOptionalAction, default=True,
                   help="grpo.py: keep the frozen reference as main() does (its forward runs even at beta 0)")
    p.add_argument("--seed", type=int, default=1337, help="model init, prompts and sampling")
    p.add_argument("--out", help="also write the report to this markdown file")
    a = p.parse_args()

    rows = task_rows(512, a.seed)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(a.seed)
        cfg = GPTConfig(block_size=256, vocab_size=257, n_layer=a.layers, n_head=4, n_embd=a.width)
        GPT(cfg).save_pretrained(os.path.join(tmp, "model"))  # GPT-2 layout: learned positions, LayerNorm, GELU
        n_params = sum(p.numel() for p in GPT(cfg).parameters())
        ours = time_ours(os.path.join(tmp, "model"), rows, a)
        no_ref = time_ours(os.path.join(tmp, "model"), rows, argparse.Namespace(**{**vars(a), "ref": False}))
        trl = time_trl(os.path.join(tmp, "model"), rows, a, os.path.join(tmp, "trl"))
    import transformers
    import trl as trl_pkg
    med_ours, cpu_ours, row_ours = summary("grpo.py (as main() runs it: + reference forward for the KL metric)", *ours)
    med_noref, cpu_noref, row_noref = summary("grpo.py without the reference (ref=None)", *no_ref)
    med_trl, cpu_trl, row_trl = summary(f"TRL {trl_pkg.__version__} GRPOTrainer", *trl[:4])
    load = os.getloadavg()
    lines = [
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"command: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} python "
        + " ".join(shlex.quote(x) for x in sys.argv),
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, trl {trl_pkg.__version__}, python {platform.python_version()}; "
        f"torch threads: ours {torch.get_num_threads()}, TRL {sorted(trl[4])}",
        f"load average (1/5/15 min) at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        f"model: random GPT-2 ({a.layers} layers, {a.width} wide, 4 heads, 257-token byte vocabulary, "
        f"{n_params / 1e6:.2f}M parameters), float32; {a.prompts} prompts x {a.group_size} answers, up to "
        f"{a.max_new_tokens} new tokens; {a.warmup} warmup + {a.steps} timed steps each",
        "",
        "| implementation | median step (wall) | min / max (wall) | median step (CPU time) | median rollout (wall) "
        "| rest: reward, loss, backward, AdamW (wall) | mean answer tokens |",
        "|---|---|---|---|---|---|---|",
        row_ours, row_noref, row_trl,
        "",
        f"ratio grpo.py / TRL, median wall step: {med_ours / med_trl:.2f}x as main() runs it, "
        f"{med_noref / med_trl:.2f}x without the reference forward; median CPU time: {cpu_ours / cpu_trl:.2f}x, "
        f"{cpu_noref / cpu_trl:.2f}x",
    ]
    report = "\n".join(lines)
    print(report)
    if a.out:
        with open(a.out, "a") as f:
            f.write("\n```\n" + report + "\n```\n")


if __name__ == "__main__":
    main()
