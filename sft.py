"""
sft.py: supervised fine-tuning, the first step of post-training: how a base language model, which only
continues text, becomes a model that answers.

What it teaches, top to bottom:
  1. The data: prompt / completion pairs (or Alpaca's instruction / input / output) in one prompt template
     (bpe.format_prompt), with a loss mask so that only the response and its end-of-text are learned.
  2. Batches: each batch padded to its longest example, or examples packed back to back into full rows.
  3. Full fine-tuning, or LoRA: every weight frozen and small adapters trained beside them (gpt2.add_lora),
     merged into the weights at the end so the next stage loads a plain model.
  4. Judging a model by what it generates: the held-out response loss, and the answers themselves, scored by
     the task's verifier (greedy decoding) or written next to the references for a judge to read.
  5. The loop: AdamW, warmup + cosine, metrics.jsonl, an atomic checkpoint, exact --resume, a loss plot.

The CPU pipeline, on the arithmetic task of bpe.py (every later post-training file starts from its output):
    python train_gpt2.py --preset task --out-dir out/task-base    # the base model (see README for time)
    python sft.py                                   # full fine-tuning -> out/task-sft/ckpt.pt
    python sft.py --lora --out-dir out/task-sft-lora                # LoRA, r=4 on attention + MLP
    python sft.py --no-mask-prompt --out-dir out/task-sft-nomask    # learn the prompt too
    python sft.py --resume                          # continue out/task-sft from its checkpoint
    python sft.py --preset task-columns             # answers worked column by column (after train_gpt2.py's)
The real recipe (a GPU, or a patient laptop; downloads GPT-2 medium, 355M):
    python sft.py --preset gpt2-alpaca              # 1,100 instructions, 2 epochs; val loss ~0.66-0.70
    python sft.py --data my.jsonl --init gpt2       # any {"prompt", "completion"} JSON Lines file
A modern model (HF Llama 3.x / Qwen2.5, downloaded), and one too big for a GPU sharded over 8 with FSDP2:
    python sft.py --preset gpt2-alpaca --init Qwen/Qwen2.5-0.5B --out-dir out/qwen-alpaca
    torchrun --nproc_per_node 8 sft.py --fsdp --preset gpt2-alpaca --init meta-llama/Llama-3.1-8B --batch-size 32
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
from gpt2 import (MetricsLog, add_common_args, add_lora, autocast, download, end_distributed, epoch_order, fsdp_shard,
                  full_state_dict, grad_scaler, restore_scaler, init_distributed, left_pad, load_lora_state,
                  load_model_state, load_with_tokenizer, lora_state_dict, lr_at, warmup_note, maybe_compile,
                  merge_lora, pick_device, pick_dtype, resume_settings, sample, save_adapter, save_checkpoint,
                  seed_everything, rng_state, set_rng_state)

# -----------------------------------------------------------------------------
# Runs. A preset fills in defaults; a flag given on the command line wins.

PRESETS = {
    # the arithmetic task on a CPU: a base model from train_gpt2.py --preset task, byte tokens, no preamble
    "task": dict(init="out/task-base/ckpt.pt", data="task", out_dir="out/task-sft", preamble=False, epochs=1,
                 batch_size=32, lr=5e-4, lora_lr=3e-3, lora_r=4, weight_decay=0.0, warmup_steps=20,
                 eval_interval=100, max_new_tokens=24),  # r=4: 4% of the 0.8M-parameter task model
    # Raschka's chapter 7 recipe: GPT-2 medium, 1,100 instructions split 85/5/10, 2 epochs
    "gpt2-alpaca": dict(init="gpt2-medium", data="data/instruction_data.json", out_dir="out/gpt2-alpaca",
                        preamble=True, epochs=2, batch_size=8, lr=5e-5, lora_lr=5e-4, weight_decay=0.1,
                        warmup_steps=0, eval_interval=20, max_new_tokens=256),
}
# the same on the task whose answers are worked column by column (up to 48 characters)
PRESETS["task-columns"] = {**PRESETS["task"], "init": "out/task-columns-base/ckpt.pt", "data": "task-columns",
                           "out_dir": "out/task-columns-sft", "max_new_tokens": 64}
INSTRUCTION_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/"
                   "instruction-data.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    g = p.add_argument_group("run")
    g.add_argument("--preset", default="task", choices=list(PRESETS), help="defaults for a run (default: task)")
    g.add_argument("--init", help="the model to fine-tune: a checkpoint, gpt2 | gpt2-medium | ..., or an HF folder")
    g.add_argument("--data", help="task | task-columns (bpe.py's arithmetic) | a folder of its files | a .jsonl / "
                                 ".json of SFT rows")
    g.add_argument("--split", default="85/5/10", help="train/val/test percentages of a --data file")
    g.add_argument("--out-dir", help="where metrics.jsonl, ckpt.pt, loss.png and responses.json go")
    g.add_argument("--resume", action="store_true", help="continue the run in --out-dir with its own settings")
    g.add_argument("--stop-after", type=int, help="stop (with a checkpoint) after this step; --resume goes on")
    g = p.add_argument_group("method")
    g.add_argument("--lora", action=argparse.BooleanOptionalAction, default=False,
                   help="train rank-r adapters on frozen weights instead of every weight")
    g.add_argument("--lora-r", type=int, default=8, help="adapter rank (the task preset: 4)")
    g.add_argument("--lora-alpha", type=float, default=16, help="adapter scale is alpha / r")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input")
    g.add_argument("--lora-targets", default="c_attn,c_proj,c_fc", help="comma-separated Linear names to adapt")
    g.add_argument("--mask-prompt", action=argparse.BooleanOptionalAction, default=True,
                   help="loss on the response only (--no-mask-prompt: on the prompt too)")
    g.add_argument("--packing", action=argparse.BooleanOptionalAction, default=False,
                   help="pack examples into full rows of --seq-len instead of padding each batch to its longest")
    g.add_argument("--seq-len", type=int, default=256, help="row length with --packing")
    g.add_argument("--preamble", action=argparse.BooleanOptionalAction,
                   help="start prompts with Alpaca's 'Below is an instruction...' sentence")
    g.add_argument("--max-len", type=int, help="drop tokens past this length (default: the model's context)")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, help="passes over the training set")
    g.add_argument("--max-steps", type=int, help="optimizer steps (default: epochs x steps per epoch)")
    g.add_argument("--batch-size", type=int, help="examples per step (rows with --packing)")
    g.add_argument("--lr", type=float, help="peak learning rate (default: the preset's, for full or LoRA)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to this fraction of --lr")
    g.add_argument("--warmup-steps", type=int, help="linear warmup steps")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay on matrices")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm (0 = off)")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard weights, gradients and AdamW state over the processes with FSDP2 "
                        "(fully_shard), each process taking 1/N of every batch; for models too big for one GPU")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-interval", type=int, help="steps between evaluations (0 = start and end only)")
    g.add_argument("--eval-limit", type=int, default=0, help="evaluate on the first N val / test rows (0 = all)")
    g.add_argument("--eval-batch-size", type=int, default=100, help="prompts generated at once")
    g.add_argument("--max-new-tokens", type=int, help="longest generated response")
    add_common_args(p.add_argument_group("common (--device, --dtype, --compile, --seed)"))
    first, _ = p.parse_known_args(argv)
    p.set_defaults(**{k: v for k, v in PRESETS[first.preset].items() if k not in ("lr", "lora_lr")})  # see main
    args = p.parse_args(argv)
    for flag in ("batch_size", "max_steps", "epochs", "eval_batch_size", "max_new_tokens", "seq_len", "stop_after"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            fail(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    # a negative clip (or final learning rate) would flip the gradient's sign: ascent, silently
    for flag in ("lr", "warmup_steps", "grad_clip", "eval_limit", "min_lr_ratio"):
        if (getattr(args, flag) or 0) < 0:
            fail(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 0")
    if args.max_len is not None and args.max_len < 2:  # a prompt token and the response's end-of-text, at least
        fail(f"--max-len {args.max_len}: must be at least 2 (leave it out for the model's context)")
    return args


def fail(msg):
    raise SystemExit(f"sft.py: error: {msg}")


# -----------------------------------------------------------------------------
# 1. Data: rows -> (token ids, loss mask)


def load_splits(args):
    """--data -> (train, val, test) lists of rows. "task" (or "task-columns") is the arithmetic task of bpe.py
    (written to data/task/ or data/task-columns/ on first use); a folder holds such a task's sft.jsonl,
    sft_val.jsonl and test.jsonl. A data file is split in order, train first, then test, then val, as in
    Raschka's chapter 7."""
    folder = bpe.task_folder(args.data)
    if os.path.isdir(folder):
        return tuple(bpe.read_rows(os.path.join(folder, f"{name}.jsonl"), kind)
                     for name, kind in (("sft", "sft"), ("sft_val", "sft"), ("test", "rl")))
    if args.data == PRESETS["gpt2-alpaca"]["data"] and not os.path.exists(args.data):
        download(INSTRUCTION_URL, args.data)
    if not os.path.exists(args.data):
        fail(f"--data {args.data!r}: no such file or folder, and not 'task' or 'task-columns'")
    rows = bpe.read_rows(args.data, "sft")
    return bpe.split_by_percent(rows, args.split)


