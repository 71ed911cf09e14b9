"""
moe.py: a mixture-of-experts feed-forward layer swapped into gpt2.py's blocks, measured against the dense
model it replaces.

A dense block sends every token through one MLP. An MoE block holds n_expert smaller MLPs (the experts)
and a router that sends each token to top_k of them: parameters grow with n_expert, compute per token
does not. What it teaches, top to bottom:
  1. The router, in float32: softmax then top-k (Switch, Mixtral), or sigmoid scores then top-k
     (DeepSeek-V3).
  2. Dispatch without a loop over tokens: sort the (token, expert) assignments by expert, run each expert
     on its contiguous slice, scatter-add the outputs back weighted by the gates. A capacity factor drops
     (and counts) the assignments past an expert's capacity; evaluation has its own factor.
  3. Load balancing: the Switch auxiliary loss, the router z-loss, and DeepSeek-V3's loss-free balancing
     (a per-expert bias that only chooses experts, nudged toward the under-loaded ones after each step).
  4. The MoE layer: fine-grained experts (each a fraction of the dense width, more of them active), shared
     experts every token passes through, and `moeify`, which swaps it into every (or every other) block.
  5. A compact loop that trains the dense model and its MoE twin on the same tokens and compares their
     val loss, tokens/s, and the share of tokens each expert receives over training.

    python moe.py                                      # dense vs MoE (8 experts, top-2) on tiny Shakespeare
    python moe.py --arch moe --bias-rate 0             # no balancing: see expert_load.png
    python moe.py --arch moe --bias-rate 0 --aux-alpha 0.01   # Switch's auxiliary loss instead of the bias
    python moe.py --arch moe --router sigmoid          # DeepSeek-V3: sigmoid scores, loss-free balancing
    python moe.py --arch moe --n-expert 16 --top-k 3 --n-shared 1              # fine-grained + shared
    python moe.py --arch moe --moe-every 2             # hybrid stack: MoE in every other block
    python moe.py --preset gpt2-fineweb                # a GPU: GPT-2 small width, FineWeb-Edu shards

A trained MoE keeps gpt2.py's interface (forward, new_cache), so generate.py's functions run it with the
KV cache: `model, vocab = moe.load_model("out_moe/moe/ckpt.pt")`, then `generate.generate(model.eval(), idx,
50)` with idx in the model's ids (`np.searchsorted(vocab, gpt2_ids)`; `np.array(vocab)[ids]` maps back to GPT-2's).
"""

import argparse
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import bpe
from gpt2 import (GPT, PRESETS, GPTConfig, MetricsLog, add_common_args, autocast, given_flags, grad_scaler,
                  restore_scaler, load_checkpoint, load_model_state, lr_at, warmup_note, maybe_compile, mlp_width,
                  pick_device, pick_dtype, save_checkpoint, seed_everything, rng_state, set_rng_state, RUN_PLACE)

# -----------------------------------------------------------------------------
# Config


@dataclass
class MoEConfig:
    n_expert: int = 8
    top_k: int = 2  # routed experts per token
    n_shared: int = 0  # experts every token passes through, ungated (DeepSeekMoE)
    expert_hidden: int = 0  # 0: the dense hidden width / (top_k + n_shared), i.e. the dense MLP's active params
    router: str = "softmax"  # softmax (Switch, Mixtral) | sigmoid (DeepSeek-V3)
    capacity_factor: float = 0.0  # training: an expert takes <= factor * tokens * top_k / n_expert; 0 = no limit
    eval_capacity_factor: float = 0.0  # evaluation and generation (0 keeps a token's output batch-independent)
    aux_alpha: float = 0.0  # Switch load-balancing loss (Switch: 0.01); off: the bias below balances better
    z_alpha: float = 1e-3  # router z-loss
    bias_rate: float = 1e-3  # loss-free balancing: bias step per optimizer step (DeepSeek-V3's value); 0 = off
    every: int = 1  # 1: every block is MoE; 2: every other block (the hybrid dense-MoE stack)

    def __post_init__(self):
        if self.router not in ("softmax", "sigmoid"):
            raise ValueError(f"unknown router {self.router!r}; valid: softmax, sigmoid")
        if not 1 <= self.top_k <= self.n_expert:
            raise ValueError(f"top_k={self.top_k} must lie in [1, n_expert={self.n_expert}]")
        if min(self.n_shared, self.expert_hidden, self.capacity_factor, self.eval_capacity_factor) < 0:
            raise ValueError("n_shared, expert_hidden and the capacity factors must be >= 0")
        for name in ("aux_alpha", "z_alpha", "bias_rate"):  # negative: the balancing pushes the wrong way
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0 (0 = off)")
        if self.every < 1:
            raise ValueError(f"every must be >= 1 (1 = every block is MoE), got {self.every}")


