"""
reward_model.py: learning what people prefer. From pairs of answers to one prompt, one marked better
("chosen") and one worse ("rejected"), either a reward model that scores any answer with one number
(Bradley-Terry), or, with --method dpo, the policy itself trained on the pairs (DPO), with no reward model.

What it teaches, top to bottom:
  1. The data: {"prompt", "chosen", "rejected"} rows, each answer in the prompt template of bpe.py, checked:
     a pair whose answers are equal teaches nothing, and an answer cut to fit the context may lose exactly
     the part that differs, so such pairs are dropped and counted, never silently truncated. Or (--pairs
     samples) pairs of the starting model's own answers, judged, as InstructGPT's labelers compared the
     model's samples: a reward model learns only the mistakes its pairs show it.
  2. The reward model: a GPT with a value head, a Linear(n_embd, 1) reading the final hidden state at the
     last real token of prompt + response (its end-of-text), never a padding position.
  3. The Bradley-Terry loss: P(chosen > rejected) = sigmoid(r_chosen - r_rejected), so the loss is
     -log sigmoid(r_chosen - r_rejected - margin), with an optional margin (per pair, a "margin" field, or
     --margin for all: the margin-ranking variant) and optional reward centering, c * mean((r_c + r_r)^2),
     which pins the rewards' mean at zero (the loss alone sees only differences). Optionally (--lm-alpha) plus
     the chosen answers' next-token loss through the GPT's own lm_head, so the body keeps computing the right
     answer, the thing a check of the written one needs; and (--head-lr-mult) a faster-learning value head.
  4. DPO (Rafailov et al., 2023): the policy's own log-probabilities are the reward. With a frozen reference
     (the starting model), the implicit reward of a response is beta * (log pi(y|x) - log ref(y|x)) and the
     loss is -log sigmoid(implicit reward of chosen - that of rejected). Only the difference is pushed up:
     the chosen log-probability may well fall, as long as the rejected one falls faster (both answers share
     most of their tokens, so pushing one down drags the other), and the margin grows while it does.
  5. Measured on held-out pairs: the loss, pair accuracy (r_chosen > r_rejected) and the mean reward margin;
     a plot of the rewards of chosen vs rejected answers; for DPO on the task, the verifier's accuracy of the
     greedy answers to the test problems before and after.

The CPU pipeline, on the arithmetic task of bpe.py (starts from sft.py's output):
    python reward_model.py                         # reward model -> out/task-rm/ckpt.pt (what ppo.py loads);
                                                   #   task preset: 3,300 steps, lr 5e-4, --lm-alpha 1, head 10x
    python reward_model.py --method dpo            # DPO from the SFT model -> out/task-dpo/ckpt.pt
    python reward_model.py --lora                  # LoRA adapters + the value head
    python reward_model.py --pairs samples --out-dir out/task-rm-samples   # pairs of the SFT model's own answers
    python reward_model.py --resume                # continue out/task-rm from its checkpoint
    python reward_model.py --preset task-columns   # answers worked column by column -> out/task-columns-rm
The real recipe (a GPU; GPT-2 medium, 355M, downloaded and instruction-tuned first):
    python sft.py --preset gpt2-alpaca             # -> out/gpt2-alpaca/ckpt.pt, the policy and the reference
    python reward_model.py --preset gpt2-dpo       # 1,100 polite / impolite pairs, DPO, beta 0.1, 1 epoch
"""

import argparse
import copy
import os
import random
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import bpe
from gpt2 import (MetricsLog, add_common_args, add_lora, autocast, download, epoch_order, grad_scaler, restore_scaler,
                  left_pad, load_lora_state, load_model_state, lora_state_dict, lr_at, warmup_note,
                  load_with_tokenizer, maybe_compile, merge_lora, pick_device, pick_dtype, resume_settings, sample,
                  save_checkpoint, seed_everything, rng_state, set_rng_state)

# -----------------------------------------------------------------------------
# Runs. A preset fills in defaults; a flag given on the command line wins.

