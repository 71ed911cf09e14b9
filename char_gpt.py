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

Every run writes <out-dir>/metrics.jsonl, <out-dir>/ckpt.pt and (with matplotlib) <out-dir>/loss.png.
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
STAGES = ["bigram", "attention", "multihead", "ffn", "residual", "layernorm", "full"]

# The lecture's small scale: every rung of the ladder below "full" is trained like this, so the
# rungs differ only by the idea they add.
SMALL = dict(n_layer=3, n_head=4, n_embd=32, block_size=8, batch_size=32, dropout=0.0, lr=1e-3,
             max_steps=5000, warmup_steps=0, schedule="constant", weight_decay=0.0, grad_clip=0.0,
             eval_interval=500, eval_iters=200)
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
    with open(path, encoding="utf-8") as f:
        return f.read()


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
            ln = STAGES.index(stage) >= STAGES.index("layernorm")
            body = nn.Sequential(*[Block(d, cfg["n_head"], T, cfg["dropout"], ln) for _ in range(cfg["n_layer"])])
        self.body = body
        self.ln_f = nn.LayerNorm(d) if stage in ("layernorm", "full") else nn.Identity()
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
def generate(model, idx, max_new_tokens, block_size, temperature=1.0, top_k=None, generator=None):
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
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    return name


def resolve_dtype(name, device):
    if name == "auto":
        return "bfloat16" if device == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    return name


def lr_at(step, cfg):
    # Linear warmup (Adam's early updates are noisy), then cosine decay to lr/10 at lr_decay_steps.
    lr = cfg["lr"]
    if cfg["schedule"] == "constant":
        return lr
    if step < cfg["warmup_steps"]:
        return lr * (step + 1) / cfg["warmup_steps"]
    decay = cfg["lr_decay_steps"] - cfg["warmup_steps"]
    ratio = min(1.0, (step - cfg["warmup_steps"]) / max(1, decay))
    return lr / 10 + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - lr / 10)


def make_optimizer(model, cfg, device):
    # Weight decay on the matrices (and embeddings) only, as in nanoGPT: pulling biases and
    # layer-norm gains towards zero regularises nothing useful.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg["lr"], betas=(0.9, 0.99), fused=device == "cuda")


def make_config(args, vocab_size):
    preset = args.preset
    if preset == "auto":
        preset = "gpu" if torch.cuda.is_available() else "cpu"
    cfg = dict(PRESETS[preset] if args.stage == "full" else SMALL)
    if args.stage == "bigram":  # a lookup table learns fast and needs a big step size
        cfg.update(lr=1e-2, max_steps=3000)
    cfg.update(stage=args.stage, preset=preset if args.stage == "full" else "small", vocab_size=vocab_size)
    for k in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "dropout", "lr", "max_steps",
              "warmup_steps", "weight_decay", "eval_interval", "eval_iters"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    cfg["lr_decay_steps"] = args.lr_decay_steps or cfg["max_steps"]
    return cfg


def save_checkpoint(path, **state):
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: an interrupted save never leaves a half-written checkpoint


