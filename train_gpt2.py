"""
train_gpt2.py: pretraining a GPT, from a small run on a laptop CPU to the GPT-2 124M reproduction on
10B tokens of FineWeb-Edu on a node of GPUs. The model is gpt2.py's; this file is everything around it.

What it teaches, top to bottom:
  1. Processes: one per GPU under torchrun (DDP), or a single plain process; rank 0 logs and saves.
  2. Tokenizer and model: GPT-2's BPE, raw bytes, or any bpe.py tokenizer; a new model's vocabulary
     follows the tokenizer, and every checkpoint records the tokenizer so later stages encode the same way.
  3. Data: text -> tokens (bpe.py) -> uint16 shards in llm.c's .bin format, cached per tokenizer;
     FineWeb-Edu arrives already tokenized (GPT-2) in the same format.
  4. The loader: the data cut into non-overlapping windows, shuffled globally with one seed, each step
     taking the next fixed block of windows, each process a disjoint slice of it. A step sees the same
     examples on 1 or 64 processes, and the whole loader state is one integer, so resuming is exact,
     even with another number of processes.
  5. Evaluation: validation loss, HellaSwag (pick the ending with the lowest mean token loss), a sample.
  6. The training loop: gradient accumulation, mixed precision, torch.compile, AdamW, warmup + cosine,
     gradient clipping, tokens/s and MFU, atomic checkpoints and --resume.

    python train_gpt2.py --rope                          # tiny Shakespeare on a CPU (see README for time)
    python train_gpt2.py --rope --resume                 # continue from out/ckpt.pt
    python train_gpt2.py --preset task                   # the post-training pipeline's base model (sft.py)
    python train_gpt2.py --preset task-columns           # the same, its answers worked column by column
    python train_gpt2.py --preset gpt2-10b --rope        # GPT-2 124M, 10B tokens, one GPU
    torchrun --nproc_per_node 8 train_gpt2.py --preset gpt2-10b --rope    # the same on 8 GPUs
    python train_gpt2.py --data my_book.txt --model tiny  # any text file or folder, or a folder of shards
    python train_gpt2.py --rope --tokenizer bytes        # byte-level tokens: a 320-entry vocabulary
    python train_gpt2.py --rope --tokenizer tok.bpe      # a tokenizer trained with `python bpe.py train`
"""

import argparse
import hashlib
import json
import os
import random
import tempfile
import time
from collections import namedtuple
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import bpe
from gpt2 import (GPT, HF_MODELS, PRESETS, GPTConfig, MetricsLog, add_common_args, autocast, cache_dir, download,
                  end_distributed, given_flags, grad_scaler, hf_model_type, restore_scaler, load_checkpoint,
                  load_model_state, lr_at, warmup_note, maybe_compile, peak_flops, pick_device, pick_dtype,
                  save_checkpoint, seed_everything, rng_state as torch_rng_state,
                  set_rng_state as set_torch_rng_state)

# -----------------------------------------------------------------------------
# Runs. A preset fills in defaults; any flag given on the command line wins.

# the base model of the post-training pipeline (sft.py and after): bpe.py's arithmetic task, byte tokens
TASK_RUN = dict(model="tiny", data="task", tokenizer="bytes", pos_emb="rope", n_layer=4, n_head=4, n_embd=128,
                block_size=256, seq_len=128, batch_size=32, total_batch_size=4096, max_steps=1500, lr=3e-3,
                warmup_steps=50, eval_interval=250, eval_tokens=16384, hellaswag_interval=0, checkpoint_interval=0,
                prompt="Q: What is 12 + 7?\nA:", out_dir="out/task-base")
RUN_PRESETS = {
    # a few minutes on a 2-core CPU; the GPT-2 vocabulary's softmax dominates the cost of a model this small
    "shakespeare": dict(model="tiny", data="shakespeare", seq_len=128, batch_size=8, total_batch_size=1024,
                        max_steps=400, lr=3e-3, warmup_steps=30, eval_interval=100, eval_tokens=16384,
                        hellaswag_interval=0, checkpoint_interval=0, prompt="ROMEO:"),
    "task": TASK_RUN,
    # the same on the task whose answers are worked column by column (bpe.py's worked="columns")
    "task-columns": {**TASK_RUN, "data": "task-columns", "out_dir": "out/task-columns-base"},
    # GPT-2 124M on 10B tokens: 524,288 tokens (2**19) per step, 19,073 steps = one pass over the data
    "gpt2-10b": dict(model="gpt2", data="fineweb-edu-10b", seq_len=1024, batch_size=64, total_batch_size=524288,
                     max_steps=19073, lr=1.5e-3, warmup_steps=300, eval_interval=250, eval_tokens=10 * 524288,
                     hellaswag_interval=250, checkpoint_interval=2500, dtype="bfloat16", compile=True,
                     prompt="Hello, I'm a language model,"),
}

