"""
A character-level GPT on tiny Shakespeare, built up one idea at a time.

This is the first file to read. It is self-contained (standard library, torch, tqdm) and goes top to
bottom the way Karpathy's "Let's build GPT" lecture does: a bigram table that predicts the next
character from the current one alone, then one head of self-attention, several heads, a
feed-forward layer, residual connections, layer norm, and finally the full model with dropout,
scaled up. Each `--stage` adds exactly one idea to the previous one so you can see what it buys.

    python char_gpt.py                         # the full model (CPU preset on a CPU), then a sample
    python char_gpt.py --stage bigram          # any rung of the ladder, at the lecture's small scale
    python char_gpt.py --preset gpu            # the scaled-up 6-layer, 384-wide model (for a GPU)
    python char_gpt.py --sample --prompt "ROMEO:"   # load out-char/ckpt.pt and generate
    python char_gpt.py --help                  # every flag, in groups

Every run writes <out-dir>/metrics.jsonl (the mean training loss every --log-interval steps, train and
val loss at every evaluation), <out-dir>/ckpt.pt and (with matplotlib) <out-dir>/loss.png.
"""
import argparse
import json
import math
import os
import time

import torch
import torch.nn as nn
from torch.nn import functional as F
from tqdm import tqdm

DATA_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DATA_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tinyshakespeare.txt")
# The ladder: each stage keeps every idea of the stages before it and adds one.
STAGES = ["bigram", "attention", "multihead", "ffn", "residual", "layernorm", "full"]

# The lecture's small scale: every rung of the ladder below "full" is trained like this, so the
# rungs differ only by the idea they add.
SMALL = dict(n_layer=3, n_head=4, n_embd=32, block_size=8, batch_size=32, dropout=0.0, lr=1e-3,
             max_steps=5000, warmup_steps=0, schedule="constant", weight_decay=0.0, grad_clip=0.0,
             eval_interval=500, eval_iters=200)
BIGRAM = dict(lr=1e-2, max_steps=3000)  # a lookup table learns fast and needs a big step size
PRESETS = {
    # Sized by measurement to finish in under 10 minutes on 2 CPU cores (see README).
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=32, dropout=0.0, lr=2e-3,
                max_steps=1800, warmup_steps=100, schedule="cosine", weight_decay=0.1, grad_clip=1.0,
                eval_interval=400, eval_iters=50),
    # The lecture's scaled-up model, trained with nanoGPT's shakespeare_char recipe.
    "gpu": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, dropout=0.2, lr=1e-3,
                max_steps=5000, warmup_steps=100, schedule="cosine", weight_decay=0.1, grad_clip=1.0,
                eval_interval=500, eval_iters=200),
}


# ----------------------------------------------------------------------------- data

def load_text(path=DATA_PATH):
    if not os.path.exists(path):
        raise SystemExit(f"data file {path} not found; download it with\n"
                         f"  curl -o {path} {DATA_URL}")
    if os.path.isdir(path):
        raise SystemExit(f"--data {path} is a folder; give one text file")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise SystemExit(f"--data {path} is not UTF-8 text ({e}); convert it first, e.g. iconv -f latin1 -t utf-8")


class CharTokenizer:
    """The vocabulary is simply every distinct character of the text (65 for tiny Shakespeare)."""

    def __init__(self, chars):
        self.chars = "".join(sorted(set(chars)))
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self):
        return len(self.chars)

    def encode(self, s):
        unknown = sorted(set(s) - set(self.stoi))
        if unknown:
            raise ValueError(f"characters not in the vocabulary: {unknown!r}")
        return [self.stoi[c] for c in s]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


def split_data(data, frac=0.9):
    # The last 10% is held out: val loss measures generalisation, not memorisation.
    n = int(frac * len(data))
    return data[:n], data[n:]


def get_batch(data, block_size, batch_size, generator=None, device="cpu"):
    # Random offsets: each row is a window of block_size+1 characters; y is x shifted by one, so a
    # single window gives block_size training examples (predict char t+1 from chars 0..t).
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    x = torch.stack([data[i:i + block_size] for i in ix])
    y = torch.stack([data[i + 1:i + 1 + block_size] for i in ix])
    return x.to(device), y.to(device)


