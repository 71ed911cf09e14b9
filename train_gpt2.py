"""
train_gpt2.py: pretraining a GPT, from a small run on a laptop CPU to the GPT-2 124M reproduction on
10B tokens of FineWeb-Edu on a node of GPUs. The model is gpt2.py's; this file is everything around it.

What it teaches, top to bottom:
  1. Data: text -> GPT-2 tokens (bpe.py) -> uint16 shards in llm.c's .bin format; FineWeb-Edu arrives
     already tokenized in the same format.
  2. The loader: the data cut into non-overlapping windows, shuffled globally with one seed, each step
     taking the next fixed block of windows, each process a disjoint slice of it. A step sees the same
     examples on 1 or 64 processes, and the whole loader state is one integer, so resuming is exact.
  3. Evaluation: validation loss, HellaSwag (pick the ending with the lowest mean token loss), a sample.
  4. The training loop: DDP across processes, gradient accumulation, mixed precision, torch.compile,
     AdamW, warmup + cosine, gradient clipping, tokens/s and MFU, atomic checkpoints and --resume.

    python train_gpt2.py --rope                          # tiny Shakespeare on a CPU (see README for time)
    python train_gpt2.py --rope --resume                 # continue from out/ckpt.pt
    python train_gpt2.py --preset gpt2-10b --rope        # GPT-2 124M, 10B tokens, one GPU
    torchrun --nproc_per_node 8 train_gpt2.py --preset gpt2-10b --rope    # the same on 8 GPUs
    python train_gpt2.py --data my_book.txt --model tiny  # any text file or folder, or a folder of shards
"""

import argparse
import hashlib
import json
import os
import random
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt2 import (GPT, HF_MODELS, PRESETS, GPTConfig, MetricsLog, add_common_args, autocast, cache_dir,
                  download, grad_scaler, load_checkpoint, load_model_state, lr_at, maybe_compile, peak_flops,
                  pick_device, pick_dtype, save_checkpoint, seed_everything)

# -----------------------------------------------------------------------------
# Runs. A preset fills in defaults; any flag given on the command line wins.

RUN_PRESETS = {
    # a few minutes on a 2-core CPU; the GPT-2 vocabulary's softmax dominates the cost of a model this small
    "shakespeare": dict(model="tiny", data="shakespeare", seq_len=128, batch_size=8, total_batch_size=1024,
                        max_steps=400, lr=3e-3, warmup_steps=30, eval_interval=100, eval_tokens=16384,
                        hellaswag_interval=0, checkpoint_interval=0, prompt="ROMEO:"),
    # GPT-2 124M on 10B tokens: 524,288 tokens (2**19) per step, 19,073 steps = one pass over the data
    "gpt2-10b": dict(model="gpt2", data="fineweb-edu-10b", seq_len=1024, batch_size=64, total_batch_size=524288,
                     max_steps=19073, lr=1.5e-3, warmup_steps=300, eval_interval=250, eval_tokens=10 * 524288,
                     hellaswag_interval=250, checkpoint_interval=2500, dtype="bfloat16", compile=True,
                     prompt="Hello, I'm a language model,"),
}