ARCH_FLAGS = [  # gpt2.GPTConfig fields a flag may override when training from scratch
    ("--n-layer", int, "transformer blocks"), ("--n-head", int, "attention heads"),
    ("--n-embd", int, "width of the residual stream"), ("--block-size", int, "longest context the model takes"),
    ("--n-kv-head", int, "key/value heads: fewer than --n-head is grouped-query attention, 1 multi-query"),
    ("--vocab-size", int, "embedding rows (default: the tokenizer's ids rounded up to a multiple of 64)"),
    ("--window", int, "sliding-window attention: each token sees the last N tokens"),
    ("--n-sink", int, "with --window: the first N tokens stay visible (attention sinks)"),
    ("--dropout", float, "dropout probability (also applies to --init weights)"),
    ("--rope-base", float, "rotary base frequency (with --rope)")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--preset", default="shakespeare", choices=list(RUN_PRESETS),
                   help="the run's defaults (model, data, batch, schedule, evaluations); flags given win")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=list(PRESETS), help="gpt2.py architecture preset (training from scratch)")
    g.add_argument("--init", default="scratch",
                   help="scratch | gpt2 | gpt2-medium | gpt2-large | gpt2-xl (OpenAI's weights) | HF folder | checkpoint")
    g.add_argument("--tokenizer", help="gpt2 | bytes | a file written by bpe.Tokenizer.save (default: gpt2 from "
                                       "scratch; with --resume or --init, the tokenizer the checkpoint records)")
    g.add_argument("--rope", dest="pos_emb", action="store_const", const="rope", help="rotary positions")
    g.add_argument("--pos-emb", choices=["learned", "sinusoidal", "rope"], help="positions (default learned)")
    g.add_argument("--rmsnorm", dest="norm", action="store_const", const="rmsnorm", help="RMSNorm, not LayerNorm")
    g.add_argument("--swiglu", dest="mlp", action="store_const", const="swiglu", help="SwiGLU MLP, not GELU")
    g.add_argument("--no-bias", dest="bias", action="store_const", const=False, help="no biases (linear, norm)")
    g.add_argument("--untied", dest="tie_weights", action="store_const", const=False,
                   help="an lm_head of its own instead of the token embedding")
    for flag, kind, text in ARCH_FLAGS:
        g.add_argument(flag, type=kind, help=text)
    g = p.add_argument_group("data")
    g.add_argument("--data", help="shakespeare | task | task-columns (bpe.py's arithmetic task) | fineweb-edu-10b | "
                                 "text file | folder of text | folder of .bin shards")
    g.add_argument("--seq-len", type=int, help="tokens per training sequence")
    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, help="micro-batch per process, in sequences")
    g.add_argument("--total-batch-size", type=int, help="tokens per optimizer step, over all processes; the rest "
                                                        "is made up by gradient accumulation")
    g.add_argument("--max-steps", type=int, help="optimizer steps of the whole run (the schedule ends here)")
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final learning rate / peak (cosine decay)")
    g.add_argument("--warmup-steps", type=int, help="steps of linear warmup")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (matrices only)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient's global norm to this (0 = off)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-interval", type=int, help="steps between val losses (0 = none)")
    g.add_argument("--eval-tokens", type=int, help="validation tokens per evaluation")
    g.add_argument("--hellaswag-interval", type=int, help="steps between HellaSwag evals (0 = none)")
    g.add_argument("--hellaswag-file", help="a HellaSwag-format .jsonl (default: download the val set)")
    g.add_argument("--hellaswag-limit", type=int, default=0, help="evaluate only the first N examples (0 = all)")
    g.add_argument("--sample-tokens", type=int, default=100, help="tokens sampled at each val loss (0 = none)")
    g.add_argument("--prompt", help="the start of each sample")
    g = p.add_argument_group("checkpointing")
    g.add_argument("--out-dir", default="out", help="where ckpt.pt, metrics.jsonl and loss.png go")
    g.add_argument("--checkpoint-interval", type=int, help="steps between checkpoints (0 = only at the end)")
    g.add_argument("--resume", action="store_true", help="continue from <out-dir>/ckpt.pt")
    g.add_argument("--stop-after", type=int, default=None,
                   help="stop (with a checkpoint) after this step without changing the schedule; --resume goes on")
    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=10, help="steps between printed lines and smoothed losses")
    g.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (pip install wandb)")
    g.add_argument("--wandb-project", default="llm-from-scratch", help="the wandb project")
    g.add_argument("--tensorboard", action="store_true", help="also log to <out-dir>/tensorboard")
    add_common_args(p.add_argument_group("system"))
    first, _ = p.parse_known_args(argv)
    p.set_defaults(**RUN_PRESETS[first.preset])
    return p.parse_args(argv)


def fail(msg):
    raise SystemExit(f"train_gpt2.py: error: {msg}")


