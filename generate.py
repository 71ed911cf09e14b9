"""
generate.py: how text comes out of a language model, and how to make that fast.

The pieces, in file order:
  1. Logits -> token, as a few verbs: `Sampling` holds the settings (repetition / presence / frequency
     penalties, temperature, top-k, top-p (nucleus), min-p; temperature 0 = greedy); `process_logits`
     applies them, `logits_to_probs` gives the distribution, gpt2.py's `draw` draws from it, and `sample`
     does logits -> token in one call. gpt2.py holds the verbs its own small sampler shares (top-k / top-p
     filters, `draw`, `left_pad`); the penalties and min-p are taught here.
  2. The generate loop (`stream_tokens`, `generate`) on gpt2.py's `decode`, the step loop its `sample` runs
     too: one prefill pass over the prompt, then one token per step, each step attending to the KV cache
     instead of recomputing the whole context. Batches of prompts of different lengths (`left_pad`): left
     padding, an attention mask, per-row positions and a per-row stop at end-of-text, all with the cache on.
     The no-cache path recomputes everything (for comparison). Past the context window: gpt2.py's rolling
     cache (sliding window + attention sinks, StreamingLLM) for rotary / sinusoidal models;
     crop-and-recompute for learned positions.
  3. Speculative decoding: a small draft model proposes k tokens, the target checks them in one forward
     pass, both caches roll back what was rejected; the output follows the target's distribution exactly.
  ---- speed-ups and plumbing
  4. torch.compile of the decode step, with a static-shape cache so CUDA graphs can replay it.
  5. The command line: streaming text to the terminal as tokens arrive, stop strings, an interactive mode.

    python generate.py --model gpt2 --prompt "Hello, I'm a language model," --max-new-tokens 50
    python generate.py --model out/ckpt.pt --temperature 0.8 --top-p 0.95 --num-samples 4
    python generate.py --model gpt2-xl --draft-model gpt2 --temperature 0 --prompt "The meaning of life"
    python generate.py --model gpt2 --interactive
    python generate.py --model Qwen/Qwen2.5-0.5B-Instruct --chat --temperature 0 --prompt "What is 17 * 23?"
"""

import argparse
import sys
import time
import warnings
import weakref
from dataclasses import dataclass, fields, replace
from typing import Optional

import torch
import torch.nn.functional as F

from gpt2 import (GPT, KVCache, add_common_args, build_mask, decode, draw, left_pad, pick_device, pick_dtype,
                  seed_everything, tokenizer_of, top_k_filter, top_p_filter)

# -----------------------------------------------------------------------------
# 1. Logits -> token


@dataclass(frozen=True)
class Sampling:
    """How a distribution over the vocabulary becomes a token. temperature=0 means greedy, and so does any
    temperature below 1e-5 (as in vLLM): dividing logits by it would overflow float32 (a NaN to draw from).

    Which tokens the penalties count (padding never counts):
      repetition_penalty (CTRL, as in HF): every token of the prompt and of the generated text; a seen
        token's logit is divided by the penalty if positive, multiplied by it if negative.
      presence_penalty / frequency_penalty (as in the OpenAI API and vLLM): generated tokens only;
        logit -= presence * [count > 0] + frequency * count.
    vocab_size: only ids below it are ever drawn. A model's vocabulary can be larger than its tokenizer's:
      train_gpt2.py rounds it up to a multiple of 64 (50,304 for GPT-2's 50,257 tokens) for speed, and the
      padding ids, never seen in training, still get logits; the CLI sets it to the tokenizer's size.

    Sampling(temperature=0.8, top_p=0.95) -> nucleus sampling; Sampling(top_p=0) -> ValueError naming top_p.
    """
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    min_p: Optional[float] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    vocab_size: Optional[int] = None

    def __post_init__(self):
        if not 0 <= self.temperature < float("inf"):  # also catches NaN (and inf: -inf / inf is NaN)
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not abs(getattr(self, name)) < float("inf"):
                raise ValueError(f"{name} must be a finite number (0 = off), got {getattr(self, name)}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 (or None to keep every token), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1] (1 keeps every token), got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must lie in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1 (or None for the model's whole vocabulary), got {self.vocab_size}")

    @property
    def greedy(self):
        return self.temperature < 1e-5

    @property
    def penalized(self):
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