def encode_rows(rows, tok, preamble, mask_prompt, max_len):
    """Each row -> (ids, mask) with bpe.encode_example; longer examples lose their end (counted, reported), and
    an example whose prompt alone fills max_len is left out: no token of it would be trained."""
    out, cut, dropped = [], 0, 0
    for r in rows:
        ids, mask = bpe.encode_example(tok, r["prompt"], r["completion"], input=r.get("input", ""),
                                       preamble=preamble, mask_prompt=mask_prompt)
        cut += len(ids) > max_len
        if not any(mask[:max_len]):
            dropped += 1
            continue
        out.append((ids[:max_len], mask[:max_len]))
    if cut:
        print(f"note: {cut} of {len(rows)} examples are longer than {max_len} tokens and were cut"
              + (f"; {dropped} of them left out (the prompt fills {max_len} tokens: no response token left)"
                 if dropped else ""))
    return out


# -----------------------------------------------------------------------------
# 2. Batches: padding or packing


def pad_batch(examples, pad_id):
    """Right-pad to the longest example. x (B, L) inputs, y (B, L) targets with -1 wherever the mask is 0:
    the prompt (when masked) and the padding, but never a response's own end-of-text, even though the
    padding uses the same id (the mask, not the id, says what is learned)."""
    L = max(len(ids) for ids, _ in examples) - 1
    x = torch.full((len(examples), L), pad_id, dtype=torch.long)
    y = torch.full((len(examples), L), -1, dtype=torch.long)
    for row, (ids, mask) in enumerate(examples):
        ids_t, mask_t = torch.tensor(ids), torch.tensor(mask, dtype=torch.bool)
        x[row, :len(ids) - 1] = ids_t[:-1]
        y[row, :len(ids) - 1] = torch.where(mask_t[1:], ids_t[1:], -1)
    return x, y