def check_args(args, world):
    """Everything that can be wrong with the flags, found before any data is read or any weight made."""
    for name in ("batch_size", "seq_len", "total_batch_size", "max_steps", "log_interval"):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive")
    for name in ("warmup_steps", "grad_clip", "eval_interval", "hellaswag_interval", "checkpoint_interval",
                 "sample_tokens", "hellaswag_limit", "min_lr_ratio"):  # 0 = off; a negative clip (or final
        # learning rate) would reverse the gradient
        if getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} must be >= 0 (0 = off), got {getattr(args, name)}")
    if not args.lr > 0:
        fail(f"--lr must be above 0, got {args.lr}")
    if args.min_lr_ratio > 1:  # the cosine would climb from --lr to above it
        fail(f"--min-lr-ratio must be at most 1 (the final / peak learning rate), got {args.min_lr_ratio}")
    if note := warmup_note(args.warmup_steps, args.max_steps):
        log(note)
    if args.stop_after is not None and args.stop_after < 1:  # 0 ran the whole schedule
        fail(f"--stop-after must be a step >= 1, got {args.stop_after}")
    per_micro = args.batch_size * args.seq_len * world
    if args.total_batch_size % per_micro:
        fail(f"--total-batch-size {args.total_batch_size} is not a multiple of --batch-size x --seq-len x "
             f"processes = {args.batch_size} x {args.seq_len} x {world} = {per_micro}; pick a total batch that "
             f"is, e.g. {max(1, round(args.total_batch_size / per_micro)) * per_micro}")
    if args.eval_interval and args.eval_tokens < args.seq_len * world:  # a process with no window would hang DDP
        fail(f"--eval-tokens {args.eval_tokens} gives some of the {world} process(es) no validation window of "
             f"--seq-len {args.seq_len}; give at least {args.seq_len * world}")
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


# -----------------------------------------------------------------------------
# Processes: torchrun starts one per GPU; in a single process barrier and all_reduce do nothing.


@dataclass
class Proc:
    """This process's place in the run: its rank among `world` processes (rank 0 logs and saves), its
    rank on its node (which GPU it drives) and its device."""
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def master(self):
        return self.rank == 0

    @property
    def ddp(self):
        return dist.is_initialized()


def setup_distributed(device):
    """Join the process group when torchrun started us (it sets RANK, LOCAL_RANK, WORLD_SIZE and the
    rendezvous address, on one node or many): NCCL between GPUs, gloo between CPUs. A plain
    `python train_gpt2.py` is process 0 of 1."""
    if "RANK" not in os.environ:
        return Proc(device=device)
    local_rank = int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Proc(int(os.environ["RANK"]), local_rank, int(os.environ["WORLD_SIZE"]), device)


def log(*parts):
    """print, on rank 0 only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*parts, flush=True)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce(t, op=None):
    if dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def rng_state():
    """Python's, NumPy's and torch's generators (gpt2.rng_state: the CPU's, and the GPU's in use)."""
    np_state = np.random.get_state()  # weights_only loading refuses numpy arrays: store a list
    return {"python": random.getstate(), "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
            "torch": torch_rng_state()}


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state((state["numpy"][0], np.array(state["numpy"][1], dtype=np.uint32), *state["numpy"][2:]))
    torch_state = state["torch"]
    if torch.is_tensor(torch_state):  # older checkpoints: the CPU's state here, CUDA's beside it
        torch_state = {"cpu": torch_state, **({"cuda": state["cuda"]} if "cuda" in state else {})}
    set_torch_rng_state(torch_state)


# -----------------------------------------------------------------------------
# Tokenizer and model config: both fixed before any data is read, so that bad flags fail at once.


def load_tokenizer(spec):
    """--tokenizer -> a bpe.Tokenizer: "gpt2" (OpenAI's 50,257 ids), "bytes" (no merges: the 256 bytes,
    split with GPT-2's pattern, plus <|endoftext|> = 256), or the path of a file bpe.Tokenizer.save wrote.
    load_tokenizer("bytes").encode("hi") -> [104, 105]"""
    if spec == "gpt2":
        return bpe.load_gpt2()
    if spec == "bytes":
        return bpe.byte_tokenizer()
    if not os.path.isfile(spec):
        raise ValueError(f"--tokenizer {spec!r}: not gpt2, not bytes, and no such file; give a file written by "
                         f"bpe.Tokenizer.save (python bpe.py train ...)")
    return bpe.Tokenizer.load(spec)


def start_checkpoint(args):
    """(checkpoint, path) the run starts from: <out-dir>/ckpt.pt with --resume, an --init file, else (None, None)."""
    path = os.path.join(args.out_dir, "ckpt.pt") if args.resume else args.init
    if args.resume or os.path.isfile(args.init):
        ckpt = load_checkpoint(path)  # on the CPU: weights, optimizer and RNG states move on load
        if "moe" in ckpt and "loader" not in ckpt:  # moe.py's: characters of its own vocabulary, maybe MoE blocks
            raise ValueError(f"{'--resume' if args.resume else '--init'}: {path} was written by moe.py (a "
                             f"character-level model of its own vocabulary); go on with it in moe.py (--init "
                             f"{path} or --resume), or start train_gpt2.py from scratch, GPT-2 or its own checkpoint")
        if args.resume and "loader" not in ckpt:  # sft.py's, moe.py's, ...: no data position to go on from
            raise ValueError(f"--resume: {path} was not written by train_gpt2.py; resume it with the script that "
                             f"wrote it, or start from its weights with --init {path} and a new --out-dir")
        return ckpt, path
    return None, None


