"""
ppo.py: RLHF with PPO (Schulman et al., 2017; Ziegler et al., 2019; InstructGPT, 2022): from the SFT model and
a reward model to a policy that earns more reward, held near where it started by a KL penalty.

What it teaches, top to bottom:
  1. The actors: the policy (the SFT model, trained) with a value head, V(state) before every response token,
     on a body of its own (--critic sft: a copy of the SFT model; rm: the reward model, as InstructGPT) or on
     the policy's (shared: one forward pass for both); a frozen copy of the SFT model, the reference; and the
     reward model of reward_model.py (a value head at the last real token), or several of them (an answer
     scores only as well as the model that likes it least, so one model's blind spot is not enough to
     exploit), or --reward verifier: the task's exact checker, so that reward-model quality and PPO quality
     can be told apart.
  2. Rollouts: a batch of prompts answered by batched, cached sampling (gpt2.sample), in eval mode (no
     dropout), at the temperature the training pass divides its logits by: the log-probabilities recomputed
     for training are then the sampling ones, and the first update's ratio is exactly 1.
  3. The reward: the score at the last token of each response (minus --eos-penalty for a response that never
     ended), and at every token -kl_coef * KL(policy || reference), estimated per token with k1 (log pi -
     log ref) or k3 (r - 1 - log r, r = ref / pi); kl_coef fixed, or adapted towards --target-kl.
  4. GAE (gamma 1, lambda 0.95): per-token advantages from the rewards and the value head's estimates, the
     returns the value head learns, and advantages whitened over the batch.
  5. The loss: PPO's clipped ratio (0.2) on the policy, a clipped value loss on the value head, several
     epochs over shuffled minibatches of each rollout batch.
  6. What to watch (metrics.jsonl and ppo.png): score, KL to the reference, entropy, clip fraction,
     approximate KL between updates, value loss, explained variance, gradient norm, response length; and
     with the reward model, the verifier's accuracy as well: a reward that rises while accuracy does not is
     reward hacking.

The CPU pipeline (after sft.py and reward_model.py; see their docstrings):
    python ppo.py                                    # reward model -> out/task-ppo/ckpt.pt
    python ppo.py --reward verifier --out-dir out/task-ppo-verifier
    python ppo.py --reward-model out/task-rm/ckpt.pt,out/task-rm-samples/ckpt.pt,out/task-rm-both/ckpt.pt \\
                  --max-steps 160 --out-dir out/task-ppo-ensemble   # three reward models (see reward_model.py)
    python ppo.py --kl-estimator k1 --target-kl 2    # any switch; --help lists them
    python ppo.py --resume                           # continue out/task-ppo from its checkpoint
    python ppo.py --preset task-columns              # answers worked column by column (after the two above's)
The real recipe (a GPU; GPT-2 medium SFT'd on Alpaca, a reward model on the polite / impolite pairs):
    python sft.py --preset gpt2-alpaca
    python reward_model.py --preset gpt2-dpo --method rm --out-dir out/gpt2-polite-rm
    python ppo.py --preset gpt2-polite
"""

import argparse
import copy
import os
import time

import torch
import torch.nn as nn
from tqdm import tqdm

import bpe
from gpt2 import (GPT, GPTConfig, MADE_BY, MetricsLog, add_common_args, autocast, batch_rows, download, grad_scaler,
                  left_pad, load_checkpoint, load_model_state, lr_at, warmup_note, maybe_compile, pick_device,
                  pick_dtype, restore_scaler, resume_settings, sample, save_checkpoint, seed_everything, rng_state,
                  set_rng_state)

# -----------------------------------------------------------------------------
# Runs. A preset fills in defaults; a flag given on the command line wins.

PRESETS = {
    # the arithmetic task on a CPU: sft.py's and reward_model.py's outputs. lr 3e-6 x 16 updates per batch:
    # at 3e-5 and above greedy accuracy fell within 20 batches (bench/results/ppo_cpu.md)
    "task": dict(init="out/task-sft/ckpt.pt", reward_model="out/task-rm/ckpt.pt", data="task", out_dir="out/task-ppo",
                 preamble=False, max_steps=80, batch_size=32, lr=3e-6, value_lr=1e-4, kl_coef=0.02, target_kl=None,
                 temperature=0.7, max_new_tokens=20, eval_interval=20, eval_limit=500, eos_penalty=1.0, critic="sft"),
    # politeness on a GPU: GPT-2 medium after `sft.py --preset gpt2-alpaca`, the reward model of the polite /
    # impolite pairs, adaptive KL (Ziegler et al.'s target 6 nats per response)
    "gpt2-polite": dict(init="out/gpt2-alpaca/ckpt.pt", reward_model="out/gpt2-polite-rm/ckpt.pt",
                        data="data/instruction_preference_data.json", out_dir="out/gpt2-polite", preamble=True,
                        max_steps=100, batch_size=32, lr=1e-6, value_lr=1e-5, kl_coef=0.05, target_kl=6.0,
                        temperature=0.7, max_new_tokens=128, eval_interval=25, eval_limit=64, eos_penalty=1.0, critic="rm"),
}
# the same on the task whose answers are worked column by column: longer answers
PRESETS["task-columns"] = {**PRESETS["task"], "init": "out/task-columns-sft/ckpt.pt", "data": "task-columns",
                           "reward_model": "out/task-columns-rm/ckpt.pt", "out_dir": "out/task-columns-ppo",
                           "max_new_tokens": 64}