def pack_rows(examples, seq_len):
    """All examples back to back (each ends with its end-of-text) cut into rows of seq_len: no padding at all.
    Attention runs across the example boundaries inside a row (the end-of-text marks where a new example
    starts); the remainder that does not fill a row is dropped. -> x, y of shape (n_rows, seq_len)."""
    ids = torch.tensor([t for e, _ in examples for t in e])
    mask = torch.tensor([m for _, ms in examples for m in ms], dtype=torch.bool)
    n = (len(ids) - 1) // seq_len * seq_len
    x, y = ids[:n], torch.where(mask[1:n + 1], ids[1:n + 1], -1)
    return x.view(-1, seq_len), y.view(-1, seq_len)


class Loader:
    """Step -> batch. Epoch e shuffles the examples with the seed (seed, e), then cuts them into batches
    (padding) or packs them into rows taken batch_size at a time (packing). The state is the step alone, so
    a resumed run sees exactly the batches the uninterrupted one would have."""

    def __init__(self, examples, batch_size, seed, pad_id, packing=False, seq_len=256):
        self.examples, self.B, self.seed, self.pad_id = examples, batch_size, seed, pad_id
        self.packing, self.seq_len, self.epoch, self.batches = packing, seq_len, None, None
        n_rows = (sum(len(e) for e, _ in examples) - 1) // seq_len if packing else len(examples)
        self.steps_per_epoch = n_rows // batch_size  # the last, incomplete batch is dropped
        if self.steps_per_epoch == 0:
            fail(f"{n_rows} {'rows' if packing else 'examples'} do not fill one batch of {batch_size}; "
                 f"lower --batch-size")

    def get(self, step):
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self.epoch:
            shuffled = [self.examples[j] for j in epoch_order(len(self.examples), self.seed, epoch)]
            if self.packing:
                x, y = pack_rows(shuffled, self.seq_len)
                self.batches = list(zip(x.split(self.B), y.split(self.B)))
            else:
                self.batches = [pad_batch(shuffled[k:k + self.B], self.pad_id)
                                for k in range(0, len(shuffled) - self.B + 1, self.B)]
            self.epoch = epoch
        return self.batches[i]