# ----------------------------------------------------------------------------- the model, one idea at a time

def stage_includes(stage, idea):
    """Whether a stage has the idea that the stage named `idea` introduced.
    stage_includes("full", "layernorm") -> True; stage_includes("ffn", "residual") -> False"""
    return STAGES.index(stage) >= STAGES.index(idea)


class BigramLanguageModel(nn.Module):
    """Rung 0: a table of next-character logits indexed by the current character. No context at all."""

    def __init__(self, vocab_size):
        super().__init__()
        self.token_embedding_table = nn.Embedding(vocab_size, vocab_size)

    def forward(self, idx):
        return self.token_embedding_table(idx)


class Head(nn.Module):
    """One head of causal self-attention: every position takes a weighted average of the values of
    the positions before it, with weights from how well its query matches their keys."""

    def __init__(self, n_embd, head_size, block_size, dropout=0.0):
        super().__init__()
        self.key = nn.Linear(n_embd, head_size, bias=False)
        self.query = nn.Linear(n_embd, head_size, bias=False)
        self.value = nn.Linear(n_embd, head_size, bias=False)
        self.register_buffer("tril", torch.tril(torch.ones(block_size, block_size)))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        B, T, C = x.shape
        k, q = self.key(x), self.query(x)
        # Scale by 1/sqrt(head_size) so the scores keep unit variance and softmax stays soft at init.
        wei = q @ k.transpose(-2, -1) * k.shape[-1] ** -0.5
        wei = wei.masked_fill(self.tril[:T, :T] == 0, float("-inf"))  # the future may not be seen
        wei = self.dropout(F.softmax(wei, dim=-1))
        return wei @ self.value(x)


class MultiHeadAttention(nn.Module):
    """n_head Heads in parallel, outputs concatenated: several smaller "communication channels"
    instead of one. Computed as one batched matmul (the same maths as a list of Head modules, which
    the tests check) because looping over heads is slow."""

    def __init__(self, n_embd, n_head, block_size, dropout=0.0, proj=True):
        super().__init__()
        assert n_embd % n_head == 0, "n_embd must be divisible by n_head"
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
        # The output projection arrives with the residual stage: it maps the heads back into the
        # residual stream. Before that the concatenated heads are used as they are.
        self.proj = nn.Linear(n_embd, n_embd) if proj else nn.Identity()
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class FeedForward(nn.Module):
    """Attention lets tokens talk to each other; this lets each token think about what it heard."""

    def __init__(self, n_embd, mult=4, dropout=0.0):
        super().__init__()
        # mult=1 at the ffn stage (as in the lecture); the residual stage widens the inner layer 4x
        # and adds the projection back into the residual stream.
        layers = [nn.Linear(n_embd, mult * n_embd), nn.ReLU()]
        if mult != 1:
            layers.append(nn.Linear(mult * n_embd, n_embd))
        self.net = nn.Sequential(*layers, nn.Dropout(dropout))

    def forward(self, x):
        return self.net(x)


class Block(nn.Module):
    """Communication (attention) then computation (feed-forward). With residual connections the block
    only adds a correction to x, so gradients flow straight through deep stacks; pre-layer-norm keeps
    the inputs of each sub-layer at unit scale."""

    def __init__(self, n_embd, n_head, block_size, dropout=0.0, layernorm=True):
        super().__init__()
        self.sa = MultiHeadAttention(n_embd, n_head, block_size, dropout)
        self.ffwd = FeedForward(n_embd, 4, dropout)
        self.ln1 = nn.LayerNorm(n_embd) if layernorm else nn.Identity()
        self.ln2 = nn.LayerNorm(n_embd) if layernorm else nn.Identity()

    def forward(self, x):
        x = x + self.sa(self.ln1(x))
        x = x + self.ffwd(self.ln2(x))
        return x