ARCH_FLAGS = [  # gpt2.GPTConfig fields a flag may override when training from scratch
    ("--n-layer", int), ("--n-head", int), ("--n-embd", int), ("--block-size", int), ("--n-kv-head", int),
    ("--vocab-size", int), ("--window", int), ("--n-sink", int), ("--dropout", float), ("--rope-base", float)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="shakespeare", choices=list(RUN_PRESETS))
    p.add_argument("--model", choices=list(PRESETS), help="architecture preset of gpt2.py (scratch init)")
    p.add_argument("--init", default="scratch", help="scratch | gpt2 | gpt2-medium | ... | HF folder | checkpoint")
    p.add_argument("--rope", dest="pos_emb", action="store_const", const="rope", help="rotary positions")
    p.add_argument("--pos-emb", choices=["learned", "sinusoidal", "rope"])
    p.add_argument("--rmsnorm", dest="norm", action="store_const", const="rmsnorm")
    p.add_argument("--swiglu", dest="mlp", action="store_const", const="swiglu")
    p.add_argument("--no-bias", dest="bias", action="store_const", const=False)
    p.add_argument("--untied", dest="tie_weights", action="store_const", const=False, help="separate lm_head")
    for flag, kind in ARCH_FLAGS:
        p.add_argument(flag, type=kind)
    p.add_argument("--data", help="shakespeare | fineweb-edu-10b | text file | folder of text | folder of .bin shards")
    p.add_argument("--batch-size", type=int, help="micro-batch per process, in sequences")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--total-batch-size", type=int, help="tokens per optimizer step, over all processes")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop (with a checkpoint) after this step without changing the schedule; --resume goes on")
    p.add_argument("--lr", type=float)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--eval-interval", type=int, help="steps between val losses (0 = none)")
    p.add_argument("--eval-tokens", type=int, help="validation tokens per evaluation")
    p.add_argument("--hellaswag-interval", type=int, help="steps between HellaSwag evals (0 = none)")
    p.add_argument("--hellaswag-file", help="a HellaSwag-format .jsonl (default: download the val set)")
    p.add_argument("--hellaswag-limit", type=int, default=0, help="evaluate only the first N examples (0 = all)")
    p.add_argument("--sample-tokens", type=int, default=100, help="tokens sampled at each eval (0 = none)")
    p.add_argument("--prompt")
    p.add_argument("--checkpoint-interval", type=int, help="steps between checkpoints (0 = only at the end)")
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--out-dir", default="out")
    p.add_argument("--resume", action="store_true", help="continue from <out-dir>/ckpt.pt")
    p.add_argument("--wandb", action="store_true")
    p.add_argument("--wandb-project", default="llm-from-scratch")
    p.add_argument("--tensorboard", action="store_true")
    add_common_args(p)
    first, _ = p.parse_known_args(argv)
    p.set_defaults(**RUN_PRESETS[first.preset])
    return p.parse_args(argv)


def fail(msg):
    raise SystemExit(f"train_gpt2.py: error: {msg}")


def check_args(args, world):
    """Everything that can be wrong with the flags, found before any data is read or any weight made."""
    for name in ("batch_size", "seq_len", "total_batch_size", "max_steps"):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive")
    per_micro = args.batch_size * args.seq_len * world
    if args.total_batch_size % per_micro:
        fail(f"--total-batch-size {args.total_batch_size} is not a multiple of --batch-size x --seq-len x "
             f"processes = {args.batch_size} x {args.seq_len} x {world} = {per_micro}; pick a total batch that "
             f"is, e.g. {max(1, round(args.total_batch_size / per_micro)) * per_micro}")
    if args.resume and args.init != "scratch":
        fail("--resume continues a run from its checkpoint; it cannot be combined with --init")
    ckpt = os.path.join(args.out_dir, "ckpt.pt")
    if args.resume and not os.path.exists(ckpt):
        fail(f"--resume: no checkpoint at {ckpt}; run without --resume to start, or point --out-dir at the run")
    if args.init not in ("scratch", *HF_MODELS) and not os.path.exists(args.init):
        fail(f"--init {args.init!r}: not scratch, not one of {', '.join(HF_MODELS)}, and no such file or folder")
    for flag, enabled in (("--wandb", args.wandb), ("--tensorboard", args.tensorboard)):
        module = "wandb" if flag == "--wandb" else "torch.utils.tensorboard"
        if enabled:
            try:
                __import__(module)
            except ImportError:
                fail(f"{flag} needs the {module.split('.')[-1]} package: pip install {module.split('.')[-1]}")


def model_config(args):
    """The config of the model to train, known before anything is built or downloaded."""
    if args.resume:  # the checkpoint defines the model; architecture flags are ignored
        path = os.path.join(args.out_dir, "ckpt.pt")
        return GPTConfig(**load_checkpoint(path)["config"]), path
    arch = {k: getattr(args, k) for k in ("pos_emb", "norm", "mlp", "bias", "tie_weights",
                                          *(f[2:].replace("-", "_") for f, _ in ARCH_FLAGS))}
    arch = {k: v for k, v in arch.items() if v is not None}
    if args.init == "scratch":
        return GPTConfig.from_preset(args.model, **arch), None
    if set(arch) - {"dropout"}:
        fail(f"architecture flags ({', '.join(sorted(set(arch) - {'dropout'}))}) only apply to --init scratch; "
             f"pretrained weights fix the architecture")
    if os.path.isfile(args.init):
        return GPTConfig(**{**load_checkpoint(args.init)["config"], **arch}), args.init
    if os.path.isdir(args.init):
        with open(os.path.join(args.init, "config.json")) as f:
            return GPTConfig(block_size=json.load(f)["n_positions"]), args.init
    return GPTConfig.from_preset(args.init), args.init  # HF GPT-2 sizes share our preset names