PRESETS = {
    # the arithmetic task on a CPU: the SFT model, the task's preference pairs (right vs plausible wrong)
    "task": dict(init="out/task-sft/ckpt.pt", data="task", method="rm", preamble=False, epochs=1,
                 max_steps={"rm": 3300, "dpo": 300}, batch_size=16, lr={"rm": 5e-4, "dpo": 1e-4},
                 lora_lr={"rm": 3e-3, "dpo": 1e-3}, beta=0.1, weight_decay=0.0, warmup_steps=20, eval_interval=150,
                 val_pairs=500, max_new_tokens=24, lm_alpha=1.0, head_lr_mult=10.0),  # the last two: rm only
    # Raschka's DPO notebook (ch. 7, bonus): GPT-2 medium after instruction tuning (sft.py --preset gpt2-alpaca,
    # as the notebook starts from chapter 7's SFT model), the polite / impolite pairs split 85/5/10, 1 epoch
    "gpt2-dpo": dict(init="out/gpt2-alpaca/ckpt.pt", data="data/instruction_preference_data.json", method="dpo",
                     preamble=True, epochs=1, max_steps=None, batch_size=8, lr={"rm": 1e-5, "dpo": 5e-6},
                     lora_lr={"rm": 1e-4, "dpo": 5e-5}, beta=0.1, weight_decay=0.01,
                     warmup_steps=0, eval_interval=20, val_pairs=0, max_new_tokens=256, out_dir="out/gpt2-dpo"),
}
# the same on the task whose answers are worked column by column: longer answers, and 1,400 steps, within 10
# minutes on one CPU thread (a 3,300-step run passed 99% held-out pair accuracy at half its steps)
PRESETS["task-columns"] = {**PRESETS["task"], "init": "out/task-columns-sft/ckpt.pt", "data": "task-columns",
                           "max_steps": {"rm": 1400, "dpo": 300}, "max_new_tokens": 64}