GREEDY = Sampling(temperature=0)


def apply_penalties(logits, seen, generated, s):
    """seen: (.., V) counts of prompt + generated tokens; generated: (.., V) counts of generated ones.
    logits [2, -2], seen [1, 1], generated [0, 0], repetition_penalty 2 -> [1, -4]."""
    if s.repetition_penalty != 1:
        r = s.repetition_penalty
        logits = torch.where(seen > 0, torch.where(logits > 0, logits / r, logits * r), logits)
    if s.presence_penalty or s.frequency_penalty:
        logits = logits - s.presence_penalty * (generated > 0) - s.frequency_penalty * generated
    return logits


def min_p_filter(logits, min_p):
    """Keep tokens at least min_p times as likely as the most likely one: the cut adapts to confidence.
    log [0.4, 0.3, 0.2, 0.06, 0.04], min_p=0.25 (cut at 0.1) -> the first three kept."""
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))


def process_logits(logits, s, seen=None, generated=None):
    """The model's logits -> the logits we sample from (fp32, temperature applied, -inf = filtered).
    Order as in HF: penalties, temperature, top-k, top-p, min-p. [1, 2, 3] at temperature 2 -> [0.5, 1, 1.5];
    [1, 2, 3] with vocab_size 2 -> [1, 2, -inf]."""
    logits = logits.float()
    if s.vocab_size is not None and s.vocab_size < logits.size(-1):  # ids past the tokenizer's: never drawn
        logits = F.pad(logits[..., :s.vocab_size], (0, logits.size(-1) - s.vocab_size), value=float("-inf"))
    if s.penalized:
        logits = apply_penalties(logits, seen, generated, s)
    if s.greedy:
        return logits  # argmax: temperature and filters cannot change it
    logits = logits / s.temperature
    if s.top_k is not None:
        logits = top_k_filter(logits, s.top_k)
    if s.top_p is not None:
        logits = top_p_filter(logits, s.top_p)
    if s.min_p:
        logits = min_p_filter(logits, s.min_p)
    return logits


def logits_to_probs(logits, s, seen=None, generated=None):
    """The model's logits (..., V) -> the distribution the next token is drawn from (one-hot for greedy).
    [1, 2, 3] greedy -> [0, 0, 1]; at temperature 1 -> softmax [0.09, 0.24, 0.67]."""
    logits = process_logits(logits, s, seen, generated)
    if s.greedy:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    return logits.softmax(dim=-1)


def sample(logits, s, seen=None, generated=None, generator=None):
    """The model's logits (..., V) -> one token per row: the generate loop's whole logits -> token step.
    [1, 2, 3] greedy -> 2."""
    if s.greedy:
        return process_logits(logits, s, seen, generated).argmax(dim=-1)  # no softmax needed
    return draw(logits_to_probs(logits, s, seen, generated), generator)


class TokenCounts:
    """Per-row token counts for the penalties, kept only when a penalty is on (a (B, V) scatter per step).
    Prompt [[7, 8]] -> seen[0, 7] = 1; add([7]) -> seen[0, 7] = 2, generated[0, 7] = 1."""

    def __init__(self, idx, valid, vocab_size, enabled):
        self.enabled = enabled
        if enabled:
            self.seen = torch.zeros(idx.size(0), vocab_size, device=idx.device).scatter_add_(1, idx, valid.float())
            self.generated = torch.zeros_like(self.seen)

    def add(self, tok):
        if self.enabled:
            one = torch.ones(tok.size(0), 1, device=tok.device)
            self.seen.scatter_add_(1, tok[:, None], one)
            self.generated.scatter_add_(1, tok[:, None], one)

    def get(self):
        return (self.seen, self.generated) if self.enabled else (None, None)


# -----------------------------------------------------------------------------
# 2. The generate loop: cache, padded batches, per-row stop, past the context