# -----------------------------------------------------------------------------
# Data: token shards in llm.c's format: a header of 256 int32 (magic 20240520, version 1, token count),
# then the tokens as uint16 (the GPT-2 vocabulary, 50,257 ids, fits in 16 bits).

SHARD_MAGIC, SHARD_VERSION, HEADER_BYTES = 20240520, 1, 256 * 4
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
# Karpathy's GPT-2 tokens of FineWeb-Edu (the 100B sample), 100M tokens per shard: the first 100 train
# shards are 10B tokens. Not reachable from the machine this was written on: unverified here.
FINEWEB_URL = ("https://huggingface.co/datasets/karpathy/fineweb-edu-100B-gpt2-token-shards/resolve/main/"
               "edu_fineweb_{split}_{i:06d}.bin")
REMOTE_SETS = {"fineweb-edu-10b": dict(train=range(1, 101), val=range(0, 1), url=FINEWEB_URL)}


def write_shard(path, tokens):
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2 ** 16):
        raise ValueError(f"token ids must fit in uint16 to be written to {path}")
    if len(tokens) >= 2 ** 31:
        raise ValueError(f"{len(tokens):,} tokens do not fit one shard's int32 count; split them")
    header = np.zeros(256, dtype=np.int32)
    header[:3] = SHARD_MAGIC, SHARD_VERSION, len(tokens)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint16).tobytes())
    os.replace(tmp, path)


def read_shard(path):
    """The tokens of a shard, memory-mapped; checked against the header so a truncated download is caught."""
    size = os.path.getsize(path)
    header = np.fromfile(path, dtype=np.int32, count=256) if size >= HEADER_BYTES else None
    if header is None or header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise ValueError(f"{path} is not a token shard (llm.c .bin: magic {SHARD_MAGIC}, version {SHARD_VERSION})")
    n = int(header[2])
    if size != HEADER_BYTES + 2 * n:
        raise ValueError(f"{path} is truncated or corrupt: its header says {n} tokens, the file holds "
                         f"{(size - HEADER_BYTES) // 2}; delete it and download / tokenize again")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES, shape=(n,))


def fetch_remote(name):
    """Download a named pre-tokenized set (resumable), verifying every shard against its header."""
    spec, root = REMOTE_SETS[name], cache_dir(name)
    files = {"train": [], "val": []}
    for split in files:
        for i in spec[split]:
            url = spec["url"].format(split=split, i=i)
            path = os.path.join(root, os.path.basename(url))
            if not os.path.exists(path):
                download(url, path, desc=f"{name} {split} {i}")
            try:
                read_shard(path)
            except ValueError as e:
                os.remove(path)  # so the next run fetches it again instead of failing the same way
                raise ValueError(f"{e} (removed; run again to download it again)") from e
            files[split].append(path)
    return files["train"], files["val"]


def tokenize_text(source):
    """A text file or a folder of .txt files -> GPT-2 token shards cached next to the input, the last 10%
    of the tokens held out for validation. The file names carry a hash of the inputs' names, sizes and
    modification times, so an edited input is tokenized again."""
    texts = sorted(os.path.join(source, f) for f in os.listdir(source) if f.endswith(".txt")) \
        if os.path.isdir(source) else [source]
    if not texts:
        raise ValueError(f"{source} holds neither .txt files nor .bin token shards")
    out = source.rstrip(os.sep).removesuffix(".txt") + "_gpt2"
    stamp = json.dumps([[os.path.basename(t), os.path.getsize(t), os.path.getmtime(t)] for t in texts])
    tag = hashlib.sha1(stamp.encode()).hexdigest()[:10]
    train, val = os.path.join(out, f"train_{tag}.bin"), os.path.join(out, f"val_{tag}.bin")
    if os.path.exists(train) and os.path.exists(val):
        return [train], [val]
    import bpe
    tok = bpe.load_gpt2()
    os.makedirs(out, exist_ok=True)
    for old in os.listdir(out):  # shards of an older version of the input
        if old.endswith(".bin"):
            os.remove(os.path.join(out, old))
    parts = []
    for i, t in enumerate(texts):  # in parallel over all cores; each file, and each document in it marked
        raw = os.path.join(out, f"raw_{i}.bin")  # by a literal <|endoftext|>, ends with the end-of-text token
        bpe.encode_file(tok, t, raw, append_eot=True, allowed_special={"<|endoftext|>"})
        parts.append(np.array(bpe.load_tokens(raw)))
        os.remove(raw)
    tokens = np.concatenate(parts)
    split = int(len(tokens) * 0.9)
    write_shard(val, tokens[split:])
    write_shard(train, tokens[:split])  # written last: its presence marks a complete tokenization
    return [train], [val]