PREFERENCE_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/04_preference-tuning-with-dpo/"
                  "instruction-data-with-preference.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    g = p.add_argument_group("run")
    g.add_argument("--preset", default="task", choices=list(PRESETS), help="defaults for a run (default: task)")
    g.add_argument("--init", help="the starting model: a checkpoint, gpt2 | gpt2-medium | ..., or an HF folder")
    g.add_argument("--data", help="task | task-columns (bpe.py's preference pairs) | a folder of its files | a "
                                  ".jsonl / .json of pairs")
    g.add_argument("--split", default="85/5/10", help="train/val/test percentages of a --data file")
    g.add_argument("--pairs", default="given", choices=["given", "samples", "both"],
                   help="task: the data's pairs (given); pairs of --init's own answers to the training prompts, "
                        "judged by the verifier (samples); or both, held out on the given ones")
    g.add_argument("--samples-per-prompt", type=int, default=4, help="--pairs samples|both: answers drawn per prompt")
    g.add_argument("--out-dir", help="where metrics.jsonl, ckpt.pt and the plots go (default: out/task-rm|dpo)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out-dir with its own settings")
    g.add_argument("--stop-after", type=int, help="stop (with a checkpoint) after this step; --resume goes on")
    g = p.add_argument_group("method")
    g.add_argument("--method", choices=["rm", "dpo"], help="rm: a Bradley-Terry reward model; dpo: the policy itself")
    g.add_argument("--margin", type=float, default=0.0, help="rm: required reward gap (a row's 'margin' field wins)")
    g.add_argument("--center-rewards", type=float, default=0.0, help="rm: weight of mean((r_c + r_r)^2) in the loss")
    g.add_argument("--lm-alpha", type=float, default=0.0,
                   help="rm: add this x the chosen answers' next-token loss, so the body keeps the LM's features")
    g.add_argument("--head-lr-mult", type=float, default=1.0, help="rm: the value head's learning rate is this x --lr")
    g.add_argument("--beta", type=float, help="dpo: strength of the pull towards the reference")
    g.add_argument("--rpo-alpha", type=float, default=0.0,
                   help="dpo: add this x the chosen answers' token NLL (RPO; 0 = plain DPO) so they stay likely")
    g.add_argument("--lora", action=argparse.BooleanOptionalAction, default=False,
                   help="train rank-r adapters on frozen weights (and the value head) instead of every weight")
    g.add_argument("--lora-r", type=int, default=8, help="adapter rank")
    g.add_argument("--lora-alpha", type=float, default=16, help="adapter scale is alpha / r")
    g.add_argument("--lora-targets", default="c_attn,c_proj,c_fc", help="comma-separated Linear names to adapt")
    g.add_argument("--preamble", action=argparse.BooleanOptionalAction,
                   help="start prompts with Alpaca's 'Below is an instruction...' sentence (default: as the --init "
                        "checkpoint was trained, else the preset's)")
    g.add_argument("--max-len", type=int, help="longest prompt + response in tokens (default: the model's context)")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, help="passes over the training pairs")
    g.add_argument("--max-steps", type=int,
                   help="optimizer steps (default: epochs x steps if --epochs is given, else the preset's steps)")
    g.add_argument("--batch-size", type=int, help="pairs per step")
    g.add_argument("--lr", type=float, help="peak learning rate (default: the preset's, for the method, full or LoRA)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to this fraction of --lr")
    g.add_argument("--warmup-steps", type=int, help="linear warmup steps")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay on matrices")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm (0 = off)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-interval", type=int, help="steps between evaluations (0 = start and end only)")
    g.add_argument("--val-pairs", type=int, help="task: hold out the last N preference pairs for validation")
    g.add_argument("--eval-limit", type=int, default=0, help="evaluate on the first N val pairs / test rows (0 = all)")
    g.add_argument("--eval-batch-size", type=int, default=64, help="pairs scored (or prompts generated) at once")
    g.add_argument("--max-new-tokens", type=int, help="longest generated answer: dpo's to a test prompt, and "
                   "--pairs samples|both's samples (task-columns: 64)")
    add_common_args(p.add_argument_group("common (--device, --dtype, --compile, --seed)"))
    first, _ = p.parse_known_args(argv)
    later = ("lr", "lora_lr", "max_steps", "epochs", "preamble")  # filled in by main: see there
    p.set_defaults(**{k: v for k, v in PRESETS[first.preset].items() if k not in later})
    args = p.parse_args(argv)
    for flag in ("batch_size", "max_steps", "epochs", "eval_batch_size", "max_new_tokens", "stop_after"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            fail(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    # a negative clip, head lr or loss weight would turn its term around (ascent, silently)
    for flag in ("lr", "warmup_steps", "grad_clip", "head_lr_mult", "lm_alpha", "rpo_alpha", "center_rewards",
                 "eval_limit", "min_lr_ratio"):
        if (getattr(args, flag) or 0) < 0:
            fail(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 0")
    if args.max_len is not None and args.max_len < 2:  # a prompt token and the answer's end-of-text, at least
        fail(f"--max-len {args.max_len}: must be at least 2 (leave it out for the model's context)")
    if args.method == "dpo" and args.beta <= 0:  # 0: every implicit reward is 0, the loss a constant ln 2
        fail(f"--beta {args.beta}: DPO needs a beta above 0 (at 0 its loss is a constant; below, it learns to "
             f"prefer the rejected answers)")
    if args.pairs != "given" and args.samples_per_prompt < 2:
        fail(f"--samples-per-prompt {args.samples_per_prompt}: a pair needs a right and a wrong answer to one "
             f"prompt; give 2 or more")
    args.out_dir = args.out_dir or f"out/{args.preset}-{args.method}"  # out/task-rm, out/task-columns-dpo, ...
    return args


def fail(msg):
    raise SystemExit(f"reward_model.py: error: {msg}")


# -----------------------------------------------------------------------------
# 1. Data: pairs -> two token sequences that share their prompt


def read_pairs(path):
    """Preference rows of a .jsonl / .json file; Alpaca-style rows (instruction, input, chosen, rejected, as in
    Raschka's preference file) come back with their instruction as the prompt."""
    items, where = bpe.read_items(path)
    items = [{"prompt": r["instruction"], **{k: v for k, v in r.items() if k != "instruction"}}
             if isinstance(r, dict) and "prompt" not in r and "instruction" in r else r for r in items]
    return [bpe.check_row(r, "preference", w) for r, w in zip(items, where)]


def load_splits(args):
    """--data -> (train, val, test): pair rows, pair rows, and the task's test problems (or [] for a file).
    "task" holds out its last --val-pairs preference pairs; a file is split in order, train / test / val."""
    folder = bpe.task_folder(args.data)
    if os.path.isdir(folder):
        pairs = bpe.read_rows(os.path.join(folder, "preference.jsonl"), "preference")
        test_path = os.path.join(folder, "test.jsonl")
        test = bpe.read_rows(test_path, "rl") if os.path.exists(test_path) else []
        n_val = max(1, args.val_pairs or len(pairs) // 20)
        if n_val >= len(pairs):
            fail(f"--val-pairs {n_val} holds out all {len(pairs)} preference pairs of {folder}; lower it")
        return pairs[:-n_val], pairs[-n_val:], test
    if args.data == PRESETS["gpt2-dpo"]["data"] and not os.path.exists(args.data):
        download(PREFERENCE_URL, args.data)
    if not os.path.exists(args.data):
        fail(f"--data {args.data!r}: no such file or folder, and not 'task' or 'task-columns'")
    rows = read_pairs(args.data)
    train, val, _ = bpe.split_by_percent(rows, args.split)
    return train, val, []


@torch.no_grad()
def sample_pairs(model, tok, rows, k, preamble, device, dtype, seed, batch_size=32, max_new_tokens=24):
    """Preference pairs from a model's own answers: k answers per prompt at temperature 1, judged by the task's
    verifier (standing in for the people who compare a model's samples in InstructGPT); a prompt with a right
    and a wrong answer gives one pair, the first of each. rows: {"prompt", "answer"}.
    -> [{"prompt", "chosen", "rejected"}], e.g. {"prompt": "What is 18 + 5?", "chosen": "18 + 5 = 23",
    "rejected": "18 + 5 = 24"}"""
    model.to(device).eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    pairs = []
    for i in tqdm(range(0, len(rows), batch_size), desc="sampling pairs", dynamic_ncols=True):
        chunk = rows[i:i + batch_size]
        idx, attn = left_pad([tok.encode_ordinary(bpe.format_prompt(r["prompt"], "", preamble)) for r in chunk
                              for _ in range(k)], tok.eot_token, device)
        with autocast(device, dtype):
            tokens, mask, _ = sample(model, idx, max_new_tokens, attention_mask=attn, temperature=1.0,
                                     eos_id=tok.eot_token, generator=gen, vocab_size=tok.n_vocab)
        texts = [tok.decode([t for t, m in zip(ts, ms) if m and t != tok.eot_token])
                 for ts, ms in zip(tokens.tolist(), mask.tolist())]
        for j, r in enumerate(chunk):
            answers = texts[j * k:(j + 1) * k]
            right = [a for a in answers if bpe.reward(a, r["answer"])]
            wrong = [a for a in answers if a not in right]  # each answer judged once
            if right and wrong:
                pairs.append({"prompt": r["prompt"], "chosen": right[0], "rejected": wrong[0]})
    return pairs


def with_sampled_pairs(args, gpt, tok, train_rows, val_rows, device, dtype, resume):
    """--pairs samples|both: the training (and for samples, validation) pairs made by sample_pairs from the
    training pairs' prompts and the task's RL prompts, saved to <out-dir>/sampled_pairs.jsonl (a resumed run
    reads them back). samples: the last --val-pairs of them are held out; both: the given held-out pairs stay."""
    path = os.path.join(args.out_dir, "sampled_pairs.jsonl")
    if resume and os.path.exists(path):
        made = bpe.read_rows(path, "preference")
    else:
        folder = bpe.task_folder(args.data)
        rl_path = os.path.join(str(folder), "rl.jsonl")
        if not os.path.isdir(str(folder)) or not os.path.exists(rl_path):
            fail(f"--pairs {args.pairs} needs the task's folder (prompts with answers to judge), not {args.data!r}")
        prompts = [{"prompt": r["prompt"], "answer": bpe.final_answer(r["chosen"])} for r in train_rows]
        prompts += bpe.read_rows(rl_path, "rl")
        made = sample_pairs(gpt, tok, prompts, args.samples_per_prompt, args.preamble, device, dtype, args.seed,
                            max_new_tokens=args.max_new_tokens)
        random.Random(args.seed).shuffle(made)
        os.makedirs(args.out_dir, exist_ok=True)
        bpe.write_rows(path, made)
    print(f"{len(made):,} pairs of the model's own answers ({path})")
    if args.pairs == "samples":
        n_val = max(1, args.val_pairs or len(made) // 20)
        if len(made) <= n_val:
            fail(f"only {len(made)} sampled pairs, not more than the {n_val} held out: the model's answers to a "
                 f"prompt are all right or all wrong; raise --samples-per-prompt, or lower --val-pairs")
        return made[:-n_val], made[-n_val:]
    both = train_rows + made
    random.Random(args.seed).shuffle(both)
    return both, val_rows


def encode_pairs(rows, tok, preamble, max_len, margin=0.0):
    """Each row -> (chosen (ids, mask), rejected (ids, mask), margin) with bpe.encode_example (mask: the
    response and its end-of-text). Dropped, and counted in a warning: pairs whose two answers are equal (no
    preference to learn) and pairs where either side is longer than max_len (cutting it could remove the very
    tokens in which the answers differ). encode_pairs([{"prompt": "Hi", "chosen": "Yo", "rejected": "No"}],
    byte_tokenizer(), False, 96) -> [((ids, mask), (ids, mask), 0.0)]"""
    out, same, long = [], 0, 0
    for r in rows:
        if r["chosen"].strip() == r["rejected"].strip():
            same += 1
            continue
        c = bpe.encode_example(tok, r["prompt"], r["chosen"], input=r.get("input", ""), preamble=preamble)
        j = bpe.encode_example(tok, r["prompt"], r["rejected"], input=r.get("input", ""), preamble=preamble)
        if max(len(c[0]), len(j[0])) > max_len:
            long += 1
            continue
        m = r.get("margin", margin)
        if not isinstance(m, (int, float)) or isinstance(m, bool):
            raise ValueError(f"pair {r['prompt'][:40]!r}: field 'margin' must be a number, got {type(m).__name__}")
        out.append((c, j, float(m)))
    if same or long:
        print(f"warning: dropped {same} of {len(rows)} pairs whose chosen and rejected answers are equal and "
              f"{long} longer than {max_len} tokens (raise --max-len, or shorten them)")
    if not out:
        raise ValueError(f"none of the {len(rows)} pairs is usable (see the warning above)")
    return out


def pad_pairs(pairs, pad_id):
    """A batch of B pairs -> ids (2B, L) right-padded, the chosen rows first and then the rejected ones,
    mask (2B, L) of response tokens, lengths (2B,), margins (B,). One forward pass scores both sides."""
    seqs = [c for c, _, _ in pairs] + [j for _, j, _ in pairs]
    L = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.bool)
    for row, (s, m) in enumerate(seqs):
        ids[row, :len(s)], mask[row, :len(s)] = torch.tensor(s), torch.tensor(m, dtype=torch.bool)
    lengths = torch.tensor([len(s) for s, _ in seqs])
    return ids, mask, lengths, torch.tensor([m for _, _, m in pairs])


class Loader:
    """Step -> batch of pairs; epoch e shuffles with the seed (seed, e). The state is the step alone, so a
    resumed run sees exactly the batches of the uninterrupted one."""

    def __init__(self, pairs, batch_size, seed, pad_id):
        self.pairs, self.B, self.seed, self.pad_id, self.epoch, self.order = pairs, batch_size, seed, pad_id, None, None
        self.steps_per_epoch = len(pairs) // batch_size
        if self.steps_per_epoch == 0:
            fail(f"{len(pairs)} pairs do not fill one batch of {batch_size}; lower --batch-size")

    def get(self, step):
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self.epoch:
            self.order, self.epoch = epoch_order(len(self.pairs), self.seed, epoch), epoch
        return pad_pairs([self.pairs[j] for j in self.order[i * self.B:(i + 1) * self.B]], self.pad_id)


# -----------------------------------------------------------------------------
# 2. The reward model: a GPT body and a value head at the last real token


class RewardModel(nn.Module):
    """GPT + Linear(n_embd, 1). The value head starts at zero, so an untrained reward model scores every answer
    0 and its loss on any pair is exactly ln 2 (the Bradley-Terry coin flip)."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt
        self.value_head = nn.Linear(gpt.config.n_embd, 1)
        nn.init.zeros_(self.value_head.weight), nn.init.zeros_(self.value_head.bias)

    def forward(self, idx, attention_mask=None, return_hidden=False):
        """idx (B, T) -> rewards (B,), read at each row's last real token: the last 1 of attention_mask (right
        padding needs no mask for the causal attention, only to find that token; left padding needs it for
        the positions too). return_hidden: also the final hidden states (B, T, C), for an LM loss on them.
        model(*left_pad([[5, 6], [7]])) -> tensor([r1, r2])"""
        if attention_mask is None:
            attention_mask = torch.ones_like(idx)
        right = bool(attention_mask[:, 0].all())  # every row starts with a token: plain causal attention
        h = self.gpt.hidden_states(idx, attention_mask=None if right else attention_mask)  # (B, T, C)
        last = (attention_mask.long() * torch.arange(1, idx.size(1) + 1, device=idx.device)).argmax(1)  # (B,)
        r = self.value_head(h[torch.arange(idx.size(0), device=idx.device), last]).squeeze(-1)  # (B,)
        return (r, h) if return_hidden else r


def right_mask(lengths, T):
    """lengths (B,) -> attention mask (B, T) of right-padded rows: right_mask([2, 1], 3) -> [[1, 1, 0], [1, 0, 0]]"""
    return (torch.arange(T, device=lengths.device)[None] < lengths[:, None]).long()


def bt_loss(r_chosen, r_rejected, margin=None, center=0.0):
    """Bradley-Terry: mean of -log sigmoid(r_c - r_r - margin), plus center * mean((r_c + r_r)^2).
    bt_loss(tensor([0.]), tensor([0.])) -> ln 2 = 0.6931"""
    diff = r_chosen - r_rejected - (margin if margin is not None else 0.0)
    loss = -F.logsigmoid(diff).mean()
    if center:
        loss = loss + center * ((r_chosen + r_rejected) ** 2).mean()
    return loss


# -----------------------------------------------------------------------------
# 3. DPO: log-probabilities of the responses under the policy and the reference


def response_logprobs(logits, ids, mask):
    """Logits (B, T-1, V) of the positions before each token of ids (B, T) -> the sum of log p(token | the ones
    before) over the response tokens (mask) of each row: (B,). The prompt and the padding count for nothing, so
    prompt length and padding do not change a response's log-probability."""
    logp = logits.float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    return (logp * mask[:, 1:]).sum(-1)


def sequence_logprobs(model, ids, mask):
    """response_logprobs of a model's own logits: (B,)."""
    logits, _ = model(ids[:, :-1])  # (B, T-1, V): right padding needs no attention mask in a causal model
    return response_logprobs(logits, ids, mask)


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta):
    """DPO's sigmoid loss and the implicit rewards beta * (log pi - log ref) of chosen and rejected:
    -log sigmoid(r_c - r_r). When policy == reference, every implicit reward is 0 and the loss is ln 2."""
    r_c, r_r = beta * (pi_chosen - ref_chosen), beta * (pi_rejected - ref_rejected)
    return -F.logsigmoid(r_c - r_r).mean(), r_c, r_r


def pair_scores(model, ref, batch, method, beta, center, device, rpo_alpha=0.0, lm_alpha=0.0):
    """One batch through the model (and the frozen reference for DPO) -> (loss, rewards of chosen, of rejected,
    mean chosen log-prob). The rewards are the value head's (rm) or the implicit ones (dpo). rpo_alpha > 0 adds
    that times the chosen answers' mean token negative log-likelihood (RPO, Pang et al. 2024; TRL's rpo_alpha):
    plain DPO only widens the gap, and may push the chosen answer's probability down with the rejected one's.
    lm_alpha > 0 adds the same term to the reward model's loss, through the GPT's own lm_head on the hidden
    states the value head reads: the body keeps predicting the right answer's digits, the features a check of
    the written ones needs, instead of forgetting them while the value head is still near zero."""
    ids, mask, lengths, margins = (t.to(device) for t in batch)
    B = margins.size(0)
    if method == "rm":
        if not lm_alpha:
            r = model(ids, right_mask(lengths, ids.size(1)))
            return bt_loss(r[:B], r[B:], margins, center), r[:B], r[B:], None
        r, h = model(ids, right_mask(lengths, ids.size(1)), return_hidden=True)  # h (2B, T, C)
        logp_c = response_logprobs(model.gpt.lm_head(h[:B, :-1]), ids[:B], mask[:B])  # chosen rows only
        nll = -logp_c.sum() / mask[:B, 1:].sum()  # mean NLL per chosen response token, as RPO's below
        return bt_loss(r[:B], r[B:], margins, center) + lm_alpha * nll, r[:B], r[B:], -nll.detach()
    logp = sequence_logprobs(model, ids, mask)
    with torch.no_grad():
        ref_logp = sequence_logprobs(ref, ids, mask)
    loss, r_c, r_r = dpo_loss(logp[:B], logp[B:], ref_logp[:B], ref_logp[B:], beta)
    if rpo_alpha:
        loss = loss - rpo_alpha * logp[:B].sum() / mask[:B, 1:].sum()  # mean NLL per chosen response token
    return loss, r_c, r_r, logp[:B].detach()


# -----------------------------------------------------------------------------
# 4. The model and the evaluation


def load_init(init):
    """--init -> (GPT, tokenizer, template): gpt2.load_with_tokenizer, which names the command that makes a missing
    preset input."""
    try:
        model, tok, ckpt = load_with_tokenizer(init)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    if (ckpt or {}).get("method") == "rm":
        fail(f"--init {init} is a reward model already (reward_model.py --method rm); start from the SFT model "
             f"(sft.py's checkpoint), or --resume its run")
    return model, tok, (ckpt or {}).get("template")


@torch.no_grad()
def evaluate_pairs(model, ref, pairs, args, device, dtype):
    """Held-out pairs -> loss, pair accuracy, mean reward margin, and every chosen / rejected reward."""
    model.eval()
    losses, chosen, rejected = [], [], []
    for k in range(0, len(pairs), args.eval_batch_size):
        batch = pad_pairs(pairs[k:k + args.eval_batch_size], args.pad_id)
        with autocast(device, dtype):
            # the pair loss alone (Bradley-Terry or DPO), whatever --lm-alpha / --rpo-alpha: those terms are
            # normalized per batch, so with them the held-out loss would move with --eval-batch-size
            loss, r_c, r_r, _ = pair_scores(model, ref, batch, args.method, args.beta, args.center_rewards, device)
        losses.append(loss.item() * r_c.numel())
        chosen += r_c.float().tolist()
        rejected += r_r.float().tolist()
    model.train()
    c, r = torch.tensor(chosen), torch.tensor(rejected)
    return dict(val_loss=sum(losses) / len(c), accuracy=(c > r).float().mean().item(),
                margin=(c - r).mean().item()), chosen, rejected


@torch.no_grad()
def task_accuracy(model, tok, rows, args, device, dtype):
    """The verifier's accuracy of greedy answers to the test problems (what DPO should raise)."""
    model.eval()
    eot, hits = tok.eot_token, []
    for k in range(0, len(rows), args.eval_batch_size):
        chunk = rows[k:k + args.eval_batch_size]
        prompts = [tok.encode_ordinary(bpe.format_prompt(r["prompt"], "", args.preamble)) for r in chunk]
        idx, attn = left_pad(prompts, eot, device)
        with autocast(device, dtype):
            tokens, mask, _ = sample(model, idx, args.max_new_tokens, attention_mask=attn, temperature=0, eos_id=eot,
                                     vocab_size=tok.n_vocab)
        for r, t, m in zip(chunk, tokens.tolist(), mask.tolist()):
            hits.append(bpe.reward(tok.decode([i for i, keep in zip(t, m) if keep and i != eot]), r["answer"]))
    model.train()
    return sum(hits) / len(hits)


def plot_rewards(chosen, rejected, path, title):
    """Histograms of the held-out rewards of chosen and rejected answers (None without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = torch.linspace(min(chosen + rejected), max(chosen + rejected) + 1e-6, 41).tolist()
    ax.hist(chosen, bins=bins, alpha=0.6, label="chosen"), ax.hist(rejected, bins=bins, alpha=0.6, label="rejected")
    ax.set_xlabel("reward"), ax.set_ylabel("held-out answers"), ax.set_title(title), ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


# -----------------------------------------------------------------------------
# 5. Training


def main(argv=None):
    args = parse_args(argv)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    args, resume = resume_settings(args, "reward_model.py", "method", argv)  # a resumed run: its own settings
    if args.lr is None:  # the preset's, for the method
        args.lr = PRESETS[args.preset]["lora_lr" if args.lora else "lr"][args.method]
    if args.max_steps is None and args.epochs is None and PRESETS[args.preset]["max_steps"]:
        args.max_steps = PRESETS[args.preset]["max_steps"][args.method]  # the preset counts steps, not epochs
    args.epochs = args.epochs or PRESETS[args.preset]["epochs"]
    try:
        device = pick_device(args.device)
    except ValueError as e:
        fail(e)
    dtype = pick_dtype(args.dtype, device)
    seed_everything(args.seed)

    gpt, tok, template = load_init(args.init)
    if args.preamble is None:  # the prompt template the starting model was trained with, else the preset's
        args.preamble = bool(template["preamble"]) if template else PRESETS[args.preset]["preamble"]
    args.pad_id = tok.eot_token
    max_len = min(args.max_len or gpt.config.block_size, gpt.config.block_size)
    try:
        train_rows, val_rows, test_rows = load_splits(args)
        if args.pairs != "given":
            train_rows, val_rows = with_sampled_pairs(args, gpt, tok, train_rows, val_rows, device, dtype, resume)
        if args.eval_limit:
            val_rows, test_rows = val_rows[:args.eval_limit], test_rows[:args.eval_limit]
        train = encode_pairs(train_rows, tok, args.preamble, max_len, args.margin)
        val = encode_pairs(val_rows, tok, args.preamble, max_len, args.margin)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        fail(e)
    loader = Loader(train, args.batch_size, args.seed, tok.eot_token)
    max_steps = args.max_steps or args.epochs * loader.steps_per_epoch
    if note := warmup_note(args.warmup_steps, max_steps):
        print(f"reward_model.py: {note}")

    ref = None
    if args.method == "dpo":  # the frozen reference: the starting model, in eval mode (no dropout)
        ref = copy.deepcopy(gpt).to(device).eval().requires_grad_(False)
    if args.lora:
        try:
            add_lora(gpt, args.lora_r, args.lora_alpha, args.lora_targets.split(","))
        except ValueError as e:  # a rank below 1, a target no layer has
            fail(f"--lora: {e}")
    model = RewardModel(gpt) if args.method == "rm" else gpt
    model.to(device)
    if args.method == "dpo":
        optimizer = gpt.configure_optimizer(args.weight_decay, args.lr, (0.9, 0.999), device)
    else:  # the fresh value head may learn faster than the pretrained body (--head-lr-mult); decay on matrices only
        groups = [([p for p in gpt.parameters() if p.requires_grad], 1.0),
                  (list(model.value_head.parameters()), args.head_lr_mult)]
        optimizer = torch.optim.AdamW([{"params": [p for p in ps if (p.dim() >= 2) == matrix], "lr_mult": mult,
                                        "weight_decay": args.weight_decay if matrix else 0.0}
                                       for ps, mult in groups for matrix in (True, False)], lr=args.lr)
    scaler = grad_scaler(device, dtype)
    step = 0
    if resume:
        if args.lora:
            load_lora_state(gpt, {k: v.to(device) for k, v in resume["adapter"].items()}, ckpt_path)
        else:
            load_model_state(gpt, resume["model"], ckpt_path)
        if args.method == "rm":
            model.value_head.load_state_dict(resume["value_head"])
        optimizer.load_state_dict(resume["optimizer"])
        restore_scaler(scaler, resume["scaler"])
        step = resume["step"]
        set_rng_state(resume["rng"])
        print(f"resumed from {ckpt_path} at step {step}")
    fwd = maybe_compile(model, args.compile)
    metrics = MetricsLog(args.out_dir, resume_step=step if resume else None)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{args.method} from {args.init}: {n_train:,} trainable parameters | {len(train):,} train / {len(val)} val "
          f"pairs | {max_steps} steps of {args.batch_size} pairs | device {device}")

    def evaluate(done, final=False):
        row, chosen, rejected = evaluate_pairs(model, ref, val, args, device, dtype)
        if args.method == "dpo" and test_rows:
            row["task_accuracy"] = task_accuracy(model, tok, test_rows, args, device, dtype)
        metrics.log(step=done, **row)
        tqdm.write(f"step {done:5d} | val loss {row['val_loss']:.4f} | pair accuracy {row['accuracy']:.1%} | "
                   f"margin {row['margin']:.3f}" + (f" | task accuracy {row['task_accuracy']:.1%}"
                                                     if "task_accuracy" in row else ""))
        if final and (p := plot_rewards(chosen, rejected, os.path.join(args.out_dir, "rewards.png"),
                                        f"{args.method}: held-out rewards at step {done}")):
            print(f"reward plot {p}")

    def checkpoint(done):
        extra = dict(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), step=done, rng=rng_state(),
                     args=vars(args), tokenizer=tok.dumps(), template={"preamble": args.preamble}, method=args.method,
                     train_s=train_time)
        if args.method == "rm":  # ppo.py: GPT.from_checkpoint, then value_head (weight (1, C), bias (1,))
            extra["value_head"] = {k: v.detach().cpu() for k, v in model.value_head.state_dict().items()}
        if args.lora:
            extra.update(lora={"r": args.lora_r, "alpha": args.lora_alpha}, adapter=lora_state_dict(gpt))
        save_checkpoint(ckpt_path, merge_lora(copy.deepcopy(gpt)) if args.lora else gpt, **extra)

    if step == 0:
        evaluate(0)
    stop = min(max_steps, args.stop_after or max_steps)
    if stop <= step:  # resumed at or past where this run stops: nothing to train
        return print(f"nothing to do: the run in {args.out_dir} is at step {step} of {max_steps}")
    # seconds of training so far: a resumed run goes on counting from its checkpoint's
    t0, train_time = time.time(), (resume or {}).get("train_s", 0.0)
    bar = tqdm(range(step, stop), initial=step, total=stop, desc=args.method, dynamic_ncols=True)
    model.train()
    for step in bar:
        batch = loader.get(step)
        lr = lr_at(step, args.lr, args.warmup_steps, max_steps, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        with autocast(device, dtype):
            loss, r_c, r_r, logp_c = pair_scores(fwd, ref, batch, args.method, args.beta, args.center_rewards, device,
                                                  args.rpo_alpha, args.lm_alpha)
        scaler.scale(loss).backward()
        if args.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        row = dict(step=done, train_loss=loss.item(), lr=lr, train_margin=(r_c - r_r).mean().item())
        if logp_c is not None:  # DPO: watch it fall while the margin grows; rm: the --lm-alpha term
            row["chosen_logp" if args.method == "dpo" else "chosen_token_logp"] = logp_c.mean().item()
        metrics.log(**row)
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.1e}")
        if (args.eval_interval and done % args.eval_interval == 0) or done == stop:
            train_time += time.time() - t0
            evaluate(done, final=done == max_steps)
            checkpoint(done)
            t0 = time.time()
    bar.close()
    if stop == max_steps:
        metrics.log(step=stop, train_s=round(train_time, 1), trainable_params=n_train)
    print(f"{'done' if stop == max_steps else 'stopped'} at step {stop}: {train_time:.0f} s of training | "
          f"checkpoint {ckpt_path}")
    if plot := metrics.plot(title=f"{args.method} {args.preset}{' lora' if args.lora else ''}"):
        print(f"loss plot {plot}")


if __name__ == "__main__":
    main()