# -----------------------------------------------------------------------------
# The router: scores in float32 (bf16 rounds close scores into ties, and the losses below square logits)


class Router(nn.Module):
    def __init__(self, n_embd, moe):
        super().__init__()
        self.top_k, self.kind = moe.top_k, moe.router
        self.weight = nn.Parameter(torch.empty(moe.n_expert, n_embd))
        self.register_buffer("bias", torch.zeros(moe.n_expert))  # loss-free balancing; saved in checkpoints

    def forward(self, x):
        """x (N, C) -> logits (N, E), scores (N, E), chosen experts (N, k), their gates (N, k)."""
        with torch.autocast(x.device.type, enabled=False):
            logits = x.float() @ self.weight.float().t()
        scores = logits.softmax(-1) if self.kind == "softmax" else logits.sigmoid()
        # the bias decides which experts a token goes to, and nothing else: the gates come from the scores
        chosen = (scores + self.bias).topk(self.top_k, dim=-1).indices
        gates = scores.gather(-1, chosen)
        if self.top_k > 1:  # Mixtral / DeepSeek-V3 renormalize over the chosen; a top-1 gate keeps its score
            gates = gates / gates.sum(-1, keepdim=True)  # (Switch), else it is always 1 and the router learns nothing
        return logits, scores, chosen, gates


# -----------------------------------------------------------------------------
# Dispatch


def dispatch(x, chosen, gates, experts, capacity=None):
    """Run each token through its chosen experts: y_n = sum_j gates[n, j] * experts[chosen[n, j]](x_n).

    The N * k assignments are sorted by expert, so expert e's tokens form one contiguous slice that a single
    matmul handles; the loop is over experts, never over tokens. With a capacity, an expert keeps the first
    `capacity` assignments in token order and the rest are dropped (those tokens skip it: the residual
    stream carries them past the layer).
    x (N, C), chosen (N, k), gates (N, k) -> y (N, C), assignments per expert (E,) before dropping, dropped.
    Example: chosen [[0], [1], [0]], capacity 1 -> expert 0 takes token 0, token 2 is dropped (y[2] = 0).
    """
    N, k = chosen.shape
    flat = chosen.flatten()  # assignment a is token a // k's (a % k)-th choice
    order = flat.argsort(stable=True)  # grouped by expert, token order kept inside a group
    counts = flat.bincount(minlength=len(experts))  # (E,)
    kept = counts
    if capacity is not None:
        first = counts.cumsum(0) - counts  # where each expert's group starts in `order`
        place = torch.arange(N * k, device=x.device) - first[flat[order]]  # position in its expert's queue
        order = order[place < capacity]
        kept = counts.clamp(max=capacity)
    token = order // k
    xs = x[token]  # (M, C): tokens gathered in expert order
    ys = torch.cat([expert(chunk) for expert, chunk in zip(experts, xs.split(kept.tolist()))])
    ys = ys * gates.flatten()[order, None]  # (M, C), float32 gates
    y = torch.zeros(N, x.size(1), dtype=ys.dtype, device=x.device).index_add_(0, token, ys)
    return y, counts, N * k - len(order)


# -----------------------------------------------------------------------------
# Load-balancing losses


def switch_aux_loss(probs, counts, alpha):
    """Switch Transformer: alpha * E * sum_i f_i * P_i, f_i = share of assignments that went to expert i (a
    count, no gradient), P_i = mean router probability of expert i (the gradient pushes the probability of
    busy experts down). Equals alpha at perfectly uniform routing, up to alpha * E when one expert takes all.
    probs (N, E) rows summing to 1, counts (E,) -> scalar. Example: probs all 1/4, counts [5, 5, 5, 5] -> alpha.
    """
    f = counts.float() / counts.sum()
    return alpha * probs.size(-1) * (f * probs.mean(0)).sum()


def z_loss(logits, alpha):
    """ST-MoE's router z-loss, alpha * mean_n logsumexp(logits_n)^2: keeps router logits small, where
    float32 softmax is well-conditioned. logits (N, E) -> scalar."""
    return alpha * torch.logsumexp(logits, dim=-1).square().mean()