def resolve_data(data, rank):
    """--data -> (train shard paths, val shard paths). `rank` is the process's rank on its node: local
    rank 0 downloads or tokenizes (once per node, whether or not nodes share a file system), the rest wait."""
    if data == "shakespeare":
        data = os.path.join(DATA_DIR, "tinyshakespeare.txt")
    if data in REMOTE_SETS:
        if rank == 0:
            fetch_remote(data)
        barrier()
        return fetch_remote(data)
    if not os.path.exists(data):
        raise ValueError(f"--data {data!r}: no such file or folder, and not one of shakespeare, "
                         f"{', '.join(REMOTE_SETS)}")
    shards = sorted(os.path.join(data, f) for f in os.listdir(data) if f.endswith(".bin")) \
        if os.path.isdir(data) else []
    if shards:  # llm.c naming: *_val_* shards are the validation split, the rest train
        val = [s for s in shards if "val" in os.path.basename(s)]
        train = [s for s in shards if s not in val]
        if not val or not train:
            raise ValueError(f"{data}: need both train and validation shards (validation files have 'val' "
                             f"in their name); found {len(train)} train and {len(val)} val")
        return train, val
    if rank == 0:
        tokenize_text(data)
    barrier()
    return tokenize_text(data)


def unigram_entropy(shards, limit=10_000_000):
    """Entropy (nats) of the token frequencies: the loss of the best model that ignores context."""
    counts = np.zeros(2 ** 16, dtype=np.int64)
    for s in shards:
        chunk = np.asarray(s[:limit - counts.sum()])
        counts += np.bincount(chunk, minlength=2 ** 16)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# -----------------------------------------------------------------------------
# The loader


class WindowLoader:
    """All shards cut into non-overlapping windows of seq_len + 1 tokens (inputs and shifted targets).
    Training reads window `perm_epoch[i]` for the i-th window it consumes, with a fresh permutation of all
    windows each epoch drawn from (seed, epoch), so it never runs dry and every process agrees on the order.
    The windows of optimizer step s are the next total_batch_size / seq_len of that stream; micro-step m of
    process r takes the slice (m * world + r), so the step's examples do not depend on how many processes
    share it. `pos` (windows consumed) is the entire state a checkpoint needs."""

    def __init__(self, files, seq_len, seed=0, shuffle=True):
        self.shards = [read_shard(f) for f in files]
        self.T, self.seed, self.shuffle, self.pos = seq_len, seed, shuffle, 0
        self.starts = np.cumsum([0] + [(len(s) - 1) // seq_len for s in self.shards])
        self.n = int(self.starts[-1])
        if self.n == 0:
            raise ValueError(f"{files[0]}...: fewer than seq_len + 1 = {seq_len + 1} tokens; use a smaller --seq-len")
        self._perms = {}

    def order(self, epoch):
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}  # keep the last two
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n) \
                if self.shuffle else np.arange(self.n)
        return self._perms[epoch]

    def windows(self, indices):
        """Stream positions -> (x, y) int64 tensors of shape (len(indices), seq_len)."""
        rows = []
        for g in indices:
            epoch, i = divmod(int(g), self.n)
            w = int(self.order(epoch)[i])
            s = int(np.searchsorted(self.starts, w, side="right")) - 1
            off = (w - int(self.starts[s])) * self.T
            rows.append(self.shards[s][off:off + self.T + 1])
        buf = torch.from_numpy(np.stack(rows).astype(np.int64))
        return buf[:, :-1], buf[:, 1:]

    def micro_batch(self, micro, rank, world, batch_size):
        first = self.pos + (micro * world + rank) * batch_size
        return self.windows(range(first, first + batch_size))


def to_device(x, device):
    return x.pin_memory().to(device, non_blocking=True) if device.startswith("cuda") else x.to(device)