class CharGPT(nn.Module):
    """Token + position embeddings -> the body chosen by the stage -> (final layer norm) -> logits."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        stage, V, d, T = cfg["stage"], cfg["vocab_size"], cfg["n_embd"], cfg["block_size"]
        self.tok_emb = nn.Embedding(V, d)
        self.pos_emb = nn.Embedding(T, d)  # attention is order-blind; positions must be given
        if stage == "attention":
            body = Head(d, d, T)  # a single head as wide as the embedding
        elif stage == "multihead":
            body = MultiHeadAttention(d, cfg["n_head"], T, proj=False)
        elif stage == "ffn":
            body = nn.Sequential(MultiHeadAttention(d, cfg["n_head"], T, proj=False), FeedForward(d, 1))
        else:  # residual, layernorm, full: a stack of n_layer blocks
            ln = stage_includes(stage, "layernorm")
            body = nn.Sequential(*[Block(d, cfg["n_head"], T, cfg["dropout"], ln) for _ in range(cfg["n_layer"])])
        self.body = body
        self.ln_f = nn.LayerNorm(d) if stage_includes(stage, "layernorm") else nn.Identity()
        self.lm_head = nn.Linear(d, V)

    def forward(self, idx):
        B, T = idx.shape
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(T, device=idx.device))
        return self.lm_head(self.ln_f(self.body(x)))


def build_model(cfg):
    model = BigramLanguageModel(cfg["vocab_size"]) if cfg["stage"] == "bigram" else CharGPT(cfg)
    if cfg["stage"] != "full":
        return model  # PyTorch's default init, as in the lecture (see README for why it matters here)
    # The full model uses GPT-2's init: small weights, so the first predictions are nearly uniform
    # (loss ~ ln 65) and the residual stream is not swamped at the start.
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    return model


def loss_fn(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))


@torch.no_grad()
def estimate_loss(model, data, block_size, batch_size, eval_iters, device="cpu", seed=1337, autocast=None):
    """Mean loss over eval_iters random batches. One batch is noisy; 200 of them are not. The batches
    come from their own seeded generator, so every evaluation (and every stage) sees the same ones
    and the training RNG is left untouched."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    losses = torch.zeros(eval_iters)
    for i in range(eval_iters):
        x, y = get_batch(data, block_size, batch_size, gen, device)
        with autocast if autocast is not None else torch.autocast("cpu", enabled=False):
            losses[i] = loss_fn(model(x), y).item()
    model.train(was_training)
    return losses.mean().item()


@torch.no_grad()
def generate(model, idx, max_new_tokens, block_size, *, temperature=1.0, top_k=None, generator=None):
    """Sample one character at a time, feeding each back in. Only the last block_size characters fit
    in the context (the position table has block_size rows)."""
    model.eval()
    for _ in range(max_new_tokens):
        logits = model(idx[:, -block_size:])[:, -1, :].float() / temperature
        if top_k is not None:
            v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
            logits[logits < v[:, [-1]]] = float("-inf")
        probs = F.softmax(logits, dim=-1)
        idx = torch.cat((idx, torch.multinomial(probs, 1, generator=generator)), dim=1)
    return idx


# ----------------------------------------------------------------------------- training

def resolve_device(name):
    """--device -> a device this machine has. resolve_device("auto") -> "cuda" with an NVIDIA GPU,
    else "mps" on Apple silicon, else "cpu"; resolve_device("cuda") without a GPU -> a clear error."""
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA GPU is visible here; use --device cpu or --device auto")
    if name == "mps" and not has_mps:
        raise SystemExit("--device mps: MPS is not available here; use --device cpu or --device auto")
    return name


def resolve_dtype(name, device):
    if name == "auto":
        return "bfloat16" if device == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    return name


def lr_at(step, max_lr, warmup_steps, max_steps, min_lr_ratio=0.1):
    """Linear warmup (Adam's first updates are noisy), then cosine decay to min_lr_ratio * max_lr at
    max_steps (the same schedule as gpt2.lr_at; this file imports nothing of ours, so it has its own).
    lr_at(0, 1e-3, 10, 110) -> 1e-4; lr_at(60, 1e-3, 10, 110) -> 5.5e-4; lr_at(500, 1e-3, 10, 110) -> 1e-4"""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return max_lr * min_lr_ratio
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return max_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def lr_for_step(step, cfg):
    """The ladder trains at a constant lr, as in the lecture; the full model warms up and decays.
    lr_for_step(999, SMALL) -> 1e-3"""
    if cfg["schedule"] == "constant":
        return cfg["lr"]
    return lr_at(step, cfg["lr"], cfg["warmup_steps"], cfg["lr_decay_steps"])