@torch.no_grad()
def update_bias(bias, load, rate):
    """DeepSeek-V3's loss-free balancing, after an optimizer step: experts that took fewer assignments than
    the mean get their bias raised by `rate`, busier ones lowered. Only the choice of experts sees the bias.
    Example: load [30, 10], rate 0.1 -> bias += [-0.1, +0.1]."""
    bias += rate * torch.sign(load.float().mean() - load.float())


# -----------------------------------------------------------------------------
# The MoE layer


class Expert(nn.Module):
    """gpt2.py's MLP computation (GELU or SwiGLU) at any hidden width."""

    def __init__(self, config, hidden):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden if self.swiglu else hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self.dropout(self.c_proj(h))


class MoE(nn.Module):
    """Drop-in replacement for a block's MLP: (B, T, C) -> (B, T, C). After a training forward,
    `aux_loss` holds this layer's balancing + z-loss (the training loop adds it to the cross-entropy) and
    `load` counts the assignments each expert received (read and reset by `take_load`)."""

    def __init__(self, config, moe):
        super().__init__()
        self.moe = moe
        # equal active parameters: the dense MLP's width (gpt2.mlp_width) split over the experts a token uses
        hidden = moe.expert_hidden or mlp_width(config) // (moe.top_k + moe.n_shared)
        self.router = Router(config.n_embd, moe)
        self.experts = nn.ModuleList([Expert(config, hidden) for _ in range(moe.n_expert)])
        # n_shared shared experts of width h sum to one MLP of width n_shared * h: the hidden units just add up
        self.shared = Expert(config, hidden * moe.n_shared) if moe.n_shared else None
        self.register_buffer("load", torch.zeros(moe.n_expert), persistent=False)
        self.register_buffer("dropped", torch.zeros(()), persistent=False)
        self.aux_loss = None
        for name, p in self.named_parameters():  # GPT-2's init (gpt2.GPT has run its own before the swap)
            if p.dim() < 2:
                nn.init.zeros_(p)
            else:
                std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, x):
        B, T, C = x.shape
        x = x.reshape(B * T, C)
        logits, scores, chosen, gates = self.router(x)
        factor = self.moe.capacity_factor if self.training else self.moe.eval_capacity_factor
        capacity = math.ceil(factor * B * T * self.moe.top_k / self.moe.n_expert) if factor else None
        y, counts, dropped = dispatch(x, chosen, gates, self.experts, capacity)
        if self.shared is not None:
            y = y + self.shared(x)
        if self.training:
            # sigmoid scores do not sum to 1; the balancing loss uses them normalized per token (DeepSeek-V3)
            probs = scores if self.moe.router == "softmax" else scores / scores.sum(-1, keepdim=True)
            self.aux_loss = switch_aux_loss(probs, counts, self.moe.aux_alpha) + z_loss(logits, self.moe.z_alpha)
            self.load += counts
            self.dropped += dropped
        return y.view(B, T, C).to(x.dtype)

    def take_load(self):
        """(assignments per expert, dropped assignments) since the last call; resets both counters."""
        load, dropped = self.load.clone(), self.dropped.clone()
        self.load.zero_()
        self.dropped.zero_()
        return load, dropped


def moeify(model, moe):
    """Swap block.mlp for a fresh MoE layer in every block (every=1), or in blocks every-1, 2*every-1, ...
    (every=2: the odd blocks, GShard's hybrid stack). The rest of the model keeps gpt2.py's weights."""
    if moe.every > len(model.transformer.h):
        raise ValueError(f"--moe-every {moe.every}: the model has {len(model.transformer.h)} blocks, so no block "
                         f"would be MoE; give 1 to {len(model.transformer.h)}")
    for i, block in enumerate(model.transformer.h):
        if i % moe.every == moe.every - 1:
            block.mlp = MoE(model.config, moe).to(model.lm_head.weight.device)
    return model


def moe_layers(model):
    return [m for m in model.modules() if isinstance(m, MoE)]


def param_counts(model):
    """(total, active per token) parameters, non-embedding as gpt2.GPT.num_params counts them: a token uses
    top_k of a layer's routed experts, so the other n_expert - top_k are not active.
    Example: tiny with 8 experts top-2 -> total grows by about 6 dense-MLP halves per layer, active stays the
    dense model's plus the routers' weights and the experts' extra biases (+4,608 in moe.py's default run)."""
    total = model.num_params()
    idle = sum((m.moe.n_expert - m.moe.top_k) * sum(p.numel() for p in m.experts[0].parameters())
               for m in moe_layers(model))
    return total, total - idle