def plot_losses(metrics, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no loss plot")
        return
    steps = [m["step"] for m in metrics]
    plt.figure(figsize=(6, 4))
    plt.plot(steps, [m["train_loss"] for m in metrics], label="train")
    plt.plot(steps, [m["val_loss"] for m in metrics], label="val")
    plt.xlabel("step"), plt.ylabel("loss (nats/char)"), plt.legend(), plt.grid(alpha=0.3)
    plt.title("char_gpt.py")
    plt.savefig(path, dpi=100, bbox_inches="tight")
    plt.close()


def train(args):
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    text = load_text(args.data)
    tok = CharTokenizer(text)
    data = torch.tensor(tok.encode(text), dtype=torch.long)
    train_data, val_data = split_data(data)
    os.makedirs(args.out_dir, exist_ok=True)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    metrics_path = os.path.join(args.out_dir, "metrics.jsonl")

    ckpt = None
    if args.resume:
        if not os.path.exists(ckpt_path):
            raise SystemExit(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        cfg = dict(ckpt["config"])  # the run's own hyperparameters; only --max-steps may extend it
        if args.max_steps is not None:
            cfg["max_steps"] = args.max_steps
    else:
        cfg = make_config(args, tok.vocab_size)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)  # training batches; its state goes in the checkpoint

    model = build_model(cfg).to(device)
    optimizer = make_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device, enabled=dtype == "float16")
    step, metrics = 0, []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        step = ckpt["step"]
        torch.set_rng_state(ckpt["rng_cpu"])
        if device == "cuda" and ckpt.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"])
        gen.set_state(ckpt["rng_batches"])
        with open(metrics_path) as f:
            metrics = [json.loads(line) for line in f]
    else:
        open(metrics_path, "w").close()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"stage={cfg['stage']} preset={cfg['preset']} params={n_params:,} device={device} dtype={dtype} "
          f"layers={cfg['n_layer'] if cfg['stage'] in STAGES[4:] else '-'} heads={cfg['n_head']} n_embd={cfg['n_embd']} block={cfg['block_size']} "
          f"batch={cfg['batch_size']} steps={cfg['max_steps']}")

    compile_ = device == "cuda" if args.compile is None else args.compile
    fwd = torch.compile(model) if compile_ else model
    autocast = torch.autocast(device.split(":")[0], dtype=getattr(torch, dtype), enabled=dtype != "float32")
    B, T = cfg["batch_size"], cfg["block_size"]

    def evaluate_and_save(step, t_train, tokens):
        tr = estimate_loss(fwd, train_data, T, B, cfg["eval_iters"], device, autocast=autocast)
        va = estimate_loss(fwd, val_data, T, B, cfg["eval_iters"], device, autocast=autocast)
        m = dict(step=step, train_loss=round(tr, 4), val_loss=round(va, 4), lr=lr_at(max(step - 1, 0), cfg),
                 tokens_per_sec=round(tokens / t_train, 1) if t_train > 0 else None,
                 elapsed=round(time.time() - t0, 2))
        metrics.append(m)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(m) + "\n")
        tqdm.write(f"step {step}: train {tr:.4f} val {va:.4f} ({m['elapsed']:.0f}s)")
        save_checkpoint(ckpt_path, model=model.state_dict(), optimizer=optimizer.state_dict(),
                        scaler=scaler.state_dict(), step=step, config=cfg, chars=tok.chars,
                        rng_cpu=torch.get_rng_state(), rng_batches=gen.get_state(),
                        rng_cuda=torch.cuda.get_rng_state() if device == "cuda" else None)

    t0 = time.time()
    t_train, tokens = 0.0, 0
    model.train()
    bar = tqdm(total=cfg["max_steps"], initial=step, desc="train", mininterval=2, disable=None)
    while True:
        if (step % cfg["eval_interval"] == 0 and ckpt is None) or step == cfg["max_steps"]:
            evaluate_and_save(step, t_train, tokens)
            t_train, tokens = 0.0, 0
        ckpt = None  # only skip the evaluation we resumed at
        if step >= cfg["max_steps"]:
            break
        t = time.time()
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, cfg)
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
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    print(f"done: {step} steps in {time.time() - t0:.1f}s, val loss {metrics[-1]['val_loss']:.4f}")
    plot_losses(metrics, os.path.join(args.out_dir, "loss.png"))
    return model, tok, cfg, metrics


def load_for_sampling(out_dir, device="cpu"):
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.exists(path):
        raise SystemExit(f"no checkpoint at {path}: train first (python char_gpt.py --out-dir {out_dir})")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(ckpt["config"])
    model.load_state_dict(ckpt["model"])
    return model.to(device), CharTokenizer(ckpt["chars"]), ckpt["config"]


def sample_text(model, tok, cfg, prompt, num_chars, seed, device="cpu", temperature=1.0, top_k=None):
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = tok.encode(prompt) if prompt else [tok.stoi["\n"]]  # a newline is a natural start of text
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    out = generate(model, idx, num_chars, cfg["block_size"], temperature, top_k, gen)
    return tok.decode(out[0].tolist())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=STAGES, default="full", help="rung of the ladder (default: full)")
    p.add_argument("--preset", choices=["cpu", "gpu", "auto"], default="auto",
                   help="size of the full stage; auto = gpu with CUDA, else cpu")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="autocast dtype; auto = bfloat16 on CUDA where supported, else float32")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA only)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out-dir", default="out-char")
    p.add_argument("--data", default=DATA_PATH, help=argparse.SUPPRESS)
    p.add_argument("--resume", action="store_true", help="continue from <out-dir>/ckpt.pt exactly")
    for name, typ in (("max-steps", int), ("batch-size", int), ("eval-interval", int), ("eval-iters", int),
                      ("n-layer", int), ("n-head", int), ("n-embd", int), ("block-size", int),
                      ("dropout", float), ("lr", float), ("warmup-steps", int), ("lr-decay-steps", int),
                      ("weight-decay", float)):
        p.add_argument(f"--{name}", type=typ, default=None, help="override the stage/preset value")
    p.add_argument("--sample", action="store_true", help="only load <out-dir>/ckpt.pt and generate")
    p.add_argument("--prompt", default="", help="text to continue when sampling")
    p.add_argument("--num-chars", type=int, default=500, help="characters to generate")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.sample:
        model, tok, cfg = load_for_sampling(args.out_dir, device)
    else:
        model, tok, cfg, _ = train(args)
        print("-" * 40 + " sample")
    text = sample_text(model, tok, cfg, args.prompt, args.num_chars, args.seed, device, args.temperature, args.top_k)
    print(text)
    return text


if __name__ == "__main__":
    main()