PREFERENCE_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/04_preference-tuning-with-dpo/"
                  "instruction-data-with-preference.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    g = p.add_argument_group("run")
    g.add_argument("--preset", default="task", choices=list(PRESETS), help="defaults for a run (default: task)")
    g.add_argument("--init", help="the SFT model to train: a checkpoint written by sft.py")
    g.add_argument("--reward", default="rm", choices=["rm", "verifier"],
                   help="rm: the reward model's score; verifier: the task's exact checker (1 right, 0 wrong)")
    g.add_argument("--reward-model", help="reward_model.py's checkpoint (with --reward rm); several, comma-separated: "
                                          "an ensemble scored by its least convinced member")
    g.add_argument("--data", help="task | task-columns | a folder of a task's files | a .json / .jsonl of prompts "
                                  "({prompt, answer}, or Alpaca / preference rows with instruction + input): the "
                                  "last 10%% are held out for evaluation")
    g.add_argument("--out-dir", help="where metrics.jsonl, ckpt.pt and ppo.png go")
    g.add_argument("--resume", action="store_true", help="continue the run in --out-dir with its own settings")
    g.add_argument("--stop-after", type=int, help="stop (with a checkpoint) after this step; --resume goes on")
    g.add_argument("--preamble", action=argparse.BooleanOptionalAction,
                   help="Alpaca's 'Below is an instruction...' sentence (default: what the SFT model was trained with)")
    g = p.add_argument_group("rollouts and reward")
    g.add_argument("--batch-size", type=int, help="prompts (one response each) per rollout batch")
    g.add_argument("--temperature", type=float, help="sampling temperature, also applied in the training pass")
    g.add_argument("--max-new-tokens", type=int, help="longest response")
    g.add_argument("--eos-penalty", type=float, help="subtracted from the score of a response that never ends")
    g.add_argument("--kl-coef", type=float, help="weight of the per-token KL penalty to the reference (start value)")
    g.add_argument("--kl-estimator", default="k1", choices=["k1", "k3"], help="per-token KL estimate in the reward")
    g.add_argument("--target-kl", type=float, help="adapt kl_coef towards this KL per response (default: fixed)")
    g.add_argument("--kl-horizon", type=int, default=10000, help="adaptive KL: responses over which it adapts")
    g = p.add_argument_group("PPO")
    g.add_argument("--ppo-epochs", type=int, default=4, help="passes over each rollout batch")
    g.add_argument("--minibatches", type=int, default=4, help="minibatches per pass (one optimizer step each)")
    g.add_argument("--gamma", type=float, default=1.0, help="discount of GAE (1: the score counts fully)")
    g.add_argument("--lam", type=float, default=0.95, help="GAE's lambda: bias (0) vs variance (1)")
    g.add_argument("--clip", type=float, default=0.2, help="the ratio is clipped to [1 - clip, 1 + clip]")
    g.add_argument("--clip-value", type=float, default=0.2, help="values move at most this far from the rollout's")
    g.add_argument("--critic", choices=["shared", "sft", "rm"],
                   help="the value head's body: the policy's own (shared), a copy of the SFT model, or the reward "
                        "model with its head (InstructGPT)")
    g.add_argument("--vf-coef", type=float, default=0.1, help="weight of the value loss")
    g.add_argument("--whiten", action=argparse.BooleanOptionalAction, default=True,
                   help="advantages to mean 0, std 1 over the batch's response tokens")
    g = p.add_argument_group("optimization")
    g.add_argument("--max-steps", type=int, help="rollout batches")
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--value-lr", type=float, help="peak learning rate of the value head and its critic body (a new "
                                                  "head must catch up with a trained body; default: the preset's, "
                                                  "task 1e-4, gpt2-polite 1e-5)")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear warmup, in rollout batches")
    g.add_argument("--min-lr-ratio", type=float, default=1.0, help="cosine decays to this fraction (1 = constant)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on matrices")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm (0 = off)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-interval", type=int, help="steps between greedy test evaluations (0 = start and end)")
    g.add_argument("--eval-limit", type=int, help="evaluate on the first N held-out prompts (0 = all)")
    g.add_argument("--eval-batch-size", type=int, default=100, help="prompts generated at once")
    add_common_args(p.add_argument_group("common (--device, --dtype, --compile, --seed)"))
    first, _ = p.parse_known_args(argv)
    p.set_defaults(**{k: v for k, v in PRESETS[first.preset].items() if k != "preamble"})  # preamble: see main
    args = p.parse_args(argv)
    for flag in ("batch_size", "minibatches", "ppo_epochs", "max_steps", "max_new_tokens", "eval_batch_size",
                 "stop_after", "kl_horizon"):  # a horizon of 0 divides by 0; below, the KL coefficient runs away
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            fail(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    # e.g. a negative --kl-coef rewards drifting away, a negative --grad-clip flips the step
    for flag in ("value_lr", "kl_coef", "target_kl", "clip", "clip_value", "grad_clip", "eval_limit", "min_lr_ratio",
                 "vf_coef", "warmup_steps"):
        if (getattr(args, flag) or 0) < 0:
            fail(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 0")
    if note := warmup_note(args.warmup_steps, args.max_steps):
        print(f"ppo.py: {note}")
    if args.lr <= 0:  # the value head's rate is --value-lr / --lr times the policy's
        fail(f"--lr {args.lr}: give a learning rate above 0")
    if args.temperature <= 0:  # training divides the logits by it, as sampling does: greedy has no log-probabilities
        fail(f"--temperature {args.temperature}: PPO samples its rollouts; give a temperature above 0")
    if args.batch_size % args.minibatches:
        fail(f"--batch-size {args.batch_size} must be a multiple of --minibatches {args.minibatches}")
    return args


def fail(msg):
    raise SystemExit(f"ppo.py: error: {msg}")


# -----------------------------------------------------------------------------
# 1. The actors: policy + value head, the reference, the reward model


class Policy(nn.Module):
    """The SFT model plus a value head, Linear(n_embd, 1): V(state) before each response token. The head reads
    the policy's own hidden states (critic None: one body, cheap), or those of a separate critic body (a copy of
    the SFT model, or the reward model with its head, as in InstructGPT): twice the compute, but the features
    of a body trained for the next token predict success poorly (see bench/results/ppo_cpu.md). A new head
    starts at zero (every value 0), so the first advantages are the rewards-to-go."""

    def __init__(self, gpt, critic=None, head_state=None, vocab_size=None):
        super().__init__()
        self.gpt, self.critic, self.vocab_size = gpt, critic, vocab_size  # the tokenizer's ids, as in sampling
        self.value_head = nn.Linear((critic or gpt).config.n_embd, 1)  # reads the critic's states when there is one
        if head_state is not None:
            self.value_head.load_state_dict(head_state)
        else:
            nn.init.zeros_(self.value_head.weight), nn.init.zeros_(self.value_head.bias)

    def forward(self, idx, attn, T, temperature):
        """prompt + response idx (B, T + N) with attn (B, T + N) -> for the response tokens idx[:, T:]: their
        log-probabilities under softmax(logits / temperature), the values of the states before them and the
        entropies of those distributions, each (B, N). Position t predicts token t + 1."""
        h = self.gpt.hidden_states(idx[:, :-1], attention_mask=attn[:, :-1])[:, T - 1:]  # (B, N, C)
        logits = self.gpt.lm_head(h)[..., :self.vocab_size].float()  # (B, N, V): no row past the tokenizer
        logprobs = (logits / max(temperature, 1e-6)).log_softmax(-1)
        logp = logprobs.gather(-1, idx[:, T:, None]).squeeze(-1)
        entropy = -(logprobs.exp() * logprobs).sum(-1)
        if self.critic is not None:
            h = self.critic.hidden_states(idx[:, :-1], attention_mask=attn[:, :-1])[:, T - 1:]  # (B, N, C)
        return logp, self.value_head(h).squeeze(-1).float(), entropy


class RewardModel(nn.Module):
    """reward_model.py's checkpoint: a GPT and a value head read at each row's last real token."""

    def __init__(self, gpt, head_state):
        super().__init__()
        self.gpt, self.value_head = gpt, nn.Linear(gpt.config.n_embd, 1)
        self.value_head.load_state_dict(head_state)

    def forward(self, idx, attn):
        """idx (B, T) left-padded prompt + response, attn (B, T) -> scores (B,) at the last 1 of attn."""
        h = self.gpt.hidden_states(idx, attention_mask=attn)
        last = (attn.long() * torch.arange(1, idx.size(1) + 1, device=idx.device)).argmax(1)  # (B,)
        return self.value_head(h[torch.arange(idx.size(0), device=idx.device), last]).squeeze(-1).float()

    def raw(self, idx, attn):
        """-> the scores evaluation reports (B,): the model's own"""
        return self(idx, attn)


class RewardEnsemble(nn.Module):
    """Several reward models, one score: each model's scores standardized over the batch (the models have
    their own scales), then the lowest of them per response (worst-case optimization; Coste et al., 2023,
    "Reward Model Ensembles Help Mitigate Overoptimization"). A policy that finds an answer one model
    overrates gains nothing unless every model overrates it."""

    def __init__(self, models):
        super().__init__()
        self.models = nn.ModuleList(models)

    def each(self, idx, attn):
        """-> every model's raw scores (M, B)"""
        return torch.stack([m(idx, attn) for m in self.models])

    def raw(self, idx, attn):
        """-> the scores evaluation reports (B,): the models' raw scores averaged (forward's z-scores average to 0)"""
        return self.each(idx, attn).mean(0)

    def forward(self, idx, attn):
        """idx (B, T), attn (B, T) -> scores (B,): min over models of (score - batch mean) / batch std"""
        s = self.each(idx, attn)  # (M, B)
        return ((s - s.mean(1, keepdim=True)) / (s.std(1, keepdim=True) + 1e-6)).min(0).values


# -----------------------------------------------------------------------------
# 2. Rollouts


@torch.no_grad()
def rollout(policy, tok, rows, args, device, dtype):
    """Each row's prompt, answered by sampling -> a dict: idx (B, T + N) prompt + response tokens, attn (B, T + N)
    1 on real tokens (left padding and the tail after a response's end-of-text are 0), mask (B, N) the response
    tokens (end-of-text included), logp (B, N) their sampling log-probabilities, ended (B,), texts, T."""
    idx, attn = left_pad([tok.encode_ordinary(bpe.format_prompt(r["prompt"], r.get("input", ""), args.preamble))
                          for r in rows], tok.eot_token, device)
    with autocast(device, dtype):
        tokens, mask, logp = sample(policy.gpt, idx, args.max_new_tokens, attention_mask=attn,
                                    temperature=args.temperature, eos_id=tok.eot_token, vocab_size=tok.n_vocab)
    lengths = mask.sum(1)
    ended = tokens.gather(1, (lengths - 1)[:, None]).squeeze(1) == tok.eot_token
    texts = [tok.decode([t for t, m in zip(ts, ms) if m]) for ts, ms in zip(tokens.tolist(), mask.tolist())]
    return dict(idx=torch.cat([idx, tokens], 1), attn=torch.cat([attn, mask.long()], 1), mask=mask.float(),
                logp=logp.float(), ended=ended, texts=texts, T=idx.size(1))


@torch.no_grad()
def scores(batch, rows, reward_model, args, device, dtype):
    """The score of each response: the reward model's, or the verifier's (1 when the final number is the
    answer), minus --eos-penalty where the response never ended. -> scores (B,), verifier (B,) or None."""
    correct = None
    if all("answer" in r for r in rows):
        correct = torch.tensor([bpe.reward(t, r["answer"]) for t, r in zip(batch["texts"], rows)], device=device)
    if args.reward == "verifier":
        s = correct.clone()
    else:
        with autocast(device, dtype):
            s = reward_model(batch["idx"], batch["attn"])
    return s - args.eos_penalty * (~batch["ended"]).float(), correct


# -----------------------------------------------------------------------------
# 3. The reward: the score at the last token, a KL penalty at every token


def kl_estimate(logp, ref_logp, how):
    """Per-token estimate of KL(pi || ref) from tokens drawn from pi. k1 = log pi - log ref: unbiased, can be
    negative token by token; k3 = r - 1 - log r with r = ref / pi: unbiased too, never negative, lower variance.
    kl_estimate(tensor([-1.]), tensor([-2.]), "k1") -> 1.0; (..., "k3") -> e^-1 - 1 + 1 = 0.368"""
    if how == "k1":
        return logp - ref_logp
    if how == "k3":
        d = ref_logp - logp
        return d.exp() - 1 - d
    raise ValueError(f"unknown KL estimator {how!r}; valid: k1, k3")


def token_rewards(score, kl, mask, kl_coef):
    """score (B,), kl (B, N), mask (B, N) -> rewards (B, N): -kl_coef * kl at every response token, plus the
    score at each response's last token. token_rewards(tensor([1.]), zeros(1, 3), tensor([[1., 1., 0.]]), 0.1)
    -> [[0, 1, 0]]"""
    rewards = -kl_coef * kl * mask
    last = mask.sum(1).long() - 1  # (B,)
    return rewards.scatter_add(1, last[:, None], score[:, None].to(rewards.dtype))


class KLController:
    """kl_coef, fixed, or adapted (Ziegler et al., 2019) so that the KL per response tracks target:
    coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * responses / horizon."""

    def __init__(self, coef, target=None, horizon=10000):
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl, n):
        if self.target:
            self.coef *= 1 + min(max(kl / self.target - 1, -0.2), 0.2) * n / self.horizon

    def state_dict(self):
        return {"coef": self.coef}


# -----------------------------------------------------------------------------
# 4. GAE and whitening


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalized advantage estimation (Schulman et al., 2016) over each response, right to left:
    delta_t = r_t + gamma V_(t+1) - V_t, A_t = delta_t + gamma lam A_(t+1); past a response's end V = r = 0.
    -> advantages (B, N), returns = A + V (B, N), what the value head learns to predict."""
    rewards, values = rewards * mask, values * mask
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    N = rewards.size(1)
    for t in reversed(range(N)):
        next_value = values[:, t + 1] if t + 1 < N else torch.zeros_like(last)
        last = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * last
        adv[:, t] = last
    return adv * mask, (adv + values) * mask


def whiten(x, mask, eps=1e-8):
    """x to mean 0 and (population) variance 1 over the masked entries; 0 elsewhere.
    whiten(tensor([[1., 3., 9.]]), tensor([[1., 1., 0.]])) -> [[-1, 1, 0]]"""
    n = mask.sum()
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / n
    return (x - mean) * torch.rsqrt(var + eps) * mask


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


# -----------------------------------------------------------------------------
# 5. The losses


def policy_loss(logp, old_logp, adv, mask, clip=0.2):
    """PPO's clipped surrogate, negated: mean over tokens of max(-A r, -A clip(r, 1 - clip, 1 + clip)) with
    r = pi / pi_old. -> loss, clip fraction, approximate KL(pi_old || pi) = mean of (log r)^2 / 2."""
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))  # pessimistic of the two
    clipped = ((ratio - 1).abs() > clip).float()
    return masked_mean(loss, mask), masked_mean(clipped, mask).item(), masked_mean(0.5 * log_ratio ** 2, mask).item()


def value_loss(values, old_values, returns, mask, clip=0.2):
    """The value head's squared error, clipped like the policy: 0.5 * mean of max((V - R)^2, (V_clip - R)^2)
    with V_clip = V_old + clip(V - V_old, -clip, clip). -> loss, fraction of values clipped."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss = 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    return masked_mean(loss, mask), masked_mean(((values - old_values).abs() > clip).float(), mask).item()


def explained_variance(pred, target, mask):
    """1 - Var(target - pred) / Var(target) over the masked tokens: 1 is a perfect value head, 0 no better than
    the mean, negative worse."""
    var = lambda x: masked_mean((x - masked_mean(x, mask)) ** 2, mask)
    return (1 - var(target - pred) / var(target).clamp(min=1e-8)).item()


# -----------------------------------------------------------------------------
# 6. One PPO step: score, penalise, estimate advantages, update


def ppo_step(policy, ref, optimizer, batch, score, kl_ctl, args, step, device, dtype, scaler=None):
    """One rollout batch (with its scores (B,)) -> --ppo-epochs passes of --minibatches optimizer steps (scaler:
    gpt2.grad_scaler's, which scales the loss in fp16 and does nothing otherwise). -> the batch's stats."""
    scaler = grad_scaler(device, dtype) if scaler is None else scaler
    idx, attn, mask, T = batch["idx"], batch["attn"], batch["mask"], batch["T"]
    with torch.no_grad(), autocast(device, dtype):  # the same forward pass as training, so the first ratio is 1
        old_logp, old_values, entropy = policy(idx, attn, T, args.temperature)
        ref_logp, _, _ = ref(idx, attn, T, args.temperature)
    kl = kl_estimate(old_logp, ref_logp, args.kl_estimator) * mask  # (B, N)
    kl_per_response = kl.sum(1).mean().item()
    rewards = token_rewards(score, kl, mask, kl_ctl.coef)
    adv, returns = gae(rewards, old_values, mask, args.gamma, args.lam)
    if args.whiten:
        adv = whiten(adv, mask)
    stats = dict(score=score.mean().item(), kl=kl_per_response, kl_coef=kl_ctl.coef,
                 reward=(rewards * mask).sum(1).mean().item(), entropy=masked_mean(entropy, mask).item(),
                 length=mask.sum(1).mean().item(), ended=batch["ended"].float().mean().item(),
                 explained_var=explained_variance(old_values, returns, mask),
                 max_logp_diff=((old_logp - batch["logp"]).abs() * mask).max().item())
    B, M = idx.size(0), idx.size(0) // args.minibatches
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)  # the shuffle depends on the step alone
    acc = {k: [] for k in ("policy_loss", "value_loss", "clip_frac", "value_clip_frac", "approx_kl", "grad_norm")}
    params = [p for p in policy.parameters() if p.requires_grad]
    for _ in range(args.ppo_epochs):
        order = torch.randperm(B, generator=gen).to(device)
        for k in range(0, B, M):
            i = order[k:k + M]
            with autocast(device, dtype):
                logp, values, _ = policy(idx[i], attn[i], T, args.temperature)
            pl, clip_frac, approx_kl = policy_loss(logp, old_logp[i], adv[i], mask[i], args.clip)
            vl, vclip = value_loss(values, old_values[i], returns[i], mask[i], args.clip_value)
            scaler.scale(pl + args.vf_coef * vl).backward()  # fp16: scaled so small gradients do not underflow
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip or float("inf"))
            scaler.step(optimizer)  # skipped if the scaled gradients overflowed (the scale then drops)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            for key, v in zip(acc, (pl.item(), vl.item(), clip_frac, vclip, approx_kl, norm.item())):
                acc[key].append(v)
    kl_ctl.update(kl_per_response, B)
    return {**stats, **{k: sum(v) / len(v) for k, v in acc.items()}}