def check_prompt(model, idx, attention_mask):
    cfg = model.config
    if idx.dim() != 2 or idx.dtype != torch.long:
        raise ValueError(f"idx must be a (batch, time) LongTensor of token ids, got {tuple(idx.shape)} {idx.dtype}")
    if idx.size(1) == 0:
        raise ValueError("the prompt is empty; give at least one token (e.g. the end-of-text id as a start)")
    if attention_mask is not None:
        if attention_mask.shape != idx.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must have idx's shape {tuple(idx.shape)}")
    if idx.size(1) > cfg.block_size and not unbounded(model):
        raise ValueError(f"prompt of {idx.size(1)} tokens is longer than the context (block_size "
                         f"{cfg.block_size}); shorten it, or use a sliding-window model with rope/sinusoidal positions")


def unbounded(model):
    """A rolling cache over a sliding window lets rotary / sinusoidal models run forever; learned position
    embeddings simply do not exist past block_size."""
    return model.config.window is not None and model.config.pos_emb != "learned"


@torch.no_grad()
def stream_tokens(model, idx, max_new_tokens, sampling=None, *, eos_id=None, use_cache=True,
                  attention_mask=None, generator=None, compile=False):
    """Yield the next token of every row, (B,), one step at a time: generate() collects them and the CLI
    prints them as they arrive. sampling: a Sampling (default: temperature 1, no filters). Rows that produced
    eos_id keep emitting eos_id; the loop ends early once every row has. attention_mask (B, T): 1 = token,
    0 = left padding. compile: torch.compile the decode step (section 4)."""
    s = sampling or Sampling()
    cfg = model.config
    check_prompt(model, idx, attention_mask)
    if max_new_tokens < 0:  # (0: nothing to generate)
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    B, T = idx.shape
    valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(idx, dtype=torch.bool)
    counts = TokenCounts(idx, valid, cfg.vocab_size, s.penalized)
    seq, seq_mask = None, None  # the whole sequence so far, for the paths that recompute without a cache
    cache, step = None, decode_step(model, compile)
    if use_cache:
        # A linear cache only as long as this generation needs; a rolling one has a fixed size anyway.
        cache = make_cache(model, B, None if cfg.window else min(cfg.block_size, T + max_new_tokens), compile)

    def forward(new, new_valid):
        """gpt2.decode's forward: the prompt (prefill), then each new token -> the next logits (B, V).
        Finished rows' end-of-text tokens go in as ordinary tokens (their output is eos_id whatever comes)."""
        nonlocal seq, seq_mask, cache
        prefill = seq is None
        if prefill:
            seq, seq_mask = new, new_valid
        else:
            counts.add(new[:, 0])
            seq, seq_mask = torch.cat((seq, new), dim=1), torch.cat((seq_mask, torch.ones_like(new_valid)), dim=1)
        if cache is not None and prefill:  # the whole prompt in one pass
            return model(new, cache=cache, attention_mask=attention_mask, last_logits_only=True)[0][:, -1]
        # a linear cache fits the context; a rolling one goes on, unless learned positions end at block_size
        # (checked only then: the mask sum is a device sync on every decode step)
        if cache is not None and (cache.length < cache.size if not cache.rolling else
                                  unbounded(model) or int(seq_mask.sum(1).max()) <= cfg.block_size):
            return step(new, cache)
        if cache is not None:
            warnings.warn(f"context full ({cfg.block_size} tokens) and the model cannot go past it with a cache (no "
                          f"sliding window, or learned positions): continuing without the KV cache, recomputing "
                          f"the last block_size tokens per step")
            cache = None
        # Without a cache: the whole sequence each step, cropped to the context as nanoGPT does (positions
        # restart at 0 for the crop). A rolling-window model sees everything; its mask does the windowing.
        crop = slice(None) if unbounded(model) else slice(-cfg.block_size, None)
        ctx, ctx_mask = seq[:, crop], seq_mask[:, crop]
        return model(ctx, attention_mask=None if ctx_mask.all() else ctx_mask, last_logits_only=True)[0][:, -1]

    def pick(logits):
        return sample(logits, s, *counts.get(), generator)

    for tok, _, _ in decode(forward, idx, max_new_tokens, pick, attention_mask=attention_mask, eos_id=eos_id):
        yield tok


def generate(model, idx, max_new_tokens, sampling=None, **kwargs):
    """idx (B, T) -> (B, T + n) with n <= max_new_tokens new tokens (fewer if every row hit eos_id; finished
    rows are filled with eos_id). Same arguments as stream_tokens.
    generate(model, idx, 20, GREEDY) -> the 20 most likely next tokens, one at a time, after each row of idx."""
    new = list(stream_tokens(model, idx, max_new_tokens, sampling, **kwargs))
    return torch.cat((idx, torch.stack(new, dim=1)), dim=1) if new else idx