def make_optimizer(model, cfg, device):
    # Weight decay on the matrices (and embeddings) only, as in nanoGPT: pulling biases and
    # layer-norm gains towards zero regularises nothing useful.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg["lr"], betas=(0.9, 0.99), fused=device == "cuda")


def make_config(args, vocab_size, device="cpu"):
    preset = args.preset
    if preset == "auto":  # the device the run uses, not whether the machine has a GPU: --device cpu is the CPU's
        preset = "gpu" if device.startswith("cuda") else "cpu"
    cfg = dict(PRESETS[preset] if args.stage == "full" else SMALL)
    if args.stage == "bigram":
        cfg.update(BIGRAM)
    cfg.update(stage=args.stage, preset=preset if args.stage == "full" else "small", vocab_size=vocab_size)
    for k in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "dropout", "lr", "max_steps",
              "warmup_steps", "weight_decay", "eval_interval", "eval_iters"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    cfg["lr_decay_steps"] = args.lr_decay_steps or cfg["max_steps"]
    return cfg


def save_checkpoint(path, model, **extra):
    """{"model": model's weights, **extra} to path (the same call as gpt2.save_checkpoint; here the
    config goes in extra, as the bigram model has none of its own)."""
    tmp = path + ".tmp"
    torch.save({"model": model.state_dict(), **extra}, tmp)
    os.replace(tmp, path)  # atomic: an interrupted save never leaves a half-written checkpoint


def plot_losses(metrics, path, title="char_gpt.py"):
    """metrics.jsonl rows -> a PNG: the mean training loss as a line, train and val loss at evaluations."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no loss plot")
        return
    running = [(m["step"], m["train_loss_avg"]) for m in metrics if "train_loss_avg" in m]
    evals = [m for m in metrics if "val_loss" in m]
    plt.figure(figsize=(7, 4))
    if running:
        plt.plot(*zip(*running), lw=1, alpha=0.7, label="train (mean of the batches since the last point)")
    steps = [m["step"] for m in evals]
    plt.plot(steps, [m["train_loss"] for m in evals], "o--", label="train (evaluation)")
    plt.plot(steps, [m["val_loss"] for m in evals], "o-", label="val (evaluation)")
    plt.xlabel("step"), plt.ylabel("loss (nats/char)"), plt.legend(), plt.grid(alpha=0.3)
    plt.title(title)
    plt.savefig(path, dpi=100, bbox_inches="tight")
    plt.close()


def check_prompt(tok, prompt):
    """A prompt with a character the vocabulary lacks -> a clear error (checked before any training)."""
    try:
        tok.encode(prompt or "")
    except ValueError as e:
        raise SystemExit(f"--prompt: {e}") from None


def load_checkpoint(path):
    """<out-dir>/ckpt.pt -> its dict, or a clear error when the file is not a checkpoint of this script."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"{path} is not a readable checkpoint ({e.__class__.__name__}); delete it, or train "
                         f"again in another --out-dir") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "chars"} <= set(ckpt):
        raise SystemExit(f"{path} is not a checkpoint of char_gpt.py (no model/config/chars entries); "
                         f"point --out-dir at a char_gpt.py run")
    return ckpt