# -----------------------------------------------------------------------------
# 7. Evaluation: greedy answers to held-out prompts


@torch.no_grad()
def evaluate(policy, tok, rows, reward_model, args, device, dtype):
    """Greedy answers to held-out prompts -> {"accuracy": the verifier's (rows with answers), "test_score":
    the reward model's mean score (when there is one), "test_length"}."""
    hits, total_score, length = 0.0, 0.0, 0.0
    answers = all("answer" in r for r in rows)  # accuracy needs every row's answer
    for k in range(0, len(rows), args.eval_batch_size):
        chunk = rows[k:k + args.eval_batch_size]
        greedy = argparse.Namespace(**{**vars(args), "temperature": 0.0})
        b = rollout(policy, tok, chunk, greedy, device, dtype)
        if answers:
            hits += sum(bpe.reward(t, r["answer"]) for t, r in zip(b["texts"], chunk))
        if reward_model is not None:
            with autocast(device, dtype):
                total_score += reward_model.raw(b["idx"], b["attn"]).sum().item()
        length += b["mask"].sum().item()
    out = {"test_length": length / len(rows)}
    if answers:
        out["accuracy"] = hits / len(rows)
    if reward_model is not None:
        out["test_score"] = total_score / len(rows)
    return out


# -----------------------------------------------------------------------------
# 8. The loop