# -----------------------------------------------------------------------------
# 3. Speculative decoding (Leviathan et al. 2023, Chen et al. 2023)


def speculative_accept(p, q, drafted, generator=None):
    """p (k+1, V): the target's distributions at the k drafted positions and one past them; q (k, V): the
    draft's; drafted (k,). Accept token x with probability min(1, p(x) / q(x)); at the first rejection draw
    from norm(max(0, p - q)), which makes the result distributed exactly as p; if all k pass, draw a bonus
    token from p[k]. Greedy needs no special case: with one-hot p and q a drafted token is accepted exactly
    when it is the target's argmax, and every draw returns the one-hot token. Returns (n accepted, next token)."""
    k = drafted.numel()
    rows = torch.arange(k, device=p.device)
    ratio = p[rows, drafted] / q[rows, drafted]
    rejected = (torch.rand(k, device=p.device, generator=generator) >= ratio).nonzero()
    if len(rejected) == 0:
        return k, draw(p[k], generator)
    n = int(rejected[0])
    residual = (p[n] - q[n]).clamp(min=0)
    return n, draw(residual if residual.sum() > 0 else p[n], generator)  # p == q: a rejection has probability 0


def sequence_counts(counts, tokens):
    """Penalty counts at each of len(tokens) + 1 positions of a speculated run: position i has also seen
    tokens[:i]. counts: TokenCounts of the accepted text, batch 1. Returns (None, None) with no penalty on."""
    if not counts.enabled:
        return None, None
    extra = torch.zeros(len(tokens) + 1, counts.seen.size(1), device=counts.seen.device)
    if len(tokens):
        extra[1:] = F.one_hot(tokens, counts.seen.size(1)).float().cumsum(0)
    return counts.seen + extra, counts.generated + extra