# -----------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def val_loss(model, loader, n_windows, batch_size, device, dtype, rank, world):
    """Mean loss over the first n_windows validation windows, windows split round-robin over processes."""
    model.eval()
    mine = list(range(rank, min(n_windows, loader.n), world))
    total = torch.zeros(2, device=device, dtype=torch.float64)  # loss sum, windows
    for i in range(0, len(mine), batch_size):
        x, y = loader.windows(mine[i:i + batch_size])
        with autocast(device, dtype):
            _, loss = model(to_device(x, device), to_device(y, device))
        total += torch.tensor([loss.item() * len(x), len(x)], device=device, dtype=torch.float64)
    all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"


def hellaswag_examples(path):
    examples = [json.loads(line) for line in open(path) if line.strip()]
    for i, ex in enumerate(examples):
        if not {"ctx", "endings", "label"} <= set(ex) or len(ex["endings"]) != 4:
            raise ValueError(f"{path} line {i + 1}: a HellaSwag example needs ctx, 4 endings and label")
    return examples


def render_hellaswag(ex, encode, block_size):
    """(4, L) tokens of context + each ending (right-padded), a mask of the ending tokens, the label.
    Contexts too long for the model lose their oldest tokens."""
    ctx = encode(ex["ctx"])
    rows, masks = [], []
    for ending in ex["endings"]:
        end = encode(" " + ending)  # GPT-2 tokens carry their leading space
        row = (ctx + end)[-block_size:]
        n = min(len(end), len(row) - 1)  # a row's first token has nothing before it to predict it
        rows.append(row)
        masks.append([0] * (len(row) - n) + [1] * n)
    L = max(len(r) for r in rows)
    tokens = torch.tensor([r + [0] * (L - len(r)) for r in rows])
    mask = torch.tensor([m + [0] * (L - len(m)) for m in masks])
    return tokens, mask, int(ex["label"])


@torch.no_grad()
def ending_losses(model, tokens, mask, device, dtype):
    """Mean cross-entropy of each row's ending tokens given everything before them."""
    tokens, mask = tokens.to(device), mask.to(device)
    with autocast(device, dtype):
        logits, _ = model(tokens)
    losses = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), tokens[:, 1:].flatten(),
                             reduction="none").view(tokens.size(0), -1)
    m = mask[:, 1:].float()
    return (losses * m).sum(1) / m.sum(1)


def hellaswag(model, examples, encode, device, dtype, rank, world):
    """acc_norm as in lm-eval: the ending with the lowest mean token loss wins. Examples round-robin over
    processes; the uncompiled model, since every example has its own length."""
    model.eval()
    score = torch.zeros(2, device=device, dtype=torch.float64)
    for ex in examples[rank::world]:
        tokens, mask, label = render_hellaswag(ex, encode, model.config.block_size)
        score += torch.tensor([int(ending_losses(model, tokens, mask, device, dtype).argmin()) == label, 1],
                              device=device, dtype=torch.float64)
    all_reduce(score)
    model.train()
    return (score[0] / score[1]).item()


@torch.no_grad()
def sample(model, encode, decode, prompt, n_tokens, device, seed, top_k=50):
    """Top-k sampling with the KV cache, from its own generator so training's random state is untouched."""
    model.eval()
    g = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([encode(prompt)], device=device)
    cache = model.new_cache(1)
    logits, _ = model(idx, cache=cache, last_logits_only=True)
    out = []
    for _ in range(min(n_tokens, model.config.block_size - idx.size(1))):
        probs, ids = F.softmax(logits[:, -1].float(), dim=-1).topk(top_k)
        nxt = ids.gather(-1, torch.multinomial(probs, 1, generator=g))
        out.append(int(nxt))
        logits, _ = model(nxt, cache=cache)
    model.train()
    return prompt + decode(out)