# -----------------------------------------------------------------------------
# 3. The model: a base checkpoint or GPT-2 weights, its tokenizer, and optionally LoRA


def load_base(init):
    """--init -> (model, tokenizer): gpt2.load_with_tokenizer, with the command that makes the default input."""
    try:
        model, tok, ckpt = load_with_tokenizer(init)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    if (ckpt or {}).get("method") == "rm":
        fail(f"--init {init} is a reward model (reward_model.py --method rm), not a language model; give the base "
             f"model (train_gpt2.py's checkpoint)")
    return model, tok


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -----------------------------------------------------------------------------
# 4. Evaluation: response loss, and the responses themselves


@torch.no_grad()
def response_loss(model, examples, batch_size, device, dtype):
    """Mean cross-entropy per response token over held-out examples (encoded with the prompt masked)."""
    model.eval()
    total, count = 0.0, 0
    for k in range(0, len(examples), batch_size):
        x, y = pad_batch(examples[k:k + batch_size], 0)
        with autocast(device, dtype):
            _, loss = model(x.to(device), y.to(device))
        n = int((y != -1).sum())
        total, count = total + loss.item() * n, count + n
    model.train()
    return total / count


@torch.no_grad()
def generate_responses(model, tok, rows, preamble, max_new_tokens, batch_size, device, dtype):
    """Greedy responses to the rows' prompts, batched with left padding (gpt2.sample), as text."""
    eot, out, cut = tok.eot_token, [], 0
    room = model.config.block_size - max_new_tokens  # prompt + answer must fit the context
    if room < 1:
        raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
                         f"{model.config.block_size}-token context; lower it")
    for k in range(0, len(rows), batch_size):
        chunk = rows[k:k + batch_size]
        prompts = [tok.encode_ordinary(bpe.format_prompt(r["prompt"], r.get("input", ""), preamble)) for r in chunk]
        cut += sum(len(p) > room for p in prompts)
        prompts = [p[-room:] for p in prompts]  # a longer prompt keeps its end, where the question is asked
        idx, attn = left_pad(prompts, eot, device)
        with autocast(device, dtype):
            tokens, mask, _ = sample(model, idx, max_new_tokens, attention_mask=attn, temperature=0, eos_id=eot,
                                     vocab_size=tok.n_vocab)
        for t, m in zip(tokens.tolist(), mask.tolist()):
            out.append(tok.decode([i for i, keep in zip(t, m) if keep and i != eot]))
    if cut:
        print(f"note: {cut} of {len(rows)} prompts were longer than the {room} tokens the context leaves "
              f"next to --max-new-tokens {max_new_tokens}; they kept their last {room} tokens")
    return out


def judge(model, tok, rows, args, device, dtype, path=None):
    """Generate for the test rows; the accuracy by bpe.reward where rows have answers (else None). With a
    path, the responses go there next to the references (Raschka's "model_response" layout)."""
    responses = generate_responses(model, tok, rows, args.preamble, args.max_new_tokens, args.eval_batch_size,
                                   device, dtype)
    scored = [bpe.reward(resp, r["answer"]) for resp, r in zip(responses, rows) if "answer" in r]
    if path:
        out = [{"instruction": r["prompt"], "input": r.get("input", ""), "output": r.get("completion", r.get("answer")),
                "model_response": resp, **({"reward": bpe.reward(resp, r["answer"])} if "answer" in r else {})}
               for r, resp in zip(rows, responses)]
        with open(path + ".tmp", "w") as f:
            json.dump(out, f, indent=1)
        os.replace(path + ".tmp", path)
    return sum(scored) / len(scored) if scored else None


# -----------------------------------------------------------------------------
# 5. Training