def load_model(path, map_location="cpu"):
    """A checkpoint written by this file -> (model, vocab): a GPT (MoE or dense) with gpt2.py's interface;
    vocab maps the model's token ids to GPT-2 ids (None: the ids are GPT-2's)."""
    ckpt = load_checkpoint(path, map_location)
    model = GPT(GPTConfig(**ckpt["config"]))
    if ckpt.get("moe"):
        moeify(model, MoEConfig(**ckpt["moe"]))
    load_model_state(model, ckpt["model"], path)
    return model.to(map_location), ckpt.get("vocab")


# -----------------------------------------------------------------------------
# Data: a text file as GPT-2 tokens (cached), or a folder of llm.c .bin shards (header: 256 int32, magic
# 20240520, version 1, token count; then uint16 tokens), read here so this file needs no other topic file.

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
FINEWEB = os.path.join(os.environ.get("LLM_SCRATCH_CACHE", os.path.expanduser("~/.cache/llm-from-scratch")),
                       "fineweb-edu-10b")  # where train_gpt2.py --preset gpt2-10b downloads the shards


def text_tokens(path):
    """A text file -> GPT-2 ids (uint16), cached in data/cache/ under a hash of the file's bytes."""
    with open(path, "rb") as f:
        raw = f.read()
    stem = os.path.splitext(os.path.basename(path))[0]
    cache = os.path.join(DATA_DIR, "cache", f"{stem}_gpt2_{hashlib.sha1(raw).hexdigest()[:10]}.npy")
    if not os.path.exists(cache):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"--data {path} is not UTF-8 text ({e}); convert it first, e.g. iconv -f latin1 -t utf-8")
        ids = np.array(bpe.load_gpt2().encode(text), dtype=np.uint16)
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        with open(f"{cache}.tmp{os.getpid()}", "wb") as f:
            np.save(f, ids)
        os.replace(f"{cache}.tmp{os.getpid()}", cache)
    return np.load(cache)


def read_shard(path):
    header = np.fromfile(path, dtype=np.int32, count=256)
    if len(header) < 256 or header[0] != 20240520 or header[1] != 1:
        raise ValueError(f"{path} is not an llm.c token shard (magic 20240520, version 1)")
    n = int(header[2])
    if os.path.getsize(path) != 1024 + 2 * n:
        raise ValueError(f"{path} is truncated: its header says {n} tokens; download it again")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=1024, shape=(n,))


def load_data(data, compact):
    """--data -> (train token arrays, val token arrays, vocab). With `compact`, the ids are renumbered to
    the GPT-2 tokens the text uses (vocab[i] = GPT-2 id of token i): tiny Shakespeare uses 11,706 of 50,257,
    and the softmax over the other 38,551, never a target, would be most of a tiny model's compute."""
    if data == "shakespeare":
        data = os.path.join(DATA_DIR, "tinyshakespeare.txt")
    if os.path.isdir(data):
        shards = sorted(os.path.join(data, f) for f in os.listdir(data) if f.endswith(".bin"))
        val = [read_shard(s) for s in shards if "val" in os.path.basename(s)]
        train = [read_shard(s) for s in shards if "val" not in os.path.basename(s)]
        if not train or not val:
            raise ValueError(f"{data}: need llm.c .bin train shards and val shards ('val' in the name), found "
                             f"{len(train)} and {len(val)}; `python train_gpt2.py --preset gpt2-10b` downloads "
                             f"FineWeb-Edu's into {FINEWEB}")
        return train, val, None
    if not os.path.isfile(data):
        raise ValueError(f"--data {data!r}: not shakespeare, a text file, or a folder of .bin shards")
    ids = text_tokens(data)
    if not len(ids):
        raise ValueError(f"--data {data}: the file holds no text to train on")
    vocab = None
    if compact:
        vocab = np.unique(ids)
        ids = np.searchsorted(vocab, ids).astype(np.uint16)
    split = int(0.9 * len(ids))
    return [ids[:split]], [ids[split:]], vocab