def main(argv=None):
    args = parse_args(argv)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    args, resume = resume_settings(args, "ppo.py", "kl_coef", argv)  # a resumed run: its own settings
    try:
        device = pick_device(args.device)
    except ValueError as e:
        fail(e)
    dtype = pick_dtype(args.dtype, device)
    seed_everything(args.seed)
    gpt, tok, ckpt = load_model(args.init, "--init")
    if ckpt.get("method") == "rm":
        fail(f"--init {args.init} is a reward model (reward_model.py --method rm); give the SFT model as --init "
             f"and the reward model as --reward-model")
    if args.preamble is None:  # the prompt template the starting model was trained with, else the preset's
        args.preamble = bool(ckpt["template"]["preamble"]) if ckpt.get("template") else PRESETS[args.preset]["preamble"]
    reward_model = None
    if args.reward == "rm" or args.critic == "rm":
        loaded = []  # (GPT, checkpoint) of each reward model
        for path in (args.reward_model or "").split(","):
            rm_gpt, _, rm_ckpt = load_model(path, "--reward-model")
            if "value_head" not in rm_ckpt or ("args" in rm_ckpt and rm_ckpt["args"].get("method") != "rm"):
                fail(f"{path} is not a reward model of reward_model.py --method rm (no value head, or another "
                     f"script's, e.g. a PPO critic's)")
            if rm_ckpt.get("tokenizer") != ckpt.get("tokenizer"):
                fail(f"{path} was trained with another tokenizer than {args.init}; pair models of one pipeline")
            loaded.append((rm_gpt, rm_ckpt))
        rm_gpt, rm_ckpt = loaded[0]  # --critic rm starts from the first reward model
        models = [RewardModel(g, c["value_head"]).to(device).eval().requires_grad_(False) for g, c in loaded]
        reward_model = models[0] if len(models) == 1 else RewardEnsemble(models)
        if len(models) > 1 and args.batch_size < 2:
            fail("an ensemble standardizes each model's scores over the batch: give --batch-size 2 or more")
        if args.reward != "rm":
            reward_model = None  # loaded for the critic only
    try:
        train_rows, test_rows = load_prompts(args.data)
    except (ValueError, FileNotFoundError) as e:
        fail(e)
    if args.reward == "verifier" and not all("answer" in r for r in train_rows + test_rows):
        fail(f"--reward verifier needs an 'answer' in every row of --data {args.data}; use --reward rm")
    test_rows = test_rows[:args.eval_limit] if args.eval_limit else test_rows
    if len(train_rows) < args.batch_size:
        fail(f"{len(train_rows)} training prompts do not fill one batch of --batch-size {args.batch_size}")
    room = gpt.config.block_size - args.max_new_tokens  # every prompt + its longest response must fit the context
    long = [r for r in train_rows + test_rows
            if len(tok.encode_ordinary(bpe.format_prompt(r["prompt"], r.get("input", ""), args.preamble))) > room]
    if long:
        fail(f"{len(long)} prompts of --data {args.data} are longer than the {room} tokens the model's "
             f"{gpt.config.block_size}-token context leaves next to --max-new-tokens {args.max_new_tokens} "
             f"(the first: {long[0]['prompt'][:40]!r}...); lower --max-new-tokens or leave them out")
    ref = Policy(copy.deepcopy(gpt), vocab_size=tok.n_vocab).to(device).eval().requires_grad_(False)  # frozen SFT
    critic = None if args.critic == "shared" else copy.deepcopy(rm_gpt if args.critic == "rm" else gpt)
    if critic is not None:
        critic.requires_grad_(True)  # a copy of a frozen reward model would stay frozen: only its head would learn
    policy = Policy(gpt, critic, rm_ckpt["value_head"] if args.critic == "rm" else None, tok.n_vocab)
    policy.to(device).eval()  # eval for good: no dropout, so sampling and training see one function
    # --compile: the training passes (the sampler steps one token at a time through its cache, left eager)
    policy_fwd, ref_fwd = maybe_compile(policy, args.compile), maybe_compile(ref, args.compile)
    optimizer = gpt.configure_optimizer(args.weight_decay, args.lr, (0.9, 0.95), device)
    value_params = list(policy.value_head.parameters()) + (list(policy.critic.parameters()) if policy.critic else [])
    optimizer.add_param_group({"params": value_params, "weight_decay": 0.0,
                               "lr_scale": (args.value_lr or args.lr) / args.lr})
    kl_ctl = KLController(args.kl_coef, args.target_kl, args.kl_horizon)
    scaler = grad_scaler(device, dtype)
    step = 0
    if resume:
        load_model_state(gpt, resume["model"], ckpt_path)
        policy.value_head.load_state_dict(resume["value_head"])
        if policy.critic is not None:
            load_model_state(policy.critic, resume["critic"], ckpt_path)
        optimizer.load_state_dict(resume["optimizer"])
        restore_scaler(scaler, resume.get("scaler"))
        kl_ctl.coef, step = resume["kl_controller"]["coef"], resume["step"]
        set_rng_state(resume["rng"])
        print(f"resumed from {ckpt_path} at step {step}")
    metrics = MetricsLog(args.out_dir, resume_step=step if resume else None)
    print(f"{args.init}: {sum(p.numel() for p in gpt.parameters()) / 1e6:.2f}M parameters | reward {args.reward} | "
          f"{len(train_rows):,} prompts, {len(test_rows)} held out | {args.max_steps} steps of {args.batch_size} "
          f"responses | kl {args.kl_estimator} x {args.kl_coef}{f' -> {args.target_kl}' if args.target_kl else ''} "
          f"| device {device}")

    def eval_and_log(done):
        t = time.time()
        row = evaluate(policy, tok, test_rows, reward_model, args, device, dtype)
        metrics.log(step=done, **row, eval_s=round(time.time() - t, 2))
        tqdm.write(f"step {done:4d} | " + " | ".join(f"{k} {v:.4g}" for k, v in row.items()))

    def checkpoint(done):
        save_checkpoint(ckpt_path, gpt, value_head={k: v.detach().cpu() for k, v in policy.value_head.state_dict().items()},
                        optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), kl_controller=kl_ctl.state_dict(),
                        step=done, train_s=train_time,
                        rng=rng_state(), args=vars(args), tokenizer=tok.dumps(),
                        template={"preamble": args.preamble},
                        **({"critic": policy.critic.state_dict()} if policy.critic is not None else {}))

    if step == 0:
        eval_and_log(0)
    stop = min(args.max_steps, args.stop_after or args.max_steps)
    if stop <= step:  # resumed at or past where this run stops: nothing to train
        return print(f"nothing to do: the run in {args.out_dir} is at step {step} of {args.max_steps}")
    # seconds of training so far: a resumed run goes on counting from its checkpoint's
    t0, train_time = time.time(), (resume or {}).get("train_s", 0.0)
    bar = tqdm(range(step, stop), initial=step, total=stop, desc="ppo", dynamic_ncols=True)
    for step in bar:
        lr = lr_at(step, args.lr, args.warmup_steps, args.max_steps, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        rows = [train_rows[i] for i in batch_rows(step, len(train_rows), args.batch_size, args.seed)]
        t = time.time()
        batch = rollout(policy, tok, rows, args, device, dtype)
        score, correct = scores(batch, rows, reward_model, args, device, dtype)
        t_roll = time.time() - t
        s = ppo_step(policy_fwd, ref_fwd, optimizer, batch, score, kl_ctl, args, step, device, dtype, scaler)
        if correct is not None:
            s["correct"] = correct.mean().item()  # the verifier on the same samples: is the score earned?
        done = step + 1
        metrics.log(step=done, lr=lr, rollout_s=round(t_roll, 3), step_s=round(time.time() - t, 3),
                    **{k: round(v, 6) for k, v in s.items()})
        bar.set_postfix(score=f"{s['score']:.3f}", kl=f"{s['kl']:.3f}", clip=f"{s['clip_frac']:.2f}")
        if (args.eval_interval and done % args.eval_interval == 0) or done == stop:
            train_time += time.time() - t0
            eval_and_log(done)
            checkpoint(done)
            t0 = time.time()
    bar.close()
    if stop == args.max_steps:
        metrics.log(step=stop, train_s=round(train_time, 1))
    print(f"{'done' if stop == args.max_steps else 'stopped'} at step {stop}: {train_time:.0f} s | checkpoint {ckpt_path}")
    if plot := plot_metrics(args.out_dir, f"ppo {args.preset}, reward {args.reward}"):
        print(f"plot {plot}")


# =============================================================================
# Plumbing: loading models and prompts, the plot


def load_model(path, flag):
    """A checkpoint of this project -> (GPT, its tokenizer, the checkpoint); a missing default input fails with
    the command that makes it."""
    if not path or not os.path.isfile(path):
        how = f"; make it with:\n    {MADE_BY[path]}" if path in MADE_BY else ""
        fail(f"{flag} {path!r}: no checkpoint there{how}")
    try:
        ckpt = load_checkpoint(path)
        model = GPT(GPTConfig(**ckpt["config"]))
        load_model_state(model, ckpt["model"], path)
    except ValueError as e:  # not a checkpoint, or not a gpt2.py model (gpt2.load_checkpoint says which)
        fail(f"{path}: {e}")
    tok = bpe.Tokenizer.loads(ckpt["tokenizer"]) if "tokenizer" in ckpt else bpe.load_gpt2()
    return model, tok, ckpt


def load_prompts(data):
    """--data -> (train rows, held-out rows), each {"prompt", "input"?, "answer"?}. "task": bpe.py's RL prompts
    and its test problems; a folder: such a task's rl.jsonl and test.jsonl; a file: rows of any post-training
    format (the instruction is the prompt), the last 10% held out."""
    if data in bpe.TASK_DATA or os.path.isdir(data):
        folder = bpe.task_folder(data)
        return tuple(bpe.read_rows(os.path.join(folder, f"{s}.jsonl"), "rl") for s in ("rl", "test"))
    if data == PRESETS["gpt2-polite"]["data"] and not os.path.exists(data):
        download(PREFERENCE_URL, data)
    if not os.path.isfile(data):
        raise FileNotFoundError(f"--data {data!r}: no such file or folder, and not 'task' or 'task-columns'")
    rows = []
    for i, r in enumerate(bpe.read_items(data)[0]):
        prompt = r.get("prompt", r.get("instruction")) if isinstance(r, dict) else None
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"{data}: item {i} has no 'prompt' (or 'instruction') string")
        if "answer" in r and (not isinstance(r["answer"], (str, int)) or isinstance(r["answer"], bool)
                              or r["answer"] == ""):  # str(None) would be an answer no response can match
            raise ValueError(f"{data}: item {i}: 'answer' must be a non-empty string or an integer, got "
                             f"{r['answer']!r}")
        rows.append({"prompt": prompt, "input": r.get("input") or "",
                     **({"answer": str(r["answer"])} if "answer" in r else {})})
    if len(rows) < 2:
        raise ValueError(f"{data}: needs a list of at least 2 prompt rows")
    n_test = max(1, len(rows) // 10)
    return rows[:-n_test], rows[-n_test:]


def plot_metrics(out_dir, title):
    """<out_dir>/ppo.png: the signals to watch against the step (None without matplotlib)."""
    keys = ("score", "correct", "accuracy", "kl", "kl_coef", "entropy", "clip_frac", "approx_kl", "value_loss",
            "explained_var", "grad_norm", "length")
    titles = {"correct": "verifier on samples", "accuracy": "test accuracy (greedy)"}
    return MetricsLog.plot_grid(out_dir, keys, "ppo.png", title, titles)


if __name__ == "__main__":
    main()