def main(argv=None):
    args = parse_args(argv)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    args, resume = resume_settings(args, "sft.py", "mask_prompt", argv)  # a resumed run: its own settings
    if args.lr is None:
        args.lr = PRESETS[args.preset]["lora_lr" if args.lora else "lr"]
    try:
        device = pick_device(args.device)
    except ValueError as e:
        fail(e)
    rank, world = 0, 1
    if args.fsdp:
        rank, world, device = init_distributed(device)
        if args.lora:
            fail("--fsdp shards full fine-tuning; LoRA's frozen base and small adapters fit one GPU without it")
        if args.batch_size % world:
            fail(f"--batch-size {args.batch_size} must be a multiple of the {world} processes")
        if rank:  # one process reports
            sys.stdout = open(os.devnull, "w")
    dtype = pick_dtype(args.dtype, device)
    seed_everything(args.seed)

    model, tok = load_base(args.init)
    if args.max_new_tokens >= model.config.block_size:
        fail(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's "
             f"{model.config.block_size}-token context; lower it")
    max_len = min(args.max_len or model.config.block_size, model.config.block_size)
    if args.packing and args.seq_len > model.config.block_size:
        fail(f"--seq-len {args.seq_len} is longer than the model's context ({model.config.block_size}); lower it")
    try:
        train_rows, val_rows, test_rows = load_splits(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        fail(e)
    if args.eval_limit:
        val_rows, test_rows = val_rows[:args.eval_limit], test_rows[:args.eval_limit]
    train = encode_rows(train_rows, tok, args.preamble, args.mask_prompt, max_len)
    val = encode_rows(val_rows, tok, args.preamble, True, max_len)  # judged on the response only, either way
    if not train or not val:
        fix = (f"raise --max-len (up to the model's {model.config.block_size})" if max_len < model.config.block_size
               else "the prompts fill the model's context: shorten them, or drop the preamble (--no-preamble)")
        fail(f"no {'training' if not train else 'validation'} example keeps a response token within {max_len} "
             f"tokens; {fix}")
    loader = Loader(train, args.batch_size, args.seed, tok.eot_token, args.packing, args.seq_len)
    max_steps = args.max_steps or args.epochs * loader.steps_per_epoch
    if note := warmup_note(args.warmup_steps, max_steps):
        print(f"sft.py: {note}")

    total_params = sum(p.numel() for p in model.parameters())
    if args.lora:
        try:
            add_lora(model, args.lora_r, args.lora_alpha, args.lora_targets.split(","), args.lora_dropout)
        except ValueError as e:  # a rank below 1, a target no layer has
            fail(f"--lora: {e}")
    model.to(device)
    if args.fsdp:
        if resume:  # the full weights go in before sharding
            load_model_state(model, {k: v.to(device) for k, v in resume["model"].items()}, ckpt_path)
        fsdp_shard(model)
    optimizer = model.configure_optimizer(args.weight_decay, args.lr, (0.9, 0.999), device)
    scaler = grad_scaler(device, dtype)
    step = 0
    if resume:
        if args.lora:  # the base comes from --init again; the checkpoint holds the trained adapter
            load_lora_state(model, {k: v.to(device) for k, v in resume["adapter"].items()}, ckpt_path)
        elif not args.fsdp:
            load_model_state(model, resume["model"], ckpt_path)
        if args.fsdp:  # the optimizer state was saved whole: each process takes its shard of it
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(model, optimizer, resume["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(resume["optimizer"])
        restore_scaler(scaler, resume["scaler"])
        step = resume["step"]
        set_rng_state(resume["rng"])
        print(f"resumed from {ckpt_path} at step {step}")
    fwd = maybe_compile(model, args.compile)
    metrics = MetricsLog(args.out_dir, resume_step=step if resume else None) if rank == 0 else None
    log = metrics.log if rank == 0 else (lambda **row: None)
    n_train = trainable(model)
    print(f"{args.init}: {total_params / 1e6:.2f}M parameters, {n_train:,} trainable ({n_train / total_params:.2%})"
          f"{' with LoRA r=%d' % args.lora_r if args.lora else ''} | {len(train):,} train / {len(val)} val / "
          f"{len(test_rows)} test examples | {max_steps} steps of {args.batch_size} "
          f"{'packed rows' if args.packing else 'padded examples'} | device {device}")

    def evaluate(done, final=False):
        row = {"step": done, "val_loss": response_loss(model, val, args.eval_batch_size, device, dtype)}
        t = time.time()
        acc = judge(model, tok, test_rows, args, device, dtype,
                    os.path.join(args.out_dir, "responses.json") if final and rank == 0 else None)
        if acc is not None:
            row["accuracy"] = acc
        row["eval_s"] = time.time() - t
        log(**row)
        tqdm.write(f"step {done:5d} | val response loss {row['val_loss']:.4f}" +
                   (f" | test accuracy {acc:.1%}" if acc is not None else ""))

    def checkpoint(done):
        extra = dict(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), step=done, rng=rng_state(),
                     args=vars(args), tokenizer=tok.dumps(), template={"preamble": args.preamble}, train_s=train_time)
        if args.fsdp:  # every process takes part in gathering the weights and optimizer state; one writes them
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
            state = full_state_dict(model)
            extra["optimizer"] = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True))
            if rank == 0:
                save_checkpoint(ckpt_path, model, state=state, **extra)
        elif args.lora:  # the next stage loads a plain model: merge a copy; resume needs only the adapter
            save_checkpoint(ckpt_path, merge_lora(copy.deepcopy(model)), lora=model.lora,
                            adapter=lora_state_dict(model), **extra)
            save_adapter(os.path.join(args.out_dir, "adapter.pt"), model, base=args.init, tokenizer=tok.dumps())
        else:
            save_checkpoint(ckpt_path, model, **extra)

    if step == 0:
        evaluate(0)
    stop = min(max_steps, args.stop_after or max_steps)
    if stop <= step:  # resumed at or past where this run stops: nothing to train
        return print(f"nothing to do: the run in {args.out_dir} is at step {step} of {max_steps}")
    # seconds of training so far: a resumed run goes on counting from its checkpoint's
    t0, train_time = time.time(), (resume or {}).get("train_s", 0.0)
    bar = tqdm(range(step, stop), initial=step, total=stop, desc="sft", dynamic_ncols=True, disable=rank > 0)
    model.train()
    for step in bar:
        x, y = loader.get(step)
        if world > 1:  # FSDP: each process takes every world-th example of the batch
            x, y = x[rank::world], y[rank::world]
        lr = lr_at(step, args.lr, args.warmup_steps, max_steps, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(device, dtype):
            _, loss = fwd(x.to(device), y.to(device))
        if world > 1:
            # FSDP averages the processes' gradients; weighting each process's mean loss by its share of the
            # batch's target tokens makes that average the gradient of the whole batch's mean, as in 1 process
            n = torch.tensor(float((y != -1).sum()), device=device)
            total = n.clone()
            torch.distributed.all_reduce(total)
            loss = loss.nan_to_num(0.0) * n * world / total
        # --packing, one process: a window of prompt tokens only has no loss (its mean is NaN), and a step
        # would only replay Adam's momentum: skipped
        learns = world > 1 or bool((y != -1).any())
        if learns:
            scaler.scale(loss).backward()
            if args.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if world > 1:  # the whole batch's mean loss and token count
            loss, n = loss.detach() / world, torch.tensor(float((y != -1).sum()), device=device)
            torch.distributed.all_reduce(loss)
            torch.distributed.all_reduce(n)
        log(step=done, **({"train_loss": loss.item()} if learns else {}), lr=lr,
            tokens=int((y != -1).sum()) if world == 1 else int(n))
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.1e}")
        if (args.eval_interval and done % args.eval_interval == 0) or done == stop:
            train_time += time.time() - t0
            evaluate(done, final=done == max_steps)
            checkpoint(done)
            t0 = time.time()
    bar.close()
    if stop == max_steps:
        log(step=stop, train_s=round(train_time, 1), trainable_params=n_train, total_params=total_params)
    responses = f" | responses {os.path.join(args.out_dir, 'responses.json')}" if stop == max_steps else ""
    print(f"{'done' if stop == max_steps else 'stopped'} at step {stop}: {train_time:.0f} s of training | "
          f"checkpoint {ckpt_path}{responses}")
    if rank == 0 and (plot := metrics.plot(title=f"sft {args.preset}{' lora' if args.lora else ''}")):
        print(f"loss plot {plot}")
    end_distributed()  # --fsdp: the other processes wait for process 0's checkpoint and plot


if __name__ == "__main__":
    main()