def train(args):
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    text = load_text(args.data)
    tok = CharTokenizer(text)
    check_prompt(tok, getattr(args, "prompt", ""))  # now, not after the whole training run
    data = torch.tensor(tok.encode(text), dtype=torch.long)
    train_data, val_data = split_data(data)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    metrics_path = os.path.join(args.out_dir, "metrics.jsonl")

    ckpt = None
    if args.resume:
        if not os.path.exists(ckpt_path):
            raise SystemExit(f"--resume: no checkpoint at {ckpt_path}; run without --resume to start")
        ckpt = load_checkpoint(ckpt_path)
        if ckpt["chars"] != tok.chars:  # the same ids would stand for other characters
            raise SystemExit(f"--resume: --data {args.data} has other characters than the checkpoint's run; "
                             f"give the run's --data, or a new --out-dir")
        cfg = dict(ckpt["config"])  # the run's own hyperparameters; only --max-steps may extend it
        if args.max_steps is not None:
            if args.max_steps < ckpt["step"]:
                raise SystemExit(f"--resume: the run in {args.out_dir} is at step {ckpt['step']}, past --max-steps "
                                 f"{args.max_steps}; give more steps, or leave --max-steps out")
            cfg["max_steps"] = args.max_steps
    else:
        cfg = make_config(args, tok.vocab_size, device)
    if cfg["n_embd"] % cfg["n_head"]:
        raise SystemExit(f"--n-embd {cfg['n_embd']} is not a multiple of --n-head {cfg['n_head']}; each head gets "
                         f"n_embd / n_head")
    if len(val_data) <= cfg["block_size"]:  # a batch is a window of block_size + 1 characters
        raise SystemExit(f"--data {args.data}: its last tenth, the validation split, has {len(val_data)} characters, "
                         f"too few for one window of --block-size {cfg['block_size']} + 1; use a longer text or a "
                         f"smaller --block-size")
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)  # training batches; its state goes in the checkpoint

    model = build_model(cfg).to(device)
    optimizer = make_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device, enabled=dtype == "float16")
    # metrics: every row of metrics.jsonl; recent: the losses of the training steps since the last
    # train_loss_avg row (in the checkpoint too, so a resumed run logs the same averages)
    step, metrics, recent = 0, [], []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"]:  # empty when the run was not float16: resumed in float16, it starts a fresh scale
            scaler.load_state_dict(ckpt["scaler"])
        step, recent = ckpt["step"], list(ckpt.get("recent_losses", []))
        torch.set_rng_state(ckpt["rng_cpu"])
        if device == "cuda" and ckpt.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"])
        gen.set_state(ckpt["rng_batches"])
        if os.path.exists(metrics_path):  # the checkpoint alone is enough to go on; lost rows stay lost
            with open(metrics_path) as f:
                # rows logged after the checkpoint (by a run that stopped before its next one) come again
                metrics = [m for m in map(json.loads, f) if m["step"] <= step]
    os.makedirs(args.out_dir, exist_ok=True)  # only now: a refused run leaves no empty folder behind
    with open(metrics_path, "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in metrics)
    n_params = sum(p.numel() for p in model.parameters())
    n_layer = cfg["n_layer"] if stage_includes(cfg["stage"], "residual") else "-"  # from there on: n_layer blocks
    print(f"stage={cfg['stage']} preset={cfg['preset']} params={n_params:,} device={device} dtype={dtype} "
          f"layers={n_layer} heads={cfg['n_head']} n_embd={cfg['n_embd']} block={cfg['block_size']} "
          f"batch={cfg['batch_size']} steps={cfg['max_steps']}")

    compile_ = device == "cuda" if args.compile is None else args.compile
    fwd = torch.compile(model) if compile_ else model
    autocast = torch.autocast(device.split(":")[0], dtype=getattr(torch, dtype), enabled=dtype != "float32")
    B, T = cfg["batch_size"], cfg["block_size"]

    def log_row(**row):
        metrics.append(row)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def evaluate_and_save(step, t_train, tokens):
        tr = estimate_loss(fwd, train_data, T, B, cfg["eval_iters"], device, autocast=autocast)
        va = estimate_loss(fwd, val_data, T, B, cfg["eval_iters"], device, autocast=autocast)
        log_row(step=step, train_loss=round(tr, 4), val_loss=round(va, 4), lr=lr_for_step(max(step - 1, 0), cfg),
                tokens_per_sec=round(tokens / t_train, 1) if t_train > 0 else None,
                elapsed=round(time.time() - t0, 2))
        tqdm.write(f"step {step}: train {tr:.4f} val {va:.4f} ({metrics[-1]['elapsed']:.0f}s)")
        save_checkpoint(ckpt_path, model, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                        step=step, config=cfg, chars=tok.chars, recent_losses=recent,
                        rng_cpu=torch.get_rng_state(), rng_batches=gen.get_state(),
                        rng_cuda=torch.cuda.get_rng_state() if device == "cuda" else None)

    t0 = time.time()
    t_train, tokens = 0.0, 0
    model.train()
    bar = tqdm(total=cfg["max_steps"], initial=step, desc="train", mininterval=2, disable=None)
    while True:
        if (step % cfg["eval_interval"] == 0 or step == cfg["max_steps"]) and ckpt is None:
            evaluate_and_save(step, t_train, tokens)
            t_train, tokens = 0.0, 0
        ckpt = None  # only skip the evaluation we resumed at
        if step >= cfg["max_steps"]:
            break
        t = time.time()
        lr = lr_for_step(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        x, y = get_batch(train_data, T, B, gen, device)
        with autocast:
            loss = loss_fn(fwd(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg["grad_clip"] > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        scaler.step(optimizer)
        scaler.update()
        step += 1
        if device == "cuda":
            torch.cuda.synchronize()
        t_train += time.time() - t
        tokens += B * T
        # The training loss comes for free with each step (no extra forward pass): its mean over the
        # last log_interval steps draws the curve between evaluations, which cost 2 x eval_iters batches.
        loss_value = loss.item()
        recent.append(loss_value)
        if step % args.log_interval == 0:
            log_row(step=step, train_loss_avg=round(sum(recent) / len(recent), 4), lr=lr,
                    elapsed=round(time.time() - t0, 2))
            recent.clear()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
    bar.close()
    val = next((m["val_loss"] for m in reversed(metrics) if "val_loss" in m), None)  # None: rows lost, none since
    print(f"done: {step} steps in {time.time() - t0:.1f}s, val loss " + (f"{val:.4f}" if val is not None else "-"))
    plot_losses(metrics, os.path.join(args.out_dir, "loss.png"), f"char_gpt.py --stage {cfg['stage']} "
                                                                  f"({cfg['preset']})")
    return model, tok, cfg, metrics


def load_for_sampling(out_dir, device="cpu"):
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.exists(path):
        raise SystemExit(f"no checkpoint at {path}: train first (python char_gpt.py --out-dir {out_dir})")
    ckpt = load_checkpoint(path)
    model = build_model(ckpt["config"])
    model.load_state_dict(ckpt["model"])
    return model.to(device), CharTokenizer(ckpt["chars"]), ckpt["config"]


def sample_text(model, tok, cfg, prompt, num_chars, seed, device="cpu", temperature=1.0, top_k=None):
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = tok.encode(prompt) if prompt else [tok.stoi.get("\n", 0)]  # a newline (if the text has one) starts text
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    out = generate(model, idx, num_chars, cfg["block_size"], temperature=temperature, top_k=top_k, generator=gen)
    return tok.decode(out[0].tolist())


def parse_args(argv=None):
    def defaults(key):  # "default: ladder 5000, bigram 3000, cpu 1800, gpu 5000": what a flag overrides
        vals = [("ladder", SMALL[key])] + ([("bigram", BIGRAM[key])] if key in BIGRAM else [])
        return "default: " + ", ".join(f"{k} {v:g}" for k, v in vals + [(k, PRESETS[k][key]) for k in PRESETS])

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    g = p.add_argument_group("what to run")
    g.add_argument("--stage", choices=STAGES, default="full",
                   help="rung of the ladder; the stages below full train at the lecture's small scale "
                        "(default: full)")
    g.add_argument("--preset", choices=["cpu", "gpu", "auto"], default="auto",
                   help="size of the full stage: cpu = 4 layers x 128 wide, sized for 2 CPU cores; gpu = 6 x 384 with "
                        "dropout (nanoGPT's shakespeare_char recipe); auto = gpu with CUDA, else cpu")
    g.add_argument("--sample", action="store_true", help="no training: load <out-dir>/ckpt.pt and generate")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                   help="auto = cuda, else mps, else cpu")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="autocast dtype; auto = bfloat16 on CUDA where supported, else float32")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA only)")
    g.add_argument("--seed", type=int, default=1337, help="seeds the weights, the training batches and the sample")
    g = p.add_argument_group("run")
    g.add_argument("--data", default=DATA_PATH, help="text file to train on; its characters are the vocabulary "
                                                     "(default: data/tinyshakespeare.txt)")
    g.add_argument("--out-dir", default="out-char", help="where metrics.jsonl, ckpt.pt and loss.png go")
    g.add_argument("--resume", action="store_true",
                   help="continue from <out-dir>/ckpt.pt exactly, with its hyperparameters "
                        "(only --max-steps may change: a longer run goes on at the decayed lr, its schedule's end)")
    g.add_argument("--max-steps", type=int, help=f"optimizer steps ({defaults('max_steps')})")
    g.add_argument("--batch-size", type=int, help=f"sequences per step ({defaults('batch_size')})")
    g.add_argument("--eval-interval", type=int,
                   help=f"steps between evaluations and checkpoints ({defaults('eval_interval')})")
    g.add_argument("--eval-iters", type=int, help=f"batches per loss estimate ({defaults('eval_iters')})")
    g.add_argument("--log-interval", type=int, default=10,
                   help="steps between rows of the mean training loss in metrics.jsonl (default: 10)")
    g = p.add_argument_group("model (the stage's or preset's values unless given)")
    g.add_argument("--n-layer", type=int, help=f"transformer blocks, residual stage and up ({defaults('n_layer')})")
    g.add_argument("--n-head", type=int, help=f"attention heads ({defaults('n_head')})")
    g.add_argument("--n-embd", type=int, help=f"embedding width ({defaults('n_embd')})")
    g.add_argument("--block-size", type=int, help=f"context length in characters ({defaults('block_size')})")
    g.add_argument("--dropout", type=float,
                   help=f"dropout probability in the blocks, residual stage and up ({defaults('dropout')})")
    g = p.add_argument_group("optimizer (AdamW)")
    g.add_argument("--lr", type=float, help=f"peak learning rate ({defaults('lr')})")
    g.add_argument("--warmup-steps", type=int, help=f"linear warmup, full stage only ({defaults('warmup_steps')})")
    g.add_argument("--lr-decay-steps", type=int,
                   help="step where the cosine decay reaches lr/10, full stage only (default: --max-steps)")
    g.add_argument("--weight-decay", type=float, help=f"on matrices and embeddings only ({defaults('weight_decay')})")
    g = p.add_argument_group("sampling")
    g.add_argument("--prompt", default="", help="text to continue (default: start from a newline)")
    g.add_argument("--num-chars", type=int, default=500, help="characters to generate (default: 500)")
    g.add_argument("--temperature", type=float, default=1.0, help="< 1 sharpens the distribution, > 1 flattens it")
    g.add_argument("--top-k", type=int, default=None, help="sample only among the k likeliest characters")
    args = p.parse_args(argv)
    for name in ("log_interval", "batch_size", "block_size", "eval_interval", "eval_iters", "max_steps", "n_layer",
                 "n_head", "n_embd", "lr_decay_steps"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 1e-5 <= args.temperature < float("inf"):  # smaller: logits / temperature overflows to inf (NaN draws)
        p.error(f"--temperature must be a number >= 1e-5, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        p.error(f"--top-k must be at least 1 (or left out), got {args.top_k}")
    if args.num_chars < 0:
        p.error(f"--num-chars must be >= 0, got {args.num_chars}")
    if args.lr is not None and not args.lr > 0:
        p.error(f"--lr must be above 0, got {args.lr}")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        p.error(f"--dropout must lie in [0, 1), got {args.dropout}")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.sample:
        model, tok, cfg = load_for_sampling(args.out_dir, device)
        check_prompt(tok, args.prompt)
    else:
        model, tok, cfg, _ = train(args)
        print("-" * 40 + " sample")
    text = sample_text(model, tok, cfg, args.prompt, args.num_chars, args.seed, device, args.temperature, args.top_k)
    print(text)
    return text


if __name__ == "__main__":
    main()
