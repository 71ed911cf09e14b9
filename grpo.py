"""
grpo.py: reinforcement learning with verifiable rewards: GRPO (Shao et al., 2024, DeepSeekMath) and the fixes
that followed it (Dr. GRPO, DAPO), on a task whose answers a program can check.

What it teaches, top to bottom:
  1. Rollouts: each prompt is answered G times by sampling (gpt2.sample, which also returns the
     log-probability of every token it drew), and each answer is scored by the task's verifier (bpe.reward:
     exact final answer), plus an optional small reward for a well-formed answer.
  2. Group-relative advantages: an answer's reward minus the mean reward of its group (the G answers to the
     same prompt), optionally divided by the group's standard deviation. The group mean is the baseline a
     learned value function gives PPO; here it costs nothing. A group whose answers all score the same gets
     advantage 0 everywhere: it carries no signal (counted; --drop-zero-signal removes it, as DAPO's dynamic
     sampling does, without drawing new groups to refill the batch).
  3. The loss: PPO's clipped importance ratio pi / pi_old per token, with DAPO's higher upper clip
     (--clip-high); a KL penalty to the frozen starting model with the k3 estimator (--beta, 0 allowed: recent
     recipes drop it); and the token losses aggregated one of three ways (--loss):
        grpo     mean over each answer's tokens, then over answers (long answers weigh less per token)
        dr_grpo  sum over tokens / (answers x --max-new-tokens), a constant: no length bias (Dr. GRPO)
        dapo     mean over every token of the batch (DAPO's token-level loss)
  4. The loop: one rollout batch, then --updates gradient steps on it (1 = on-policy; more reuse the batch,
     off-policy, and the ratio and its clip start to matter), greedy accuracy on held-out problems,
     metrics.jsonl (reward, accuracy, zero-signal groups, KL, clip fraction, entropy, answer length),
     an atomic checkpoint, exact --resume, a plot.

The CPU pipeline (after sft.py; see its docstring for the base model):
    python grpo.py                                  # out/task-sft/ckpt.pt -> out/task-grpo/ckpt.pt
    python grpo.py --loss dr_grpo --beta 0.04       # any switch; --help lists them
    python grpo.py --resume                         # continue out/task-grpo from its checkpoint
    python grpo.py --preset task-columns            # answers worked column by column (after sft.py's)
The real recipe (a GPU; downloads GSM8K, starts from sft.py's instruction-tuned GPT-2 medium):
    python sft.py --preset gpt2-alpaca && python grpo.py --preset gpt2-gsm8k
A modern model (one big GPU): Qwen2.5-Math-1.5B (downloaded from the HF hub) on MATH-style problems, asked in
its chat template to reason step by step and put the answer in \\boxed{}, rewarded by bpe.math_reward:
    python grpo.py --preset qwen-math --data data/math   # rl.jsonl + test.jsonl rows {"prompt", "answer"}
    torchrun --nproc_per_node 8 grpo.py --fsdp --preset qwen-math --init meta-llama/Llama-3.1-8B-Instruct \\
        --template llama3                                # sharded with FSDP2: each process its share of prompts
"""

import argparse
import copy
import json
import os
import sys
import time

import torch
from tqdm import tqdm

import bpe
from gpt2 import (MetricsLog, add_common_args, autocast, batch_rows, download, end_distributed, fsdp_shard,
                  full_state_dict, grad_scaler, init_distributed, left_pad, load_model_state, load_with_tokenizer,
                  lr_at, warmup_note, maybe_compile, pick_device, pick_dtype, restore_scaler, resume_settings, sample,
                  save_checkpoint, seed_everything, rng_state, set_rng_state)

# -----------------------------------------------------------------------------
# Runs. A preset fills in defaults; a flag given on the command line wins.