@torch.no_grad()
def speculative_generate(target, draft, idx, max_new_tokens, sampling=None, *, num_draft=4, eos_id=None,
                         generator=None, stats=None):
    """Batch-1 speculative decoding with a KV cache on both models. Returns idx (1, T + n); `stats` (a dict,
    if given) receives proposed / accepted counts and target forward passes.

    Invariant between rounds: both caches hold every accepted token except the last one, `last`; the draft
    may lag by one more token (after a round where all k were accepted) held in `pending`."""
    s = sampling or Sampling()
    # the ids either model may draw: the two distributions are compared id by id, so both are cut to V (a model's
    # rows past its tokenizer, e.g. train_gpt2.py's rounding to a multiple of 64, are never drawn: s.vocab_size)
    V = s.vocab_size or target.config.vocab_size
    if min(draft.config.vocab_size, target.config.vocab_size) < V:
        raise ValueError(f"draft vocabulary ({draft.config.vocab_size}) differs from the target's "
                         f"({target.config.vocab_size}); the draft must share the target's tokenizer (rows past the "
                         f"tokenizer's ids are fine when Sampling(vocab_size=) is the tokenizer's size)")
    if idx.size(0) != 1:
        raise ValueError(f"speculative decoding here is batch 1 (rows accept different numbers of tokens); got "
                         f"a batch of {idx.size(0)}: call it once per prompt")
    if num_draft < 1:
        raise ValueError(f"num_draft must be >= 1, got {num_draft}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    T = idx.size(1)
    n = T + max_new_tokens - 1  # the tokens the caches ever hold: the last new token is never fed back
    for name, m in (("target", target), ("draft", draft)):
        check_prompt(m, idx, None)
        if m.config.window is not None:
            raise ValueError(f"speculative decoding rolls back a linear cache; the {name} has a sliding window "
                             f"({m.config.window} tokens), whose rolling cache cannot be rolled back: use "
                             f"generate() for it")
        if n > m.config.block_size:
            raise ValueError(f"speculative decoding rolls back a linear cache, so the whole generation must fit "
                             f"the {name}'s context: {T} prompt + {max_new_tokens} new tokens - 1 > block_size "
                             f"{m.config.block_size}; generate at most {m.config.block_size + 1 - T} tokens")
    stats = stats if stats is not None else {}
    stats.update(proposed=0, accepted=0, target_passes=0)
    tc, dc = target.new_cache(1, n), draft.new_cache(1, n)
    if T > 1:
        target(idx[:, :-1], cache=tc, last_logits_only=True)
        draft(idx[:, :-1], cache=dc, last_logits_only=True)
    counts = TokenCounts(idx, torch.ones_like(idx, dtype=torch.bool), V, s.penalized)
    out, last, pending = [], idx[0, -1:], idx[0, -1:]
    while len(out) < max_new_tokens:
        # k shrinks at the end so the caches never hold more than n = T + max_new_tokens - 1 tokens
        k = min(num_draft, max_new_tokens - len(out) - 1)
        drafted, q = [], []
        feed = pending
        for j in range(k):  # the draft proposes k tokens, one cached step each
            logits = draft(feed[None], cache=dc, last_logits_only=True)[0][0, -1, :V]
            seen, gen = sequence_counts(counts, torch.stack(drafted) if drafted else last[:0])
            q.append(logits_to_probs(logits, s, *(None if seen is None else x[-1] for x in (seen, gen))))
            drafted.append(draw(q[-1], generator))
            feed = drafted[-1][None]
        drafted = torch.stack(drafted) if drafted else last[:0]
        # the target scores `last` and every drafted token in one pass: k + 1 distributions
        logits = target(torch.cat((last, drafted))[None], cache=tc)[0][0, :, :V]
        p = logits_to_probs(logits, s, *sequence_counts(counts, drafted))
        n, nxt = speculative_accept(p, torch.stack(q) if k else p[:0], drafted, generator)
        stats["proposed"] += k
        stats["accepted"] += n
        stats["target_passes"] += 1
        # roll back: keep the caches up to (and including) the last accepted drafted token
        base = tc.length - (k + 1)
        tc.crop(base + 1 + n)
        if n < k:
            dc.crop(base + 1 + n)
            pending = nxt[None]
        else:  # the draft never saw its own last proposal: feed it next round, with the bonus token
            pending = torch.cat((drafted[-1:], nxt[None])) if k else nxt[None]
        new = torch.cat((drafted[:n], nxt[None]))
        for t in new:
            out.append(t)
            counts.add(t[None])
            if eos_id is not None and int(t) == eos_id:
                max_new_tokens = len(out)  # stop after end-of-text
                break
        last = nxt[None]
    return torch.cat((idx, torch.stack(out)[None].to(idx.dtype)), dim=1)


# -----------------------------------------------------------------------------
# Speed-ups and plumbing
# 4. Compiled decode step


class StaticKVCache(KVCache):
    """gpt2.py's linear cache with shapes that never change, for torch.compile and CUDA graphs (as in
    gpt-fast): every step attends over the whole preallocated buffer, empty slots masked out by kpos = -1,
    and the write column is a tensor, not a Python int (an int would be baked into the graph and force a
    recompile per step). `length` is therefore advanced by the caller after a compiled step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.col = torch.zeros(1, dtype=torch.long, device=self.kpos.device)
        if self.k[0].is_cuda:  # CUDA graphs replay fixed addresses: tell the compiler these buffers stay put
            for t in (*self.k, *self.v, self.kpos, self.next_pos, self.col):
                torch._dynamo.mark_static_address(t)

    def prepare(self, pos, valid):
        if not torch.compiler.is_compiling() and self.length + pos.size(1) > self.size:
            raise ValueError(f"KV cache full: {self.length} + {pos.size(1)} tokens > {self.size} slots")
        self._cols = self.col + torch.arange(pos.size(1), device=pos.device)
        self._new_kpos, self._valid = torch.where(valid, pos, -1), valid
        self.kpos.index_copy_(1, self._cols, self._new_kpos)
        return build_mask(pos, self.kpos)

    def update(self, layer, k, v):
        self.k[layer].index_copy_(2, self._cols, k)
        self.v[layer].index_copy_(2, self._cols, v)
        return self.k[layer], self.v[layer]

    def commit(self):
        self.col += self._valid.size(1)
        self.next_pos += self._valid.long().sum(1)
        if not torch.compiler.is_compiling():
            self.length += self._valid.size(1)


def make_cache(model, batch_size, max_len, compile):
    """The cache stream_tokens decodes with: gpt2.py's (model.new_cache), or the static-shape one when the
    step is compiled. A rolling cache is static-shaped already."""
    cfg, p = model.config, model.lm_head.weight
    if compile and cfg.window is None:
        return StaticKVCache(cfg, batch_size, max_len, p.dtype, p.device)
    return model.new_cache(batch_size, max_len)


_compiled_steps = weakref.WeakKeyDictionary()


def decode_step(model, compile=False):
    """One token per row through the cache -> last logits. Compiled once per model; on CUDA with
    mode='reduce-overhead', i.e. CUDA graphs: the whole step replays as one launch instead of ~15 kernel
    launches per layer, which is what bounds small-batch decoding on a GPU."""
    def step(tok, cache):
        return model(tok, cache=cache)[0][:, -1]
    if not compile:
        return step
    if model not in _compiled_steps:
        cuda = next(model.parameters()).is_cuda
        _compiled_steps[model] = torch.compile(step, mode="reduce-overhead" if cuda else None, dynamic=False)
    compiled = _compiled_steps[model]

    def run(tok, cache):
        length = cache.length
        logits = compiled(tok, cache)
        cache.length = length + tok.size(1)  # the Python-side count a compiled graph cannot update
        return logits.clone() if next(model.parameters()).is_cuda else logits  # CUDA graphs reuse outputs
    return run


# -----------------------------------------------------------------------------
# 5. Command line


class TextStream:
    """Token ids in, printable text out, as the tokens arrive. One character can span several byte-level
    tokens, so text ending in an unfinished character (decoded as U+FFFD) waits for the next token; the
    last len(stop) - 1 characters wait too, so a stop string is never half printed.
    stops ["###"]: pushing a, b, #, #, # returns "", "", "a", "b", "" and sets stopped; "ab" was shown."""

    def __init__(self, tokenizer, stops=()):
        self.tok, self.stops, self.ids, self.text, self.shown = tokenizer, [s for s in stops if s], [], "", 0
        self.holdback = max((len(s) for s in self.stops), default=1) - 1
        self.stopped = False

    def push(self, token_id):
        self.ids.append(token_id)
        self.text = self.tok.decode(self.ids)
        stop = find_stop(self.text, self.stops)
        if stop is not None:
            self.stopped = True
            return self._emit(stop)
        return "" if self.text.endswith("\ufffd") else self._emit(len(self.text) - self.holdback)

    def finish(self):
        stop = find_stop(self.text, self.stops)
        return self._emit(len(self.text) if stop is None else stop)

    def _emit(self, upto):
        new = self.text[self.shown:max(self.shown, upto)]
        self.shown += len(new)
        return new


def find_stop(text, stops):
    """Where the first stop string starts, or None. ("ab##c", ["##"]) -> 2."""
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def stream_text(tokenizer, ids, stops=()):
    """A generated row of ids -> the text a TextStream shows for it, so a batch prints what streaming would:
    the stop string that is complete first wins, even when a longer one started earlier.
    stops ["abcd", "c"], the letters a b c d e -> "ab" (the whole text's earliest stop, "abcd", would give "")."""
    stream, parts = TextStream(tokenizer, stops), []
    for t in ids:
        parts.append(stream.push(t))
        if stream.stopped:
            break
    return "".join(parts) + stream.finish()


def load_model(name, device, dtype, what="model"):
    try:  # the dtype at load time: Llama / Qwen keep their rotary frequencies in float32
        model = GPT.from_pretrained(name, dtype=dtype)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"error: cannot load --{what} {name!r}: {e}")
    return model.to(device=device).eval()