# -----------------------------------------------------------------------------
# Distributed helpers: no-ops in a single process


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce(t, op=None):
    if dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def rng_state():
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    np_state = np.random.get_state()  # weights_only loading refuses numpy arrays: store a list
    state["numpy"] = (np_state[0], np_state[1].tolist(), *np_state[2:])
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    np.random.set_state((state["numpy"][0], np.array(state["numpy"][1], dtype=np.uint32), *state["numpy"][2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -----------------------------------------------------------------------------
# Training


def main(argv=None):
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    check_args(args, world)
    try:
        config, init_path = model_config(args)
        if args.seq_len > config.block_size and (config.window is None or config.pos_emb == "learned"):
            fail(f"--seq-len {args.seq_len} is longer than the model's context (block_size {config.block_size}); "
                 f"lower --seq-len" + (" or raise --block-size" if args.init == "scratch" else ""))
        device = pick_device(args.device)
        dtype = pick_dtype(args.dtype, device)
    except (ValueError, FileNotFoundError) as e:
        fail(e)

    ddp = "RANK" in os.environ
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if ddp:  # torchrun set RANK, LOCAL_RANK, WORLD_SIZE and the rendezvous address; works across nodes too
        if device == "cuda":
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    master = rank == 0
    log = (lambda *a: print(*a, flush=True)) if master else (lambda *a: None)
    try:
        train_files, val_files = resolve_data(args.data, local_rank)
        train_loader = WindowLoader(train_files, args.seq_len, args.seed)
        val_loader = WindowLoader(val_files, args.seq_len, shuffle=False)
        hs_examples = None
        if args.hellaswag_interval:
            path = args.hellaswag_file or os.path.join(cache_dir("hellaswag"), "hellaswag_val.jsonl")
            if local_rank == 0 and not os.path.exists(path):
                download(HELLASWAG_URL, path)
            barrier()
            hs_examples = hellaswag_examples(path)[:args.hellaswag_limit or None]
    except (ValueError, RuntimeError) as e:
        fail(e)
    windows_per_step = args.total_batch_size // args.seq_len
    if windows_per_step > train_loader.n:
        fail(f"a step needs {windows_per_step} windows of {args.seq_len} tokens but the training data has "
             f"only {train_loader.n}; lower --total-batch-size")
    grad_accum = args.total_batch_size // (args.batch_size * args.seq_len * world)
    tokenizer = None
    if (args.sample_tokens and args.eval_interval) or hs_examples:
        import bpe
        tokenizer = bpe.load_gpt2()

    # the model: identical initial weights on every rank (same seed); DDP also broadcasts rank 0's
    seed_everything(args.seed)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.init == "scratch" or args.resume or os.path.isfile(args.init):
        raw_model = GPT(config)
    else:  # OpenAI's weights from the HF hub, or an HF directory
        raw_model = GPT.from_pretrained(args.init, **({"dropout": args.dropout} if args.dropout else {}))
    raw_model.to(device)
    optimizer = raw_model.configure_optimizer(args.weight_decay, args.lr, (0.9, 0.95), device.split(":")[0])
    scaler = grad_scaler(device, dtype)
    step = 0
    if args.resume:
        ckpt = load_checkpoint(init_path, map_location=device)
        saved = ckpt["args"]
        for key in ("seq_len", "total_batch_size", "seed", "data"):
            if saved[key] != getattr(args, key):
                fail(f"--resume: --{key.replace('_', '-')} is {getattr(args, key)!r} but the checkpoint was "
                     f"trained with {saved[key]!r}; use the same value or start a new --out-dir")
        if ckpt["loader"]["n"] != train_loader.n:
            fail(f"--resume: the training data changed since the checkpoint ({ckpt['loader']['n']} windows "
                 f"then, {train_loader.n} now)")
        load_model_state(raw_model, ckpt["model"], init_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        step, train_loader.pos = ckpt["step"], ckpt["loader"]["pos"]
        rngs = ckpt["rng"]
        if len(rngs) == world:
            set_rng_state(rngs[rank])
        else:  # another process count: exact data order still, but dropout masks differ from the original
            seed_everything(args.seed + rank + step)
        log(f"resumed from {init_path} at step {step}")
    elif init_path and os.path.isfile(init_path):
        load_model_state(raw_model, load_checkpoint(init_path)["model"], init_path)
    model = maybe_compile(raw_model, args.compile)
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device.startswith("cuda") else None)

    metrics = MetricsLog(args.out_dir, resume_step=step if args.resume else None) if master else None
    trackers = []
    if master and args.wandb:
        import wandb
        trackers.append(lambda row: wandb.log(row, step=row["step"]))
        wandb.init(project=args.wandb_project, config=vars(args), dir=args.out_dir)
    if master and args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        tb = SummaryWriter(os.path.join(args.out_dir, "tensorboard"))
        trackers.append(lambda row: [tb.add_scalar(k, v, row["step"]) for k, v in row.items() if k != "step"])

    def record(**row):
        if master:
            metrics.log(**row)
            for t in trackers:
                t(row)

    n_params = raw_model.num_params()
    flops_per_step = raw_model.flops_per_token(args.seq_len) * args.total_batch_size
    peak = peak_flops(device)
    log(f"model {n_params / 1e6:.2f}M params ({config.n_layer} layers, {config.n_embd} wide, {config.pos_emb} "
        f"positions) | device {device} {str(dtype).removeprefix('torch.')} x {world} process(es)"
        f"{' | compiled' if args.compile else ''}")
    log(f"data {sum(len(s) for s in train_loader.shards):,} train tokens ({train_loader.n:,} windows), "
        f"{sum(len(s) for s in val_loader.shards):,} val | unigram entropy "
        f"{unigram_entropy(train_loader.shards):.3f} nats (the loss of a model that ignores context)")
    log(f"{args.total_batch_size:,} tokens per step = {args.batch_size} x {args.seq_len} x {world} processes x "
        f"{grad_accum} accumulation steps | {args.max_steps} steps")

    def due(every, done):
        return every and (done % every == 0 or done == args.max_steps)

    def evaluate(done):
        row = {}
        if due(args.eval_interval, done):
            row["val_loss"] = val_loss(model, val_loader, args.eval_tokens // args.seq_len, args.batch_size,
                                       device, dtype, rank, world)
        if hs_examples and due(args.hellaswag_interval, done):
            row["hellaswag"] = hellaswag(raw_model, hs_examples, tokenizer.encode, device, dtype, rank, world)
        if row:
            log(f"step {done:5d} | " + " | ".join(f"{k} {v:.4f}" for k, v in row.items()))
            record(step=done, **row)
        if "val_loss" in row and master and tokenizer and args.sample_tokens:
            log(sample(raw_model, tokenizer.encode, tokenizer.decode, args.prompt, args.sample_tokens, device,
                       args.seed + done).strip() + "\n")

    def checkpoint(done):
        rngs = [None] * world
        if ddp:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if master:
            save_checkpoint(os.path.join(args.out_dir, "ckpt.pt"), raw_model, optimizer=optimizer.state_dict(),
                            scaler=scaler.state_dict(), step=done, rng=rngs, args=vars(args),
                            loader={"pos": train_loader.pos, "n": train_loader.n})

    if step == 0:
        evaluate(0)
    start_time, t_last = time.time(), time.time()
    stop = min(args.max_steps, args.stop_after or args.max_steps)
    while step < stop:
        loss_sum = torch.zeros((), device=device)
        for micro in range(grad_accum):
            x, y = train_loader.micro_batch(micro, rank, world, args.batch_size)
            # gradients are all-reduced only on the last micro-step; before that they just accumulate
            sync = nullcontext() if not ddp or micro == grad_accum - 1 else model.no_sync()
            with sync:
                with autocast(device, dtype):
                    _, loss = model(to_device(x, device), to_device(y, device))
                loss = loss / grad_accum  # the mean over the step's sequences, not the sum
                loss_sum += loss.detach()
                scaler.scale(loss).backward()
        train_loader.pos += windows_per_step
        all_reduce(loss_sum)
        loss_sum /= world
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
        lr = lr_at(step, args.lr, args.warmup_steps, args.max_steps, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        train_loss = loss_sum.item()  # waits for the GPU, so the time below is real
        now = time.time()
        dt, t_last = now - t_last, now
        tps = args.total_batch_size / dt
        mfu = flops_per_step / dt / (peak * world) if peak else None
        record(step=step, train_loss=train_loss, lr=lr, grad_norm=norm.item(), tokens_per_sec=tps,
               **({"mfu": mfu} if mfu is not None else {}))
        if step % args.log_interval == 0 or step == stop:
            log(f"step {step:5d} | loss {train_loss:.4f} | lr {lr:.2e} | norm {norm.item():.2f} | "
                f"{dt * 1000:.0f} ms | {tps:,.0f} tok/s" + (f" | mfu {mfu:.1%}" if mfu is not None else ""))
        if due(args.eval_interval, step) or due(args.hellaswag_interval, step):
            evaluate(step)
            t_last = time.time()  # evaluation is not training time
        if (args.checkpoint_interval and step % args.checkpoint_interval == 0) or step == stop:
            checkpoint(step)
            t_last = time.time()
    log(f"{'stopped' if step < args.max_steps else 'done'} at step {step} in {time.time() - start_time:.0f} s; "
        f"checkpoint {os.path.join(args.out_dir, 'ckpt.pt')}")
    if master and (plot := metrics.plot(title=f"train_gpt2 {args.preset}")):
        log(f"loss plot {plot}")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