PRESETS = {
    # the arithmetic task on a CPU, from sft.py's model: 16 prompts x 8 answers per step
    "task": dict(init="out/task-sft/ckpt.pt", data="task", out_dir="out/task-grpo", preamble=False, max_steps=200,
                 prompts=16, group_size=8, lr=5e-5, max_new_tokens=24, eval_interval=50, eval_limit=500),
    # GSM8K from the instruction-tuned GPT-2 medium of `python sft.py --preset gpt2-alpaca`
    "gpt2-gsm8k": dict(init="out/gpt2-alpaca/ckpt.pt", data="gsm8k", out_dir="out/gpt2-gsm8k", preamble=True,
                       max_steps=200, prompts=16, group_size=8, lr=1e-6, max_new_tokens=256, eval_interval=50,
                       eval_limit=500),
}
# the same on the task whose answers are worked column by column: longer answers, fewer steps needed
PRESETS["task-columns"] = {**PRESETS["task"], "init": "out/task-columns-sft/ckpt.pt", "data": "task-columns",
                           "out_dir": "out/task-columns-grpo", "max_steps": 100, "max_new_tokens": 64,
                           "eval_interval": 25}
# Qwen2.5-Math-1.5B with GRPO on MATH, as in the reference's recipe: 32 prompts x 8 answers of up to 1,024
# tokens per step, lr 1e-5, ChatML prompts with Qwen2.5-Math's system message, the boxed-answer verifier.
PRESETS["qwen-math"] = dict(init="Qwen/Qwen2.5-Math-1.5B", data="data/math", out_dir="out/qwen-math-grpo",
                            preamble=False, template="chatml", system=bpe.MATH_SYSTEM, verifier="boxed",
                            max_steps=200, prompts=32, group_size=8, lr=1e-5, max_new_tokens=1024,
                            eval_interval=20, eval_limit=500)