def get_batch(shards, batch_size, seq_len, seed, step, device):
    """Random windows drawn from (seed, step) alone: the dense and the MoE run see the same tokens, and a
    resumed run draws exactly what the uninterrupted one would have, with no loader state to save."""
    rng = np.random.default_rng([seed, step])
    room = np.array([len(s) - seq_len - 1 for s in shards])
    if room.max() < 0:
        raise ValueError(f"the training data is shorter than --seq-len {seq_len} + 1 tokens")
    which = rng.choice(len(shards), size=batch_size, p=room.clip(0) / room.clip(0).sum())
    rows = [shards[s][o:o + seq_len + 1] for s, o in zip(which, rng.integers(0, room[which] + 1))]
    buf = torch.from_numpy(np.stack(rows).astype(np.int64)).to(device)
    return buf[:, :-1], buf[:, 1:]


# -----------------------------------------------------------------------------
# Training: one model at a time, dense (moe=None) or MoE; the same seed gives both the same batches.


@torch.no_grad()
def evaluate(model, val, args, device, dtype):
    """Mean loss over the first eval_tokens of the validation tokens, in windows of seq_len."""
    model.eval()
    ids, T = val[0], args.seq_len
    n = min(args.eval_tokens, len(ids) - 1) // T
    if n == 0:
        raise ValueError(f"validation needs one window of --seq-len {T} + 1 tokens: --eval-tokens is "
                         f"{args.eval_tokens}, the validation data has {len(ids)}; raise --eval-tokens or lower --seq-len")
    total = 0.0
    for i in range(0, n, args.batch_size):
        rows = np.stack([ids[j * T:j * T + T + 1] for j in range(i, min(n, i + args.batch_size))])
        buf = torch.from_numpy(rows.astype(np.int64)).to(device)
        with autocast(device, dtype):
            _, loss = model(buf[:, :-1], buf[:, 1:])
        total += loss.item() * len(rows)
    model.train()
    return total / n


def load_stats(rows, last=0.1):
    """Over the last 10% of the logged steps, per MoE layer: busiest expert's share / mean share, quietest's,
    and the experts that received no assignment at all (dead)."""
    loads = np.array([r["load"] for r in rows if "load" in r])  # (steps, layers, E) shares
    if not len(loads):
        return {}
    share = loads[-max(1, int(len(loads) * last)):].mean(0)  # (layers, E)
    E = share.shape[1]
    return dict(max_load=float(share.max(1).max() * E), min_load=float(share.min(1).min() * E),
                dead=int((share == 0).sum()))