def load_tokenizer(model, chat, flag="--model"):
    """The model's tokenizer, its end-of-text id and its chat style: the tokenizer a checkpoint recorded (bytes,
    a bpe.py BPE), else GPT-2's; an HF Llama / Qwen folder's own, whose generation ends at the end of the turn
    with --chat. `flag` names the model in errors."""
    try:  # the tokenizer only matters here: generate() works on token ids
        tok = tokenizer_of(model, flag)
    except ValueError as e:  # more ids than the model has rows: the CLI speaks the checkpoint's tokenizer, else GPT-2's
        raise SystemExit(f"error: {e}; call generate() with the model's own tokenizer")
    if getattr(model, "hf_dir", None) is None:
        if chat:
            raise SystemExit("error: --chat needs a Llama / Qwen model (GPT-2 has no chat template)")
        try:
            return tok, tok.eot_token, None
        except ValueError:  # a BPE trained without <|endoftext|>: the text ends at --max-new-tokens
            return tok, None, None
    style = "chatml" if model.hf_config["model_type"] == "qwen2" else "llama3"
    if not chat:
        return tok, tok.eot_token, None
    return tok, tok.special_tokens["<|im_end|>" if style == "chatml" else "<|eot_id|>"], style


def run_prompt(args, text, tok, model, draft, sampling, device, generator, eos_id=None, chat_style=None):
    if chat_style:  # an instruct model: the prompt as one user turn, then the assistant's header
        import bpe
        ids = bpe.format_chat(tok, [{"role": "user", "content": text}], chat_style, add_generation_prompt=True)[0]
    else:
        ids = tok.encode(text, allowed_special={"<|endoftext|>"})
        if not ids:  # empty: the start of a document, after an end-of-text token
            if eos_id is None:
                raise ValueError("the prompt is empty, and this tokenizer has no <|endoftext|> token to start a "
                                 "document with; give a prompt")
            ids = [tok.eot_token]
        bos = getattr(tok, "special_tokens", {}).get("<|begin_of_text|>")
        if bos is not None:  # Llama 3 reads every document after its BOS token
            ids = [bos] + ids
    idx = torch.tensor([ids] * (1 if draft else args.num_samples), dtype=torch.long, device=device)
    check_prompt(model, idx, None)  # before anything is printed
    eos = None if args.ignore_eos else eos_id  # None: a tokenizer without an end-of-text token
    t0, n_tokens = time.perf_counter(), 0
    for sample_i in range(args.num_samples if draft else 1):
        if draft:  # one prompt at a time; stats printed below
            stats = {}
            out = speculative_generate(model, draft, idx, args.max_new_tokens, sampling, num_draft=args.num_draft,
                                       eos_id=eos, generator=generator, stats=stats)
            rows = [out[0, len(ids):].tolist()]
        elif args.num_samples == 1:  # stream: print each piece of text as soon as it is complete
            stream = TextStream(tok, args.stop)
            print(text, end="", flush=True)
            for t in stream_tokens(model, idx, args.max_new_tokens, sampling, eos_id=eos, use_cache=args.cache,
                                   generator=generator, compile=args.compile):
                n_tokens += 1
                if int(t[0]) == eos:
                    break
                print(stream.push(int(t[0])), end="", flush=True)
                if stream.stopped:
                    break
            print(stream.finish(), flush=True)
            rows = []
        else:
            out = generate(model, idx, args.max_new_tokens, sampling, eos_id=eos, use_cache=args.cache,
                           generator=generator, compile=args.compile)
            rows = [r[len(ids):].tolist() for r in out]
        for j, row in enumerate(rows):
            n_tokens += len(row)
            row = row[:row.index(eos)] if eos in row else row
            if args.num_samples > 1:
                print(f"{'-' * 20} sample {sample_i + j + 1}")
            print(text + stream_text(tok, row, args.stop))
        if draft:
            print(f"[speculative: {stats['accepted']}/{stats['proposed']} drafted tokens accepted "
                  f"({stats['accepted'] / max(1, stats['proposed']):.0%}), {stats['target_passes']} target passes]",
                  file=sys.stderr)
    dt = time.perf_counter() - t0
    print(f"[{n_tokens} tokens in {dt:.2f}s, {n_tokens / dt:.1f} tok/s]", file=sys.stderr)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="gpt2",
                   help="gpt2 | gpt2-medium | gpt2-large | gpt2-xl | an HF Llama 3.x / Qwen2.5 name "
                        "(Qwen/Qwen2.5-0.5B-Instruct) | HF directory | checkpoint file")
    g.add_argument("--draft-model", default=None,
                   help="speculative decoding with this draft model (same tokenizer as --model)")
    g.add_argument("--num-draft", type=int, default=4, help="tokens the draft proposes per target pass")
    g = p.add_argument_group("prompt and output")
    g.add_argument("--prompt", default="Hello, I'm a language model,", help="the text to continue")
    g.add_argument("--interactive", action="store_true", help="read prompts from the terminal until EOF (Ctrl-D)")
    g.add_argument("--num-samples", type=int, default=1, help="completions per prompt (one batch)")
    g.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate per completion at most")
    g.add_argument("--stop", action="append", default=[], help="stop when the text contains this (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep going past <|endoftext|>")
    g.add_argument("--chat", action="store_true",
                   help="instruct models (Llama / Qwen): the prompt as a user turn in the model's chat template; "
                        "stop at the end of the assistant's turn")
    g = p.add_argument_group("sampling (penalties, then temperature, then filters; see Sampling)")
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy; < 1 sharper, > 1 flatter")
    g.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (default: all)")
    g.add_argument("--top-p", type=float, default=None,
                   help="keep the most likely tokens up to this total probability, in (0, 1] (default: all)")
    g.add_argument("--min-p", type=float, default=None,
                   help="keep tokens at least this fraction as likely as the top one, in [0, 1] (default: all)")
    g.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtracted from the logit of every token generated so far")
    g.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtracted from a token's logit once per time it was generated")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divides (or multiplies, if negative) the logit of every token of prompt and output; 1 = off")
    g = p.add_argument_group("runtime")
    g.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True,
                   help="KV cache; --no-cache recomputes the whole context every step (slow; for comparison)")
    add_common_args(g)
    args = p.parse_args(argv)
    try:
        sampling = Sampling(**{f.name: getattr(args, f.name) for f in fields(Sampling) if f.name != "vocab_size"})
    except ValueError as e:
        p.error(str(e))
    if args.num_samples < 1 or args.max_new_tokens < 1:
        p.error("--num-samples and --max-new-tokens must be >= 1")
    if args.draft_model and not args.cache:
        p.error("speculative decoding needs the KV cache (it rolls it back); drop --no-cache or --draft-model")
    if args.compile and (args.draft_model or not args.cache):  # it compiles generate()'s cached decode step
        print(f"generate.py: note: --compile is not used with {'--draft-model' if args.draft_model else '--no-cache'}",
              file=sys.stderr)
    try:
        device = pick_device(args.device)
        dtype = pick_dtype(args.dtype, device)
    except ValueError as e:  # e.g. --device cuda on a machine without a GPU
        p.error(str(e))
    seed_everything(args.seed)
    model = load_model(args.model, device, dtype)
    draft = load_model(args.draft_model, device, dtype, "draft-model") if args.draft_model else None
    tok, eos_id, chat_style = load_tokenizer(model, args.chat)
    if draft is not None and getattr(draft, "tokenizer_dump", None) != getattr(model, "tokenizer_dump", None) \
            and load_tokenizer(draft, False, "--draft-model")[0].dumps() != tok.dumps():  # same size, other tokens
        raise SystemExit("error: --draft-model speaks another tokenizer than --model (their checkpoints record "
                         "different ones); speculative decoding needs the target's tokenizer in the draft")
    if draft is not None and draft.config.vocab_size < tok.n_vocab:  # (the target's own rows: load_tokenizer)
        raise SystemExit(f"error: --draft-model has a vocabulary of {draft.config.vocab_size}, smaller than its "
                         f"tokenizer's {tok.n_vocab}: the CLI speaks the tokenizer a checkpoint recorded, else GPT-2 "
                         f"BPE, or an HF Llama / Qwen directory's; call generate() with the model's own tokenizer")
    sampling = replace(sampling, vocab_size=tok.n_vocab)  # a padded vocabulary's extra ids mean nothing to it
    generator = torch.Generator(device).manual_seed(args.seed)
    prompts = iter(lambda: input("prompt> "), None) if args.interactive else [args.prompt]
    try:
        for text in prompts:
            try:
                run_prompt(args, text, tok, model, draft, sampling, device, generator, eos_id, chat_style)
            except ValueError as e:  # e.g. a prompt longer than the context: say so, keep the session
                if not args.interactive:
                    raise SystemExit(f"error: {e}")
                print(f"error: {e}", file=sys.stderr)
    except (EOFError, KeyboardInterrupt):
        print()


if __name__ == "__main__":
    main()