GSM8K_URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/{}.jsonl"
LOSSES = ("grpo", "dr_grpo", "dapo")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    g = p.add_argument_group("run")
    g.add_argument("--preset", default="task", choices=list(PRESETS), help="defaults for a run (default: task)")
    g.add_argument("--init", help="the model to train: a checkpoint (sft.py's), gpt2 | gpt2-medium | ..., or an HF folder")
    g.add_argument("--data", help="task | task-columns | gsm8k (downloaded to data/gsm8k) | a folder with rl.jsonl + "
                                  "test.jsonl ({prompt, answer}) or GSM8K's train.jsonl + test.jsonl")
    g.add_argument("--out-dir", help="where metrics.jsonl, ckpt.pt and grpo.png go")
    g.add_argument("--resume", action="store_true", help="continue the run in --out-dir with its own settings")
    g.add_argument("--stop-after", type=int, help="stop (with a checkpoint) after this step; --resume goes on")
    g.add_argument("--preamble", action=argparse.BooleanOptionalAction,
                   help="start prompts with Alpaca's 'Below is an instruction...' sentence (default: what the "
                        "SFT model was trained with, else the preset's)")
    g.add_argument("--template", default="alpaca", choices=bpe.TEMPLATES,
                   help="how prompts are written: the project's Alpaca template, or a chat template (Qwen: chatml)")
    g.add_argument("--system", default=None, help="system message of a chat template (qwen-math: Qwen2.5-Math's)")
    g = p.add_argument_group("rollouts and reward")
    g.add_argument("--verifier", default="number", choices=list(bpe.VERIFIERS),
                   help="number: the final number equals the answer; boxed: the last \\boxed{} does (MATH)")
    g.add_argument("--batch-size", "--prompts", dest="prompts", type=int,
                   help="prompts per rollout batch, each answered --group-size times (as ppo.py's --batch-size)")
    g.add_argument("--group-size", type=int, help="answers sampled per prompt (G >= 2)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the rollouts")
    g.add_argument("--max-new-tokens", type=int, help="longest answer (also dr_grpo's constant length)")
    g.add_argument("--format-reward", type=float, default=0.0,
                   help="added to the reward of an answer that stops and states a number (0 = verifier only)")
    g = p.add_argument_group("method")
    g.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="subtract the group's mean reward (--no-baseline: the raw reward, still divided by the "
                        "group's std unless --no-scale-rewards)")
    g.add_argument("--scale-rewards", action=argparse.BooleanOptionalAction, default=True,
                   help="divide advantages by the group's reward std (Dr. GRPO: --no-scale-rewards)")
    g.add_argument("--loss", default="grpo", choices=LOSSES, help="how token losses are aggregated (see above)")
    g.add_argument("--clip-low", type=float, default=0.2, help="ratio clipped below at 1 - this (PPO's epsilon)")
    g.add_argument("--clip-high", type=float, default=0.28, help="ratio clipped above at 1 + this (DAPO: 0.28)")
    g.add_argument("--beta", type=float, default=0.0, help="weight of the k3 KL penalty to the starting model")
    g.add_argument("--updates", type=int, default=1,
                   help="gradient steps per rollout batch (1 = on-policy; more reuse it, off-policy)")
    g.add_argument("--drop-zero-signal", action=argparse.BooleanOptionalAction, default=False,
                   help="leave groups whose answers all score the same out of the loss (DAPO's dynamic "
                        "sampling without its refill: the batch shrinks)")
    g = p.add_argument_group("optimization")
    g.add_argument("--max-steps", type=int, help="rollout batches")
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear warmup, in rollout batches")
    g.add_argument("--min-lr-ratio", type=float, default=1.0, help="cosine decays to this fraction (1 = constant)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on matrices")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm (0 = off)")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard policy, reference and AdamW state over the processes with FSDP2 "
                        "(fully_shard); each process samples and trains on 1/N of the prompts")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-interval", type=int, help="steps between greedy test evaluations (0 = start and end)")
    g.add_argument("--eval-limit", type=int, help="evaluate on the first N test rows (0 = all)")
    g.add_argument("--eval-batch-size", type=int, default=100, help="prompts generated at once")
    add_common_args(p.add_argument_group("common (--device, --dtype, --compile, --seed)"))
    first, _ = p.parse_known_args(argv)
    p.set_defaults(**{k: v for k, v in PRESETS[first.preset].items() if k != "preamble"})  # preamble: see main
    args = p.parse_args(argv)
    for flag in ("prompts", "max_steps", "updates", "max_new_tokens", "eval_batch_size",
                 "stop_after"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            fail(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    # e.g. a negative --beta rewards drifting away, a negative --grad-clip flips the step: silently wrong runs
    for flag in ("lr", "beta", "clip_low", "clip_high", "grad_clip", "eval_limit", "min_lr_ratio", "warmup_steps"):
        if (getattr(args, flag) or 0) < 0:
            fail(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 0")
    if note := warmup_note(args.warmup_steps, args.max_steps):
        print(f"grpo.py: {note}")
    if args.group_size < 2:
        fail(f"--group-size {args.group_size}: a group needs at least 2 answers to have a mean to compare with")
    if args.temperature <= 0:  # greedy answers: a group's G answers are one answer, and the ratio has no pi
        fail(f"--temperature {args.temperature}: a group's answers would all be the same greedy answer (no "
             f"signal); give a temperature above 0")
    return args


def fail(msg):
    raise SystemExit(f"grpo.py: error: {msg}")


# -----------------------------------------------------------------------------
# 0. Data and model: {prompt, answer} rows, a checkpoint and its tokenizer


def gsm8k_rows(path):
    """GSM8K's {question, answer} lines -> {prompt, answer} rows, the answer being the text after '####'.
    {"question": "Tom has 3...", "answer": "He has 3 + 4 = 7.\\n#### 7"} -> {"prompt": "Tom has 3...", "answer": "7"}"""
    rows = []
    for lineno, line in enumerate(open(path, encoding="utf-8"), 1):
        if line.strip():
            r = json.loads(line)
            if "question" not in r or "####" not in r.get("answer", ""):
                raise ValueError(f"{path}:{lineno}: a GSM8K row needs 'question' and an 'answer' ending '#### N'")
            rows.append({"prompt": r["question"], "answer": r["answer"].split("####")[-1].strip()})
    return rows


def load_rows(data):
    """--data -> (train rows, test rows), each {"prompt", "answer"}."""
    if data in bpe.TASK_DATA:  # bpe.py's task, written to data/task*/ on first use
        data = str(bpe.task_folder(data))
    folder = os.path.join("data", "gsm8k") if data == "gsm8k" else data
    if data != "gsm8k" and not os.path.isdir(folder):  # gsm8k's folder is made by its download below
        fail(f"--data {data!r}: {'a file' if os.path.isfile(data) else 'no such folder'}; give a folder with "
             f"rl.jsonl + test.jsonl ({{prompt, answer}} rows), or 'task', 'task-columns' or 'gsm8k'")
    if os.path.exists(os.path.join(folder, "rl.jsonl")):
        return tuple(bpe.read_rows(os.path.join(folder, f"{s}.jsonl"), "rl") for s in ("rl", "test"))
    for split in ("train", "test"):
        if data == "gsm8k" and not os.path.exists(os.path.join(folder, f"{split}.jsonl")):
            download(GSM8K_URL.format(split), os.path.join(folder, f"{split}.jsonl"))
        if not os.path.exists(os.path.join(folder, f"{split}.jsonl")):
            fail(f"{folder} holds neither rl.jsonl ({{prompt, answer}}) nor GSM8K's {split}.jsonl")
    return tuple(gsm8k_rows(os.path.join(folder, f"{s}.jsonl")) for s in ("train", "test"))


def load_policy(init):
    """--init -> (model, tokenizer, the prompt template it was trained with or None): gpt2.load_with_tokenizer,
    which names the command that makes a missing preset input."""
    try:
        model, tok, ckpt = load_with_tokenizer(init)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    if (ckpt or {}).get("method") == "rm":
        fail(f"--init {init} is a reward model (reward_model.py --method rm), not a policy; give the SFT model "
             f"(sft.py's checkpoint)")
    return model, tok, (ckpt or {}).get("template")


# -----------------------------------------------------------------------------
# 1. Rollouts: G answers per prompt, scored by the verifier


def score(text, answer, format_reward=0.0, verifier="number", stop=bpe.ENDOFTEXT):
    """The verifier (1 when the final number is the answer; with verifier="boxed", the last \\boxed{}), plus
    format_reward when the answer stopped on its own (with `stop`) and states a number (a boxed answer).
    score("3 + 4 = 7<|endoftext|>", "7", 0.1) -> 1.1"""
    stopped = text.endswith(stop)
    stated = bpe.boxed_answer(text) if verifier == "boxed" else bpe.final_answer(text)
    fmt = format_reward if stopped and stated is not None else 0.0
    return bpe.VERIFIERS[verifier](text, answer) + fmt


def row_prompt(tok, row, args):
    """An RL row {prompt, input?} -> the ids the policy is asked with: bpe.prompt_ids in the run's --template,
    --preamble and --system (rollouts, evaluation and the length check all ask this way)."""
    return bpe.prompt_ids(tok, row["prompt"], getattr(args, "template", "alpaca"), args.preamble,
                          getattr(args, "system", None), row.get("input", ""))


@torch.no_grad()
def rollout(model, tok, rows, G, args, device, dtype):
    """Each row's prompt G times -> a batch of B = len(rows) * G answers, group by group (rows 0..G-1 answer
    the first prompt). Returns a dict: idx (B, T + N) prompt + answer tokens, attn (B, T + N) 1 on real
    tokens (left padding before the prompt and the tail after an answer's end-of-text are 0), mask (B, N) the
    answer tokens, logp (B, N) their sampling log-probabilities, rewards (B,), correct (B,), T,
    V (the tokenizer's vocabulary size: the logits past it are never drawn nor normalized over)."""
    template, verifier = getattr(args, "template", "alpaca"), getattr(args, "verifier", "number")
    prompts = [row_prompt(tok, r, args) for r in rows for _ in range(G)]
    stop = bpe.stop_id(tok, template)
    idx, attn = left_pad(prompts, stop, device)
    with autocast(device, dtype):
        tokens, mask, logp = sample(model, idx, args.max_new_tokens, attention_mask=attn,
                                    temperature=args.temperature, eos_id=stop, vocab_size=tok.n_vocab,
                                    sync=getattr(args, "fsdp", False))
    texts = [tok.decode([t for t, m in zip(ts, ms) if m]) for ts, ms in zip(tokens.tolist(), mask.tolist())]
    answers = [r["answer"] for r in rows for _ in range(G)]
    stop_text = tok.decode([stop])
    rewards = torch.tensor([score(t, a, args.format_reward, verifier, stop_text) for t, a in zip(texts, answers)],
                           device=device)
    correct = torch.tensor([bpe.VERIFIERS[verifier](t, a) for t, a in zip(texts, answers)], device=device)
    return dict(idx=torch.cat([idx, tokens], 1), attn=torch.cat([attn, mask.long()], 1), mask=mask.float(),
                logp=logp.float(), rewards=rewards, correct=correct, T=idx.size(1), texts=texts, V=tok.n_vocab)


def token_logprobs(model, idx, attn, T, temperature=1.0, vocab_size=None):
    """Log-probabilities of the answer tokens idx[:, T:] under the model (one forward pass over prompt +
    answer), with the temperature the rollouts were sampled at, and the entropy of each of those
    distributions, over the tokenizer's vocab_size ids as in sampling. -> logp (B, N), entropy (B, N)"""
    logits, _ = model(idx[:, :-1], attention_mask=attn[:, :-1])  # position t predicts token t + 1
    logits = logits[:, T - 1:, :vocab_size].float() / max(temperature, 1e-6)  # (B, N, V): the answer's predictions
    logprobs = logits.log_softmax(-1)
    logp = logprobs.gather(-1, idx[:, T:, None]).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logp, entropy


# -----------------------------------------------------------------------------
# 2. Advantages: reward minus the group mean, optionally over the group std


def group_advantages(rewards, G, baseline=True, scale=True, eps=1e-4):
    """rewards (B,) laid out group by group -> advantages (B,) and, per group, whether it has no signal
    (every answer scored exactly the same). Such a group is never divided by its std (0): with the baseline
    its advantages are exactly 0, never NaN; without, they are its raw rewards.
    group_advantages(tensor([1., 0., 1., 1.]), 2) -> (tensor([0.71, -0.71, 0., 0.]), tensor([False, True]))"""
    r = rewards.view(-1, G)  # (groups, G)
    zero = (r == r[:, :1]).all(1)  # exact: a float mean of 0.1s is not exactly 0.1, nor their std exactly 0
    adv = (r - r.mean(1, keepdim=True)).masked_fill(zero[:, None], 0.0) if baseline else r
    if scale:
        std = r.std(1, keepdim=True)  # unbiased, as GRPO's reference code and TRL
        adv = torch.where(zero[:, None], adv, adv / (std + eps))
    return adv.reshape(-1), zero


# -----------------------------------------------------------------------------
# 3. The loss: clipped ratio, k3 KL, and the three ways to aggregate token losses


def k3_kl(logp, ref_logp):
    """Per-token KL(pi || pi_ref) estimate of Schulman's k3: r - log r - 1 with r = pi_ref / pi, on tokens drawn
    from pi. Unbiased, and >= 0 token by token (x - 1 >= log x). k3_kl(tensor([-1.]), tensor([-1.])) -> 0."""
    d = ref_logp - logp
    return d.exp() - d - 1


def aggregate(loss, mask, how, max_len=None):
    """Token losses (B, N) and the answer mask (B, N) -> one number.
    grpo: each answer's mean, then the mean over answers; dr_grpo: the sum / (B * max_len), a constant;
    dapo: the mean over every answer token of the batch."""
    if how == "grpo":
        return ((loss * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    if how == "dr_grpo":
        return (loss * mask).sum() / (mask.size(0) * (max_len or mask.size(1)))
    if how == "dapo":
        return (loss * mask).sum() / mask.sum().clamp(min=1)
    raise ValueError(f"unknown loss aggregation {how!r}; valid: {', '.join(LOSSES)}")


def grpo_loss(logp, old_logp, adv, mask, *, clip_low=0.2, clip_high=0.28, beta=0.0, ref_logp=None, how="grpo",
              max_len=None):
    """The GRPO objective, negated for a minimizer. logp (B, N) under the policy being trained, old_logp the
    policy that sampled (no gradient), adv (B,) per answer, mask (B, N). -> (loss, stats)"""
    ratio = (logp - old_logp).exp()
    a = adv[:, None]
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high)
    per_token = -torch.min(ratio * a, clipped * a)  # pessimistic: the clip removes the incentive, never adds
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    if beta:
        per_token = per_token + beta * kl
    m = mask.sum().clamp(min=1)
    stats = {"kl": float((kl.detach() * mask).sum() / m), "ratio": float((ratio.detach() * mask).sum() / m),
             "ratio_dev": float(((ratio.detach() - 1).abs() * mask).max()),  # 0 on an on-policy step
             "clip_frac": float((((ratio < 1 - clip_low) | (ratio > 1 + clip_high)).float() * mask).sum() / m)}
    return aggregate(per_token, mask, how, max_len), stats


# -----------------------------------------------------------------------------
# 4. Evaluation: greedy answers to held-out problems, scored by the verifier


@torch.no_grad()
def accuracy(model, tok, rows, args, device, dtype):
    """Fraction of rows whose greedy answer the verifier accepts. (Under --fsdp every process answers all rows.)"""
    hits = 0
    template, verifier = getattr(args, "template", "alpaca"), getattr(args, "verifier", "number")
    stop = bpe.stop_id(tok, template)
    for k in range(0, len(rows), args.eval_batch_size):
        batch = rows[k:k + args.eval_batch_size]
        idx, attn = left_pad([row_prompt(tok, r, args) for r in batch], stop, device)
        with autocast(device, dtype):
            tokens, mask, _ = sample(model, idx, args.max_new_tokens, attention_mask=attn, temperature=0,
                                     eos_id=stop, vocab_size=tok.n_vocab,
                                     sync=getattr(args, "fsdp", False))
        for r, ts, ms in zip(batch, tokens.tolist(), mask.tolist()):
            hits += bpe.VERIFIERS[verifier](tok.decode([t for t, m in zip(ts, ms) if m]), r["answer"])
    return hits / len(rows)


# -----------------------------------------------------------------------------
# 5. The loop


def train_step(model, ref, optimizer, batch, args, device, dtype, scaler=None):
    """Advantages for one rollout batch, then args.updates gradient steps on it (scaler: gpt2.grad_scaler's,
    which scales the loss in fp16 and does nothing otherwise). -> stats of the batch."""
    scaler = grad_scaler(device, dtype) if scaler is None else scaler
    adv, zero = group_advantages(batch["rewards"], args.group_size, args.baseline, args.scale_rewards)
    keep = torch.ones_like(adv, dtype=torch.bool)
    if args.drop_zero_signal:
        keep = ~zero.repeat_interleave(args.group_size)
    stats = {"reward": float(batch["rewards"].mean()), "train_accuracy": float(batch["correct"].mean()),
             "zero_signal": float(zero.float().mean()), "length": float(batch["mask"].sum(1).mean()),
             "max_logp_diff": 0.0}
    signal = adv[keep].any() | bool(args.beta and keep.any())  # --beta: the KL term pulls back even then
    if args.fsdp:  # every process must skip, or none: each forward pass gathers weights from all of them
        signal = signal.int()
        torch.distributed.all_reduce(signal, op=torch.distributed.ReduceOp.MAX)
    if not signal:  # every advantage is 0, no KL term: the gradient is 0; a step would replay Adam's momentum
        return {**stats, "loss": 0.0, "skipped": 1}  # no forward pass: no KL, clip or entropy to report
    idle = args.fsdp and not keep.any()  # all dropped here, not elsewhere: still run the passes (FSDP gathers
    if idle:                              # each layer's weights from every process), with this share weighted 0
        keep = torch.ones_like(keep)
    idx, attn, mask, adv = batch["idx"][keep], batch["attn"][keep], batch["mask"][keep], adv[keep]
    T = batch["T"]
    ref_logp = None
    if ref is not None:
        with torch.no_grad(), autocast(device, dtype):
            ref_logp, _ = token_logprobs(ref, idx, attn, T, args.temperature, batch["V"])
    old_logp = None
    for u in range(args.updates):
        with autocast(device, dtype):
            logp, entropy = token_logprobs(model, idx, attn, T, args.temperature, batch["V"])
        if u == 0:  # the policy that sampled is this one: recomputed (not the cache's) numbers make ratio == 1
            old_logp = logp.detach()
            stats["max_logp_diff"] = float(((old_logp - batch["logp"][keep]).abs() * mask).max())
            stats["entropy"] = float((entropy.detach() * mask).sum() / mask.sum())
        loss, s = grpo_loss(logp, old_logp, adv, mask, clip_low=args.clip_low, clip_high=args.clip_high,
                            beta=args.beta, ref_logp=ref_logp, how=args.loss, max_len=args.max_new_tokens)
        if args.fsdp:  # FSDP averages gradients over processes: weight each by its share of answers (tokens for dapo)
            n = mask.sum() if args.loss == "dapo" else torch.tensor(float(mask.size(0)), device=mask.device)
            n = n * (not idle)
            total = n.clone()
            torch.distributed.all_reduce(total)
            loss = loss.nan_to_num(0.0) * n * torch.distributed.get_world_size() / total
        scaler.scale(loss).backward()  # fp16: scaled up so that small gradients do not underflow to 0
        if args.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(optimizer)  # skipped if the scaled gradients overflowed (the scale then drops)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return {**stats, **s, "loss": loss.item(), "skipped": 0}  # kl, clip_frac: of the last update


def mean_over_processes(stats):
    """Under --fsdp: each statistic averaged over the processes (max_logp_diff: the maximum), for the log."""
    keys = sorted(stats)
    t = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64)
    top = t.clone()
    torch.distributed.all_reduce(t)
    torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX)
    t /= torch.distributed.get_world_size()
    return {k: float(top[i] if k == "max_logp_diff" else t[i]) for i, k in enumerate(keys)}


def main(argv=None):
    args = parse_args(argv)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    args, resume = resume_settings(args, "grpo.py", "group_size", argv)  # a resumed run: its own settings
    try:
        device = pick_device(args.device)
    except ValueError as e:
        fail(e)
    rank, world = 0, 1
    if getattr(args, "fsdp", False):
        rank, world, device = init_distributed(device)
        if args.prompts % world:
            fail(f"--prompts {args.prompts} must be a multiple of the {world} processes")
        if rank:  # one process reports
            sys.stdout = open(os.devnull, "w")
    else:
        args.fsdp = False
    dtype = pick_dtype(args.dtype, device)
    seed_everything(args.seed)
    model, tok, trained = load_policy(args.init)
    if args.preamble is None:  # the prompt template the starting model was trained with, else the preset's
        args.preamble = bool(trained["preamble"]) if trained else PRESETS[args.preset]["preamble"]
    try:
        train_rows, test_rows = load_rows(args.data)
    except (ValueError, FileNotFoundError) as e:
        fail(e)
    if args.eval_limit:
        test_rows = test_rows[:args.eval_limit]
    if len(train_rows) < args.prompts:
        fail(f"{len(train_rows)} training prompts do not fill one batch of --prompts {args.prompts}")
    try:  # a chat template needs its end-of-turn token in the tokenizer (the task's byte tokens have none)
        bpe.stop_id(tok, getattr(args, "template", "alpaca"))
    except ValueError as e:
        fail(f"--template {args.template}: {e}; use --template alpaca with this model")
    room = model.config.block_size - args.max_new_tokens  # every prompt + its longest answer must fit the context
    if room < 1:
        fail(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's "
             f"{model.config.block_size}-token context; lower it")
    long = [r for r in train_rows + test_rows if len(row_prompt(tok, r, args)) > room]
    if long:
        fail(f"{len(long)} prompts of --data {args.data} are longer than the {room} tokens the model's "
             f"{model.config.block_size}-token context leaves next to --max-new-tokens {args.max_new_tokens} "
             f"(the first: {long[0]['prompt'][:40]!r}...); lower --max-new-tokens or leave them out")
    model.to(device).eval()  # eval: no dropout, so the ratio compares the same function on both sides
    # the reference for the KL term (and the KL metric): the starting model, frozen
    ref = copy.deepcopy(model).requires_grad_(False)
    if resume:
        load_model_state(model, resume["model"], ckpt_path)
    if args.fsdp:
        fsdp_shard(model), fsdp_shard(ref)
    # --compile: the training passes (the sampler steps one token at a time through its cache, left eager)
    model_fwd, ref_fwd = maybe_compile(model, args.compile), maybe_compile(ref, args.compile)
    optimizer = model.configure_optimizer(args.weight_decay, args.lr, (0.9, 0.99), device)
    scaler = grad_scaler(device, dtype)
    step = 0
    if resume and args.fsdp:  # the optimizer state was saved whole: each process takes its shard of it
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, optimizer, resume["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
    if resume:
        if not args.fsdp:
            optimizer.load_state_dict(resume["optimizer"])
        restore_scaler(scaler, resume.get("scaler"))
        step = resume["step"]
        set_rng_state(resume["rng"])
        print(f"resumed from {ckpt_path} at step {step}")
    metrics = MetricsLog(args.out_dir, resume_step=step if resume else None) if rank == 0 else None
    log = metrics.log if rank == 0 else (lambda **row: None)
    print(f"{args.init}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | {len(train_rows):,} "
          f"prompts, {len(test_rows)} test | {args.max_steps} steps of {args.prompts} prompts x {args.group_size} "
          f"answers | loss {args.loss}, beta {args.beta}, updates {args.updates} | device {device}")

    def evaluate(done):
        t = time.time()
        acc = accuracy(model, tok, test_rows, args, device, dtype)
        log(step=done, accuracy=acc, eval_s=round(time.time() - t, 2))
        tqdm.write(f"step {done:4d} | test accuracy (greedy) {acc:.1%}")

    def checkpoint(done):
        state, opt_state = None, optimizer.state_dict()
        if args.fsdp:  # every process takes part in gathering weights and optimizer state; one writes them
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
            state = full_state_dict(model)
            opt_state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                            cpu_offload=True))
        if rank == 0:
            save_checkpoint(ckpt_path, model, state=state, optimizer=opt_state, scaler=scaler.state_dict(), step=done,
                            train_s=train_time, rng=rng_state(),
                            args=vars(args), tokenizer=tok.dumps(), template={"preamble": args.preamble})

    if step == 0:
        evaluate(0)
    stop = min(args.max_steps, args.stop_after or args.max_steps)
    if stop <= step:  # resumed at or past where this run stops: nothing to train
        end_distributed()
        return print(f"nothing to do: the run in {args.out_dir} is at step {step} of {args.max_steps}")
    # seconds of training so far: a resumed run goes on counting from its checkpoint's
    t0, train_time = time.time(), (resume or {}).get("train_s", 0.0)
    bar = tqdm(range(step, stop), initial=step, total=stop, desc="grpo", dynamic_ncols=True, disable=rank > 0)
    for step in bar:
        lr = lr_at(step, args.lr, args.warmup_steps, args.max_steps, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = [train_rows[i] for i in batch_rows(step, len(train_rows), args.prompts, args.seed)]
        rows = rows[rank::world]  # --fsdp: this process's share of the prompts (all of them otherwise)
        t = time.time()
        batch = rollout(model, tok, rows, args.group_size, args, device, dtype)
        t_roll = time.time() - t
        s = train_step(model_fwd, ref_fwd, optimizer, batch, args, device, dtype, scaler)
        if args.fsdp:
            s = mean_over_processes(s)
        done = step + 1
        log(step=done, lr=lr, rollout_s=round(t_roll, 3), step_s=round(time.time() - t, 3),
                    **{k: round(v, 6) if isinstance(v, float) else v for k, v in s.items()})
        bar.set_postfix(reward=f"{s['reward']:.2f}", zero=f"{s['zero_signal']:.2f}", kl=f"{s.get('kl', 0):.4f}")
        if (args.eval_interval and done % args.eval_interval == 0) or done == stop:
            train_time += time.time() - t0
            evaluate(done)
            checkpoint(done)
            t0 = time.time()
    bar.close()
    if stop == args.max_steps:
        log(step=stop, train_s=round(train_time, 1))
    print(f"{'done' if stop == args.max_steps else 'stopped'} at step {stop}: {train_time:.0f} s | checkpoint {ckpt_path}")
    if rank == 0 and (plot := plot_metrics(args.out_dir, f"grpo {args.preset} ({args.loss})")):
        print(f"plot {plot}")
    end_distributed()  # --fsdp: the other processes wait for process 0's checkpoint and plot


# =============================================================================
# Plumbing: the plot


def plot_metrics(out_dir, title):
    """<out_dir>/grpo.png: test accuracy, reward, zero-signal fraction, KL, clip fraction, entropy and answer
    length against the step (None without matplotlib)."""
    keys = ("accuracy", "reward", "zero_signal", "kl", "clip_frac", "entropy", "length", "loss")
    return MetricsLog.plot_grid(out_dir, keys, "grpo.png", title)


if __name__ == "__main__":
    main()