def train(args, moe, out_dir, data, device, dtype, log):
    """Train one model and return its summary: val loss, tokens/s, parameters, expert load."""
    train_ids, val_ids, vocab = data
    n_vocab = len(vocab) if vocab is not None else 50257
    arch = {k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd", "pos_emb") if getattr(args, k)}
    config = GPTConfig.from_preset(args.model, vocab_size=64 * math.ceil(n_vocab / 64),  # matmul-friendly
                                   block_size=args.seq_len, **arch)
    seed_everything(args.seed)  # the same init for the shared parts of both models
    model = GPT(config)
    if moe is not None:
        moeify(model, moe)
    model.to(device)
    optimizer = model.configure_optimizer(args.weight_decay, args.lr, (0.9, 0.95), device)
    scaler = grad_scaler(device, dtype)
    path, step, train_time, cpu_time = os.path.join(out_dir, "ckpt.pt"), 0, 0.0, 0.0
    if args.resume and os.path.exists(path):
        ckpt = load_checkpoint(path, device)
        changed = [k for k, v in ckpt["args"].items()  # all that shapes the run; not where it runs, or which arch
                   if k not in (*RUN_PLACE, "arch", "log_interval") and getattr(args, k, v) != v]
        if changed:
            raise ValueError(f"--resume: " + ", ".join(f"--{k.replace('_', '-')} is {getattr(args, k)!r}, the "
                                                       f"checkpoint used {ckpt['args'][k]!r}" for k in changed) +
                             f" (in {out_dir}); use the same flags or a new --out-dir")
        if ckpt["moe"] != (asdict(moe) if moe else None):
            raise ValueError(f"--resume: the MoE flags differ from the checkpoint's {ckpt['moe']}")
        load_model_state(model, ckpt["model"], path)
        optimizer.load_state_dict(ckpt["optimizer"])
        restore_scaler(scaler, ckpt["scaler"])
        step, train_time, cpu_time = ckpt["step"], ckpt["train_time"], ckpt["cpu_time"]
        set_rng_state(ckpt["rng"])
        log(f"resumed {path} at step {step}")
    elif args.init != "scratch":
        load_model_state(model, load_model(args.init)[0].state_dict(), args.init)
    layers = moe_layers(model)
    total, active = param_counts(model)
    name = "dense" if moe is None else f"moe {moe.n_expert}x top-{moe.top_k}"
    log(f"{name}: {total / 1e6:.2f}M params, {active / 1e6:.2f}M active per token")
    metrics = MetricsLog(out_dir, resume_step=step if args.resume else None)
    compiled = maybe_compile(model, args.compile)
    stop = min(args.max_steps, args.stop_after or args.max_steps)
    tokens_per_step = args.batch_size * args.seq_len
    val_loss = None
    if step == 0:
        metrics.log(step=0, val_loss=evaluate(compiled, val_ids, args, device, dtype), time=0.0)
    while step < stop:
        t0, c0 = time.perf_counter(), time.process_time()
        x, y = get_batch(train_ids, args.batch_size, args.seq_len, args.seed, step, device)
        lr = lr_at(step, args.lr, args.warmup_steps, args.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(device, dtype):
            _, loss = compiled(x, y)
        aux = sum((m.aux_loss for m in layers), torch.zeros((), device=device))
        scaler.scale(loss + aux).backward()
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))  # 0 = off
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        row = dict(train_loss=loss.item(), lr=lr, grad_norm=norm.item())
        if layers:
            load, dropped = map(torch.stack, zip(*(m.take_load() for m in layers)))  # (L, E), (L,)
            if moe.bias_rate:
                for m, n in zip(layers, load):
                    update_bias(m.router.bias, n, moe.bias_rate)
            row.update(aux_loss=aux.item(), dropped=dropped.sum().item() / load.sum().item(),
                       load=[[round(v, 4) for v in r] for r in (load / load.sum(1, keepdim=True)).tolist()])
        step += 1
        dt = time.perf_counter() - t0
        train_time, cpu_time = train_time + dt, cpu_time + time.process_time() - c0
        metrics.log(step=step, tokens_per_sec=tokens_per_step / dt, time=train_time, cpu_time=cpu_time, **row)
        if step % args.log_interval == 0 or step == stop:
            log(f"{name} step {step:4d} | loss {row['train_loss']:.4f} | {dt * 1000:.0f} ms | "
                f"{tokens_per_step / dt:,.0f} tok/s" + (f" | aux {row['aux_loss']:.4f}" if layers else ""))
        if step % args.eval_interval == 0 or step == stop:
            val_loss = evaluate(compiled, val_ids, args, device, dtype)
            metrics.log(step=step, val_loss=val_loss, time=train_time)
            log(f"{name} step {step:4d} | val loss {val_loss:.4f}")
            save_checkpoint(path, model, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), step=step,
                            train_time=train_time, cpu_time=cpu_time, moe=asdict(moe) if moe else None, args=vars(args),
                            vocab=vocab.tolist() if vocab is not None else None, rng=rng_state())
    if val_loss is None:  # a finished run asked to resume: just report it
        val_loss = evaluate(compiled, val_ids, args, device, dtype)
    metrics.plot(title=f"moe.py {name}")
    rows = MetricsLog.read(out_dir)
    if layers:
        plot_expert_load(rows, os.path.join(out_dir, "expert_load.png"), name)
    return dict(arch=name, params=total, active_params=active, val_loss=val_loss, steps=step,
                tokens=step * tokens_per_step, train_seconds=train_time,
                tokens_per_sec=step * tokens_per_step / max(train_time, 1e-9), cpu_seconds=cpu_time,
                tokens_per_cpu_sec=step * tokens_per_step / max(cpu_time, 1e-9), **load_stats(rows))