def run_tokenizer(args, ckpt, ckpt_path):
    """From scratch, --tokenizer (default gpt2). Otherwise the tokenizer the weights were trained with:
    the one the checkpoint records (GPT-2's for OpenAI's weights and checkpoints that record none); a
    --tokenizer that differs from it is an error, since the same ids would stand for other text."""
    if args.init == "scratch" and not args.resume:
        return load_tokenizer(args.tokenizer or "gpt2")
    recorded = ckpt.get("tokenizer") if ckpt else None
    tok = bpe.Tokenizer.loads(recorded, source=f"{ckpt_path}['tokenizer']") if recorded else bpe.load_gpt2()
    if args.tokenizer and load_tokenizer(args.tokenizer).dumps() != tok.dumps():
        raise ValueError(f"--tokenizer {args.tokenizer}: {ckpt_path or args.init} was trained with another "
                         f"tokenizer ({tok.n_vocab} ids); drop --tokenizer to use that one, or train from scratch "
                         f"with this tokenizer in a new --out-dir")
    return tok


def model_config(args, ckpt, tok):
    """The config of the model to train, known before anything is built or downloaded."""
    arch = {k: getattr(args, k) for k in ("pos_emb", "norm", "mlp", "bias", "tie_weights",
                                          *(f[2:].replace("-", "_") for f, _, _ in ARCH_FLAGS))}
    arch = {k: v for k, v in arch.items() if v is not None}
    if args.resume:  # the checkpoint defines the model; architecture flags given anyway are named, not used
        config = GPTConfig(**ckpt["config"])
        ignored = [f"--{k.replace('_', '-')} {v!r} (the checkpoint's: {ckpt['config'].get(k)!r})"
                   for k, v in arch.items() if ckpt["config"].get(k) != v]
        if ignored:
            log(f"--resume: the checkpoint fixes the model; not used: {', '.join(ignored)}")
    else:
        if args.init == "scratch":  # a multiple of 64 keeps the lm_head's matmul on fast GPU tile sizes
            config = GPTConfig.from_preset(args.model, **{"vocab_size": -(-tok.n_vocab // 64) * 64, **arch})
        elif set(arch) - {"dropout"}:
            fail(f"architecture flags ({', '.join(sorted(set(arch) - {'dropout'}))}) only apply to --init "
                 f"scratch; pretrained weights fix the architecture")
        elif ckpt:
            config = GPTConfig(**{**ckpt["config"], **arch})
        elif os.path.isdir(args.init):
            if (kind := hf_model_type(args.init)) != "gpt2":  # its own tokenizer, not GPT-2's that this file uses
                raise ValueError(f"--init {args.init}: a {kind} model; train_gpt2.py continues GPT-2 weights or its "
                                 f"own checkpoints (post-train Llama / Qwen with sft.py or grpo.py --init)")
            with open(os.path.join(args.init, "config.json")) as f:
                hf = json.load(f)
            config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"])
        else:
            config = GPTConfig.from_preset(args.init)  # HF GPT-2 sizes share our preset names
    if config.vocab_size < tok.n_vocab:
        raise ValueError(f"the model's vocab_size {config.vocab_size} is below the tokenizer's {tok.n_vocab} ids; "
                         f"raise --vocab-size, or leave it out to follow the tokenizer")
    if args.seq_len > config.block_size and (config.window is None or config.pos_emb == "learned"):
        raise ValueError(f"--seq-len {args.seq_len} is longer than the model's context (block_size "
                         f"{config.block_size}); lower --seq-len" + (" or raise --block-size" if args.init == "scratch"
                                                                       else ""))
    return config


# -----------------------------------------------------------------------------
# Data: token shards in llm.c's format: a header of 256 int32 (magic 20240520, version 1, token count),
# then the tokens as uint16 (the GPT-2 vocabulary, 50,257 ids, fits in 16 bits; so does any tokenizer of
# up to 65,536 ids).

SHARD_MAGIC, SHARD_VERSION, HEADER_BYTES = 20240520, 1, 256 * 4
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
# GPT-2 tokens of FineWeb-Edu's 100B-token sample (karpathy/fineweb-edu-100B-gpt2-token-shards on the HF
# hub), 100M tokens per shard: the first 100 train shards are 10B tokens.
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


def tokenize_text(source, tok):
    """A text file or a folder of .txt files -> token shards of the tokenizer `tok`, cached next to the
    input, the last 10% of the tokens held out for validation. The cache is keyed on the tokenizer (one
    folder per tokenizer, <input>_tokens_<hash of tok.dumps()>) and on the inputs' names, sizes and
    modification times (the file names), so another tokenizer never reads these tokens and an edited
    input is tokenized again."""
    texts = sorted(os.path.join(source, f) for f in os.listdir(source) if f.endswith(".txt")) \
        if os.path.isdir(source) else [source]
    if not texts:
        raise ValueError(f"{source} holds neither .txt files nor .bin token shards")
    if not any(os.path.getsize(t) for t in texts):
        raise ValueError(f"{source}: no text to train on (empty)")
    tok_tag = hashlib.sha1(tok.dumps().encode()).hexdigest()[:10]
    out = f"{source.rstrip(os.sep).removesuffix('.txt')}_tokens_{tok_tag}"
    stamp = json.dumps([[os.path.basename(t), os.path.getsize(t), os.path.getmtime(t)] for t in texts])
    tag = hashlib.sha1(stamp.encode()).hexdigest()[:10]
    train, val = os.path.join(out, f"train_{tag}.bin"), os.path.join(out, f"val_{tag}.bin")
    if os.path.exists(train) and os.path.exists(val):
        return [train], [val]
    os.makedirs(out, exist_ok=True)
    for old in os.listdir(out):  # shards of an older version of the input (not another process's, of this one)
        if old.endswith(".bin") and old.startswith(("train_", "val_")) and tag not in old:
            os.remove(os.path.join(out, old))
    parts = []
    # each process its own scratch folder: two runs (or two nodes on one file system) may tokenize at once
    with tempfile.TemporaryDirectory(dir=out, prefix="tmp_") as scratch:
        for i, t in enumerate(texts):  # in parallel over all cores; each file, and each document in it marked
            raw = os.path.join(scratch, f"raw_{i}.bin")  # by a literal <|endoftext|>, ends with the end-of-text
            bpe.encode_file(tok, t, raw, append_eot=True, allowed_special={"<|endoftext|>"})  # token
            parts.append(np.array(bpe.load_tokens(raw)))
    tokens = np.concatenate(parts)
    split = int(len(tokens) * 0.9)
    write_shard(val, tokens[split:])
    write_shard(train, tokens[:split])  # written last: its presence marks a complete tokenization
    return [train], [val]


def resolve_data(data, rank, tok=None):
    """--data -> (train shard paths, val shard paths). `rank` is the process's rank on its node: local
    rank 0 downloads or tokenizes (once per node), the rest wait. Tokenizing is safe when nodes share a file system
    (each process writes in its own scratch folder, shards are renamed into place); a download is not: on a shared
    file system, run one node first, or fetch the data before the run.
    Text is tokenized with `tok` (default GPT-2's); shards are taken as they are."""
    if data == "shakespeare":
        data = os.path.join(DATA_DIR, "tinyshakespeare.txt")
    if data in bpe.TASK_DATA:  # generated from a seed into data/task*/ (the same text on every machine)
        worked = bpe.TASK_DATA[data]
        data = str(bpe.task_files(worked=worked)["pretrain"]) if rank == 0 else None
        barrier()
        data = data or str(bpe.task_files(worked=worked)["pretrain"])
    if data in REMOTE_SETS:
        if rank == 0:
            fetch_remote(data)
        barrier()
        return fetch_remote(data)
    if not os.path.exists(data):
        raise ValueError(f"--data {data!r}: no such file or folder, and not one of shakespeare, task, "
                         f"task-columns, {', '.join(REMOTE_SETS)}")
    if os.path.isfile(data) and data.endswith(".bin"):
        raise ValueError(f"--data {data}: one token shard; give the folder that holds the train and val shards "
                         f"(validation files have 'val' in their name)")
    shards = sorted(os.path.join(data, f) for f in os.listdir(data) if f.endswith(".bin")) \
        if os.path.isdir(data) else []
    if shards:  # llm.c naming: *_val_* shards are the validation split, the rest train
        val = [s for s in shards if "val" in os.path.basename(s)]
        train = [s for s in shards if s not in val]
        if not val or not train:
            raise ValueError(f"{data}: need both train and validation shards (validation files have 'val' "
                             f"in their name); found {len(train)} train and {len(val)} val")
        return train, val
    tok = bpe.load_gpt2() if tok is None else tok
    if rank == 0:
        tokenize_text(data, tok)
    barrier()
    return tokenize_text(data, tok)


def token_counts(shards, limit=10_000_000):
    """How often each id occurs in the first `limit` tokens of the shards.
    token_counts([np.array([1, 1, 3])])[:4] -> [0, 2, 0, 1]"""
    counts = np.zeros(2 ** 16, dtype=np.int64)
    for s in shards:
        counts += np.bincount(np.asarray(s[:limit - counts.sum()]), minlength=2 ** 16)
    return counts


def unigram_entropy(shards, limit=10_000_000):
    """Entropy (nats) of the token frequencies: the loss of the best model that ignores context."""
    counts = token_counts(shards, limit)
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
        self.starts = np.cumsum([0] + [max(0, len(s) - 1) // seq_len for s in self.shards])  # an empty shard: 0
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
    if min(n_windows, loader.n) < world:  # a process without a window would skip DDP's collectives and hang
        raise ValueError(f"the validation data has {loader.n} windows, fewer than the {world} processes")
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
        end = encode(" " + ending)  # the ending's first word with its leading space, as in running text
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
    """HellaSwag accuracy, normalized by length as in nanoGPT / llm.c: the ending with the lowest mean loss per
    token wins (lm-eval's acc_norm divides by the ending's length in bytes instead). Examples round-robin over
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
def sample(model, tok, prompt, n_tokens, device, seed, top_k=50):
    """Top-k sampling with the KV cache, from its own generator so training's random state is untouched.
    Only the tokenizer's ids are candidates: the rows that round the vocabulary up stand for no text."""
    model.eval()
    g = torch.Generator(device=device).manual_seed(seed)
    ids = tok.encode(prompt, allowed_special="all") or [tok.eot_token]  # empty: the start of a document
    idx = torch.tensor([ids], device=device)
    cache = model.new_cache(1)
    logits, _ = model(idx, cache=cache, last_logits_only=True)
    out = []
    for _ in range(min(n_tokens, model.config.block_size - idx.size(1))):
        probs, ids = F.softmax(logits[:, -1, :tok.n_vocab].float(), dim=-1).topk(top_k)
        nxt = ids.gather(-1, torch.multinomial(probs, 1, generator=g))
        out.append(int(nxt))
        logits, _ = model(nxt, cache=cache)
    model.train()
    return prompt + tok.decode(out)


# -----------------------------------------------------------------------------
# Training: the set-up steps main takes, in order, then the training step and main itself.

Data = namedtuple("Data", "train val hellaswag")  # two WindowLoaders, HellaSwag examples (None = not evaluated)


def load_data(args, tok, config, proc):
    """Every process opens the same shards (local rank 0 first downloads or tokenizes them)."""
    try:
        train_files, val_files = resolve_data(args.data, proc.local_rank, tok)
        data = Data(WindowLoader(train_files, args.seq_len, args.seed),
                    WindowLoader(val_files, args.seq_len, shuffle=False), None)
        if args.hellaswag_interval:
            path = args.hellaswag_file or os.path.join(cache_dir("hellaswag"), "hellaswag_val.jsonl")
            if proc.local_rank == 0 and not os.path.exists(path):
                download(HELLASWAG_URL, path)
            barrier()
            data = data._replace(hellaswag=hellaswag_examples(path)[:args.hellaswag_limit or None])
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        fail(e)
    if args.total_batch_size // args.seq_len > data.train.n:
        fail(f"a step needs {args.total_batch_size // args.seq_len} windows of {args.seq_len} tokens but the "
             f"training data has only {data.train.n}; lower --total-batch-size")
    top = int(np.flatnonzero(token_counts(data.train.shards)).max())
    if top >= config.vocab_size:  # checked on the first 10M tokens: pre-tokenized shards come from elsewhere
        fail(f"the training data holds token id {top} but the model has {config.vocab_size} ids: the data was "
             f"tokenized with a larger vocabulary; pass the --tokenizer it was made with (FineWeb-Edu's shards "
             f"hold GPT-2 ids) or a larger --vocab-size")
    return data


def build_model(args, config, ckpt, ckpt_path, device, dtype):
    """(model, optimizer, grad scaler), the model initialised from --seed (the same weights on every
    rank; DDP also broadcasts rank 0's), from OpenAI's weights, or from a checkpoint."""
    seed_everything(args.seed)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if ckpt or args.init == "scratch":
        model = GPT(config)
    else:  # OpenAI's weights from the HF hub, or an HF directory
        try:
            model = GPT.from_pretrained(args.init, **({"dropout": args.dropout} if args.dropout else {}))
        except bpe.DownloadError as e:  # offline: the message says which files to fetch and where they go
            fail(e)
    if ckpt:
        load_model_state(model, ckpt["model"], ckpt_path)
    model.to(device)
    optimizer = model.configure_optimizer(args.weight_decay, args.lr, (0.9, 0.95), device.split(":")[0])
    return model, optimizer, grad_scaler(device, dtype)


def resume(args, ckpt, ckpt_path, optimizer, scaler, loader, proc):
    """Restore the optimizer, grad scaler, data position and RNG states of a checkpoint; returns its step.
    The loader's position counts windows, not per-process batches, so the run may go on with another
    number of processes (its RNG streams then start afresh: dropout masks differ, the data does not)."""
    saved = ckpt["args"]
    for key in ("seq_len", "total_batch_size", "seed", "data"):
        if saved[key] != getattr(args, key):
            fail(f"--resume: --{key.replace('_', '-')} is {getattr(args, key)!r} but the checkpoint was "
                 f"trained with {saved[key]!r}; use the same value or start a new --out-dir")
    changed = [f"--{k.replace('_', '-')} {getattr(args, k)!r} (the checkpoint's run: {saved[k]!r})"
               for k in ("max_steps", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "grad_clip")
               if k in saved and saved[k] != getattr(args, k)]
    if changed:  # allowed (e.g. a longer run), but then it is not the uninterrupted run's continuation
        log(f"--resume: {', '.join(changed)}; the run goes on with the new values; give the checkpoint's values "
            f"(or its --preset) to continue it exactly")
    if ckpt["loader"]["n"] != loader.n:
        fail(f"--resume: the training data changed since the checkpoint ({ckpt['loader']['n']} windows "
             f"then, {loader.n} now)")
    optimizer.load_state_dict(ckpt["optimizer"])
    restore_scaler(scaler, ckpt["scaler"])
    loader.pos = ckpt["loader"]["pos"]
    if len(ckpt["rng"]) == proc.world:
        set_rng_state(ckpt["rng"][proc.rank])
    else:
        seed_everything(args.seed + proc.rank + ckpt["step"])
    log(f"resumed from {ckpt_path} at step {ckpt['step']}")
    return ckpt["step"]


class Recorder:
    """Where the numbers go: <out-dir>/metrics.jsonl (gpt2.MetricsLog, and its plot), and wandb or
    TensorBoard when asked (imported only then). Rank 0 records; on other ranks every call does nothing."""

    def __init__(self, args, master, resume_step=None):
        self.metrics = MetricsLog(args.out_dir, resume_step=resume_step) if master else None
        self.sinks, self.closers = [], []
        if master and args.wandb:
            import wandb
            wandb.init(project=args.wandb_project, config=vars(args), dir=args.out_dir)
            self.sinks.append(lambda row: wandb.log(row, step=row["step"]))
            self.closers.append(wandb.finish)
        if master and args.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            tb = SummaryWriter(os.path.join(args.out_dir, "tensorboard"))
            self.sinks.append(lambda row: [tb.add_scalar(k, v, row["step"]) for k, v in row.items() if k != "step"])
            self.closers.append(tb.close)

    def __call__(self, **row):
        if self.metrics:
            self.metrics.log(**row)
            for sink in self.sinks:
                sink(row)

    def finish(self, title):
        """Flush the trackers and draw the loss plot; returns its path (None without matplotlib or on rank > 0)."""
        for close in self.closers:
            close()
        return self.metrics.plot(title=title) if self.metrics else None


def due(every, step, last):
    """Whether something done every `every` steps (0 = never) happens at `step`; always at the last step."""
    return bool(every) and (step % every == 0 or step == last)


def evaluate(step, args, model, raw_model, data, tok, proc, dtype, record):
    """The evaluations due at `step` (val loss, HellaSwag), logged and recorded with the seconds they
    took; a sample after each val loss. Returns whether any ran."""
    row, t0 = {}, time.time()
    if due(args.eval_interval, step, args.max_steps):
        row["val_loss"] = val_loss(model, data.val, args.eval_tokens // args.seq_len, args.batch_size,
                                   proc.device, dtype, proc.rank, proc.world)
    if data.hellaswag and due(args.hellaswag_interval, step, args.max_steps):
        row["hellaswag"] = hellaswag(raw_model, data.hellaswag, tok.encode, proc.device, dtype, proc.rank,
                                     proc.world)
    if not row:
        return False
    seconds = time.time() - t0
    log(f"step {step:5d} | " + " | ".join(f"{k} {v:.4f}" for k, v in row.items()) + f" | {seconds:.1f} s")
    record(step=step, **row, eval_seconds=seconds)
    if "val_loss" in row and proc.master and args.sample_tokens:
        log(sample(raw_model, tok, args.prompt, args.sample_tokens, proc.device, args.seed + step).strip() + "\n")
    return True


def accumulate_gradients(model, loader, micro_steps, batch_size, proc, dtype, scaler):
    """Forward and backward over one optimizer step's micro-batches, leaving in .grad the gradient of the
    mean loss over all the step's sequences; returns that mean loss (over all processes) and moves the
    loader past the step. Each micro-step's loss is divided by micro_steps, and DDP averages over
    processes, so the gradient is the same as that of one batch of all the sequences."""
    loss_sum = torch.zeros((), device=proc.device)
    for micro in range(micro_steps):
        x, y = loader.micro_batch(micro, proc.rank, proc.world, batch_size)
        # DDP all-reduces the gradients on the last micro-step only; before that they just accumulate
        with model.no_sync() if proc.ddp and micro < micro_steps - 1 else nullcontext():
            with autocast(proc.device, dtype):
                _, loss = model(to_device(x, proc.device), to_device(y, proc.device))
            loss = loss / micro_steps  # the mean over the step's sequences, not the sum
            loss_sum += loss.detach()
            scaler.scale(loss).backward()
    loader.pos += micro_steps * proc.world * batch_size
    return all_reduce(loss_sum) / proc.world


def save_run(path, raw_model, proc, **state):
    """An atomic checkpoint of the model and `state`, with the RNG states of every process (gathered to rank 0)."""
    rngs = [None] * proc.world
    if proc.ddp:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    if proc.master:
        save_checkpoint(path, raw_model, rng=rngs, **state)


def main(argv=None):
    args = parse_args(argv)
    check_args(args, int(os.environ.get("WORLD_SIZE", 1)))
    try:
        ckpt, ckpt_path = start_checkpoint(args)
        given = given_flags(argv)
        if args.resume and "dtype" not in given and "dtype" in ckpt.get("args", {}):
            args.dtype = ckpt["args"]["dtype"]  # the run's own precision: a bf16 run resumed in float32 is another run
        tok = run_tokenizer(args, ckpt, ckpt_path)
        config = model_config(args, ckpt, tok)
        if "model" in given and (args.resume or args.init != "scratch"):
            log(f"--model {args.model}: not used; the {'checkpoint' if args.resume else '--init weights'} fix the "
                f"model ({config.n_layer} layers, {config.n_embd} wide)")
        if args.sample_tokens and (n_prompt := len(tok.encode(args.prompt or "", allowed_special="all"))) >= \
                config.block_size:
            raise ValueError(f"--prompt is {n_prompt} tokens, the model's context {config.block_size}: shorten it "
                             f"(or --sample-tokens 0: no samples)")
        device = pick_device(args.device)
        dtype = pick_dtype(args.dtype, device)
    except (ValueError, FileNotFoundError) as e:
        fail(e)
    proc = setup_distributed(device)
    data = load_data(args, tok, config, proc)
    raw_model, optimizer, scaler = build_model(args, config, ckpt, ckpt_path, proc.device, dtype)
    step = resume(args, ckpt, ckpt_path, optimizer, scaler, data.train, proc) if args.resume else 0
    loss_ema = ckpt.get("train_loss_ema", 0.0) if args.resume else 0.0
    del ckpt  # the CPU copy of the weights and optimizer state is not needed any more
    model = maybe_compile(raw_model, args.compile)
    if proc.ddp:
        model = DDP(model, device_ids=[proc.local_rank] if proc.device.startswith("cuda") else None)
    record = Recorder(args, proc.master, resume_step=step if args.resume else None)
    grad_accum = args.total_batch_size // (args.batch_size * args.seq_len * proc.world)
    flops_per_step = raw_model.flops_per_token(args.seq_len) * args.total_batch_size
    peak = peak_flops(proc.device)
    log(f"model {raw_model.num_params() / 1e6:.2f}M params ({config.n_layer} layers, {config.n_embd} wide, "
        f"{config.pos_emb} positions, {config.vocab_size} vocab for {tok.n_vocab} token ids) | device "
        f"{proc.device} {str(dtype).removeprefix('torch.')} x {proc.world} process(es)"
        f"{' | compiled' if args.compile else ''}")
    if proc.master:
        log(f"data {sum(len(s) for s in data.train.shards):,} train tokens ({data.train.n:,} windows), "
            f"{sum(len(s) for s in data.val.shards):,} val | unigram entropy "
            f"{unigram_entropy(data.train.shards):.3f} nats (the loss of a model that ignores context)")
    log(f"{args.total_batch_size:,} tokens per step = {args.batch_size} x {args.seq_len} x {proc.world} "
        f"processes x {grad_accum} accumulation steps | {args.max_steps} steps")

    if step == 0:
        evaluate(0, args, model, raw_model, data, tok, proc, dtype, record)
    start_time = t_last = time.time()
    stop = min(args.max_steps, args.stop_after or args.max_steps)
    while step < stop:
        loss = accumulate_gradients(model, data.train, grad_accum, args.batch_size, proc, dtype, scaler)
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip or float("inf"))  # 0 = off
        lr = lr_at(step, args.lr, args.warmup_steps, args.max_steps, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        train_loss = loss.item()  # waits for the GPU, so the time below is real
        now = time.time()
        dt, t_last = now - t_last, now
        row = dict(train_loss=train_loss, lr=lr, grad_norm=norm.item(), tokens_per_sec=args.total_batch_size / dt)
        if peak:
            row["mfu"] = flops_per_step / dt / (peak * proc.world)
        # one step's loss is noisy: an exponential moving average (divided by 1 - 0.9^step, since it
        # starts at 0) draws the curve; it goes into the checkpoint, so a resumed run continues it
        loss_ema = 0.9 * loss_ema + 0.1 * train_loss
        if step % args.log_interval == 0 or step == stop:
            row["train_loss_ema"] = loss_ema / (1 - 0.9 ** step)
            log(f"step {step:5d} | loss {train_loss:.4f} (ema {row['train_loss_ema']:.4f}) | lr {lr:.2e} | "
                f"norm {row['grad_norm']:.2f} | {dt * 1000:.0f} ms | {row['tokens_per_sec']:,.0f} tok/s"
                + (f" | mfu {row['mfu']:.1%}" if peak else ""))
        record(step=step, **row)
        if evaluate(step, args, model, raw_model, data, tok, proc, dtype, record):
            t_last = time.time()  # evaluation is not training time
        if step == stop or due(args.checkpoint_interval, step, stop):
            save_run(os.path.join(args.out_dir, "ckpt.pt"), raw_model, proc, optimizer=optimizer.state_dict(),
                     scaler=scaler.state_dict(), step=step, loader={"pos": data.train.pos, "n": data.train.n},
                     train_loss_ema=loss_ema, tokenizer=tok.dumps(), args=vars(args))
            t_last = time.time()
    log(f"{'stopped' if step < args.max_steps else 'done'} at step {step} in {time.time() - start_time:.0f} s; "
        f"checkpoint {os.path.join(args.out_dir, 'ckpt.pt')}")
    if plot := record.finish(title=f"train_gpt2 {args.preset}"):
        log(f"loss plot {plot}")
    end_distributed()  # torchrun: the other processes wait for process 0's checkpoint and plot


if __name__ == "__main__":
    main()