def plot_expert_load(rows, path, title):
    """One panel per MoE layer: each expert's share of the assignments over training (a 10-step moving
    average), stacked; a balanced layer is evenly striped, a collapsed one has a few bands."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = np.array([r["step"] for r in rows if "load" in r])
    loads = np.array([r["load"] for r in rows if "load" in r])  # (steps, layers, E)
    w = min(10, len(loads))
    smooth = np.apply_along_axis(lambda s: np.convolve(s, np.ones(w) / w, mode="valid"), 0, loads)
    steps = steps[w - 1:]
    fig, axes = plt.subplots(1, loads.shape[1], figsize=(3.2 * loads.shape[1], 3), sharey=True, squeeze=False)
    for layer, ax in enumerate(axes[0]):
        ax.stackplot(steps, smooth[:, layer].T)
        ax.set_title(f"MoE layer {layer}"), ax.set_xlabel("step"), ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("share of assignments per expert")
    fig.suptitle(title, y=1.03)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


# -----------------------------------------------------------------------------
# Command line

RUN_PRESETS = {
    # one thread of the 2-core CPU, both models together: 7.4 min of CPU time, 11.4 min wall at load 2.5-3
    # (bench/results/moe_cpu.md)
    "shakespeare": dict(data="shakespeare", model="tiny", pos_emb="rope", seq_len=128, batch_size=16, max_steps=400, lr=3e-3,
                        warmup_steps=20, eval_interval=100, eval_tokens=32768, compact_vocab=True),
    # GPT-2 small width on FineWeb-Edu (the shards train_gpt2.py downloads): 32 x 1024 tokens per step,
    # ~100M tokens. Not run here (no GPU); the numbers are a starting point.
    "gpt2-fineweb": dict(data=FINEWEB, model="gpt2", pos_emb="rope", seq_len=1024, batch_size=32, max_steps=3000, lr=1.5e-3,
                         warmup_steps=200, eval_interval=250, eval_tokens=1 << 20, compact_vocab=False,
                         dtype="bfloat16", compile=True),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    g = p.add_argument_group("run")
    g.add_argument("--preset", default="shakespeare", choices=list(RUN_PRESETS),
                   help="defaults for everything below; a flag given on the command line wins")
    g.add_argument("--arch", default="both", choices=["both", "dense", "moe"],
                   help="train the dense model, its MoE twin, or both one after the other (same tokens)")
    g.add_argument("--out-dir", default="out_moe", help="each model writes to <out-dir>/dense, <out-dir>/moe")
    g.add_argument("--resume", action="store_true", help="continue each model from its <out-dir>/<arch>/ckpt.pt")
    g.add_argument("--init", default="scratch", help="scratch | a checkpoint of this file with the same flags")
    g.add_argument("--log-interval", type=int, default=10, help="steps between log lines")
    add_common_args(p)
    g = p.add_argument_group("data and model")
    g.add_argument("--data", help="shakespeare | a text file | a folder of llm.c .bin shards")
    g.add_argument("--compact-vocab", action=argparse.BooleanOptionalAction,
                   help="text data only: renumber to the GPT-2 tokens the text uses (see load_data)")
    g.add_argument("--model", choices=list(PRESETS), help="gpt2.py architecture preset")
    for flag in ("--n-layer", "--n-head", "--n-embd"):
        g.add_argument(flag, type=int, help="override the preset's value")
    g.add_argument("--pos-emb", choices=["learned", "sinusoidal", "rope"], help="position scheme (gpt2.py)")
    g.add_argument("--seq-len", type=int, help="tokens per training window (also the block size)")
    g = p.add_argument_group("mixture of experts")
    for field, kind, text in (
            ("n_expert", int, "routed experts per MoE layer"), ("top_k", int, "routed experts per token"),
            ("n_shared", int, "shared experts every token passes through"),
            ("expert_hidden", int, "hidden width of an expert; 0 = dense width / (top-k + shared): equal active"),
            ("router", str, "softmax (Switch, Mixtral) | sigmoid (DeepSeek-V3)"),
            ("capacity_factor", float, "training capacity factor; 0 = no token is dropped"),
            ("eval_capacity_factor", float, "capacity factor for evaluation and generation; 0 = none"),
            ("aux_alpha", float, "Switch balancing loss weight (Switch: 0.01; 0 = off)"),
            ("z_alpha", float, "router z-loss weight"),
            ("bias_rate", float, "loss-free balancing bias step per optimizer step (0 = off)"),
            ("every", int, "MoE in every block (1) or every other block (2)")):
        flag = "--moe-every" if field == "every" else "--" + field.replace("_", "-")
        g.add_argument(flag, dest=field, type=kind, default=getattr(MoEConfig, field), help=text)
    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, help="sequences per step")
    g.add_argument("--max-steps", type=int, help="optimizer steps (the schedule's length)")
    g.add_argument("--stop-after", type=int, help="stop (with a checkpoint) after this step; --resume goes on")
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--warmup-steps", type=int, help="linear warmup steps, then cosine decay")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices")
    g.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clipping (0 = off)")
    g.add_argument("--eval-interval", type=int, help="steps between val losses and checkpoints")
    g.add_argument("--eval-tokens", type=int, help="validation tokens per evaluation")
    first, _ = p.parse_known_args(argv)
    p.set_defaults(**RUN_PRESETS[first.preset])
    args = p.parse_args(argv)
    for name in ("batch_size", "seq_len", "max_steps", "eval_interval", "eval_tokens", "log_interval", "lr"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    for name in ("warmup_steps", "grad_clip"):  # a negative clip would reverse the gradient
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0 (0 = off), got {getattr(args, name)}")
    if note := warmup_note(args.warmup_steps, args.max_steps):
        print(f"moe.py: {note}")
    if args.stop_after is not None and args.stop_after < 1:  # 0 ran the whole schedule
        p.error(f"--stop-after must be a step >= 1, got {args.stop_after}")
    if args.resume and args.init != "scratch":
        p.error("--resume continues from the run's own checkpoint; it cannot be combined with --init")
    archs = ["dense", "moe"] if args.arch == "both" else [args.arch]
    if args.resume and not any(os.path.exists(os.path.join(args.out_dir, a, "ckpt.pt")) for a in archs):
        p.error(f"--resume: no checkpoint at {os.path.join(args.out_dir, archs[0], 'ckpt.pt')}; run without --resume "
                f"to start, or point --out-dir at the run")
    if args.init != "scratch" and not os.path.isfile(args.init):
        p.error(f"--init {args.init!r}: no such checkpoint file; give a ckpt.pt written by moe.py, or scratch")
    if args.init != "scratch" and args.arch == "both":  # one checkpoint cannot start both a dense and an MoE model
        p.error(f"--init {args.init}: give --arch dense or --arch moe, the kind of model the checkpoint holds")
    n_layer = args.n_layer or GPTConfig.from_preset(args.model).n_layer
    if args.arch != "dense" and args.every > n_layer:  # before the dense half trains, not after
        p.error(f"--moe-every {args.every}: the model has {n_layer} blocks, so no block would be MoE; give 1 to "
                f"{n_layer}")
    if args.resume and "dtype" not in given_flags(argv):
        saved = next(load_checkpoint(path)["args"] for path in (os.path.join(args.out_dir, a, "ckpt.pt")
                                                                 for a in archs) if os.path.exists(path))
        args.dtype = saved.get("dtype", args.dtype)  # the run's own precision: bf16 resumed in float32 is another run
    return p, args


def main(argv=None):
    p, args = parse_args(argv)
    try:
        moe = MoEConfig(**{f: getattr(args, f) for f in MoEConfig.__dataclass_fields__})
        device = pick_device(args.device)
        dtype = pick_dtype(args.dtype, device)
        data = load_data(args.data, args.compact_vocab)
    except ValueError as e:
        p.error(str(e))
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    summaries = []
    for arch in (["dense", "moe"] if args.arch == "both" else [args.arch]):
        try:
            summaries.append(train(args, moe if arch == "moe" else None, os.path.join(args.out_dir, arch), data,
                                   device, dtype, log))
        except ValueError as e:
            p.error(str(e))
    log(f"\n{'model':22s} {'params':>7s} {'active':>7s} {'val loss':>8s} {'tok/s':>6s} {'tok/cpu-s':>9s} "
        f"{'busiest':>7s} {'dead':>4s}")
    for s in summaries:
        log(f"{s['arch']:22s} {s['params'] / 1e6:6.2f}M {s['active_params'] / 1e6:6.2f}M {s['val_loss']:8.4f} "
            f"{s['tokens_per_sec']:6,.0f} {s['tokens_per_cpu_sec']:9,.0f} "
            + (f"{s['max_load']:6.2f}x {s['dead']:4d}" if "max_load" in s else ""))
    if len(summaries) == 2:
        d, m = summaries
        log(f"MoE - dense val loss {m['val_loss'] - d['val_loss']:+.4f} at {d['tokens']:,} tokens each; MoE "
            f"tokens/s {m['tokens_per_sec'] / d['tokens_per_sec']:.2f}x dense (per CPU second "
            f"{m['tokens_per_cpu_sec'] / d['tokens_per_cpu_sec']:.2f}x)")
    with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
        json.dump(summaries, f, indent=1)

if __name__ == "__main__":
    main()
