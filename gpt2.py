"""
gpt2.py: the GPT model every other file in this project builds on, then the plumbing its scripts share.

What it teaches, in the file's order:
  1. GPTConfig: GPT-2's hyper-parameters plus switches for the modern variants a learner compares
     (learned / sinusoidal / rotary positions, LayerNorm / RMSNorm, GELU / SwiGLU, grouped-query
     attention, sliding-window attention with attention sinks).
  2. Positions: a learned table, the sinusoidal table, and rotary embeddings (RoPE), all computed from
     per-row positions so that padded batches and cached decoding are treated like training.
  3. Attention: the causal mask (windows, sinks, padding) and attention itself, once as the plain formula
     (`attention_reference`) and once through F.scaled_dot_product_attention (flash kernels on GPU); the
     config's `attention` switch picks one, and the tests check that both give the same logits.
  4. Norm (LayerNorm / RMSNorm), MLP (GELU / SwiGLU), the pre-norm Block, and GPT itself:
     embed -> blocks -> final norm -> lm_head -> loss; GPT-2's init, parameter count, FLOPs, AdamW groups.
  5. A KV cache for generation: prefill many tokens, then one token per step; left-padded batches with
     per-row positions; a rolling buffer for sliding window + sinks.
  Below the banner, the plumbing:
  6. Weights in and out: OpenAI's GPT-2 from the HF hub (safetensors read by hand), export to the HF layout;
     today's open models, Llama 3.x and Qwen2.5, the same way: their config.json mapped onto GPTConfig,
     sharded safetensors copied tensor by tensor into the fused q/k/v and gate/up matrices, and back out.
  7. Checkpoints: atomic writes, weights_only loads, clear errors on a mismatch.
  8. The helpers every script shares: device / dtype / autocast choice, seeding, learning-rate schedule,
     peak FLOPs for MFU, the common flags, metrics logging, and FSDP2 sharding (PyTorch's fully_shard) for
     models too big for one GPU.
  9. Post-training pieces: LoRA adapters (add, merge, save alone) and a cached batched sampler
     (left-padded prompts, per-row end-of-text, temperature / top-k / top-p, log-probs of the sampled
     tokens) that sft.py evaluates with and the RL files roll out with.

    python gpt2.py                 # parameter counts of the presets and a forward pass of `tiny`
    python gpt2.py --model gpt2    # downloads GPT-2 124M from the HF hub and completes a prompt
    python gpt2.py --model Qwen/Qwen2.5-0.5B   # the same with a modern model (GPT with rope, rmsnorm, swiglu)
"""

import argparse
import contextlib
import json
import math
import os
import random
import struct
import sys
import zipfile
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Config

POS_EMBS = ("learned", "sinusoidal", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
ATTENTIONS = ("sdpa", "math")
ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest context the model is trained for
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2
    qkv_bias: Optional[bool] = None  # biases on q, k, v only (Qwen2); None = same as bias
    pos_emb: str = "learned"  # learned | sinusoidal | rope
    rope_base: float = 10000.0
    rope_scaling: Optional[dict] = None  # Llama 3.1's long-context frequency scaling (see rope_frequencies)
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # gelu | swiglu
    mlp_hidden: Optional[int] = None  # MLP width; None = 4 n_embd (gelu), ~8/3 n_embd (swiglu)
    n_kv_head: Optional[int] = None  # None = n_head (multi-head); 1 = multi-query; else grouped-query
    window: Optional[int] = None  # sliding-window attention: each token sees the last `window` tokens
    n_sink: int = 0  # with a window: the first n_sink tokens stay visible forever (StreamingLLM)
    tie_weights: bool = True  # lm_head shares the token embedding matrix
    attention: str = "sdpa"  # sdpa (fused kernels) | math (attention_reference: the formula, slower)

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        for name, value, allowed in (("pos_emb", self.pos_emb, POS_EMBS), ("norm", self.norm, NORMS),
                                     ("mlp", self.mlp, MLPS), ("attention", self.attention, ATTENTIONS)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(allowed)}")
        for name in ("n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_sink < 0:
            raise ValueError(f"n_sink must be >= 0, got {self.n_sink}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                             f"pick n_embd a multiple of n_head")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if self.pos_emb == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError("rope needs an even head dimension (n_embd / n_head)")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.n_sink and self.window is None:
            raise ValueError("n_sink only makes sense with a sliding window (set window)")
        if self.rope_scaling is not None:
            missing = set(ROPE_SCALING_KEYS) - set(self.rope_scaling)
            if missing or self.rope_scaling.get("rope_type", "llama3") != "llama3":
                raise ValueError(f"rope_scaling must be Llama 3's: rope_type 'llama3' and "
                                 f"{', '.join(ROPE_SCALING_KEYS)}; got {self.rope_scaling}")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @classmethod
    def from_preset(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=256),  # CPU-sized, GPT-2 vocabulary
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}

# -----------------------------------------------------------------------------
# Positions: every scheme takes per-row integer positions (B, T), so left-padded rows and
# cached steps get the same treatment as a plain training batch. (The learned table is GPT.wpe.)


def sinusoidal_embedding(pos, dim):
    """The 'Attention is all you need' table, computed for the positions asked for.
    pos (B, T) -> (B, T, dim): sin(p / 10000^(2i/dim)) and cos(...) interleaved."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=pos.device, dtype=torch.float32) / dim))
    angles = pos.float()[..., None] * inv_freq  # (B, T, dim/2)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # (B, T, dim)


def rope_frequencies(head_size, base=10000.0, scaling=None):
    """Rotation speed of each channel pair: base^(-2i/hs), from one turn per token down to ~1/base.
    rope_frequencies(4) -> tensor([1.0000, 0.0100])
    scaling (Llama 3.1's rope_scaling) stretches a short-context model to a longer one: channels that turn
    too slowly to complete a turn within the original context are slowed down `factor` times more (so
    positions far beyond it still look like positions the model has seen); fast channels, which encode
    local order, keep their speed; the band in between is blended smoothly.
    rope_frequencies(4, 10000, dict(factor=8, low_freq_factor=1, high_freq_factor=4,
                     original_max_position_embeddings=64)) -> tensor([1.0000, 0.0012])"""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size))
    if scaling is None:
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    turns = old_context * inv_freq / (2 * math.pi)  # turns each channel makes over the original context
    smooth = ((turns - low) / (high - low)).clamp(0, 1)  # 0: slow channel (scale it), 1: fast one (keep it)
    return inv_freq / factor * (1 - smooth) + inv_freq * smooth


def rope_cos_sin(pos, inv_freq):
    """pos (B, T) -> cos, sin (B, 1, T, hs) of the angle pos * freq, each frequency twice (both halves)."""
    angles = pos.float()[..., None] * inv_freq  # (B, T, hs/2)
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, hs): broadcast over heads
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate-half RoPE: channel i is paired with channel i + hs/2 and the pair is rotated by pos * freq_i.
    Rotation keeps the dot product q.k a function of the position *difference* only.
    x (B, nh, T, hs), cos, sin (B, 1, T, hs) -> (B, nh, T, hs)"""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


# -----------------------------------------------------------------------------
# Attention


def build_mask(qpos, kpos, window=None, n_sink=0):
    """Boolean (B, 1, Tq, Tk) mask, True = may attend. kpos < 0 marks padding / empty cache slots.
    A query sees keys at positions <= its own; with a window only the last `window` of them, plus the
    first n_sink positions (attention sinks)."""
    q, k = qpos[:, None, :, None], kpos[:, None, None, :]
    mask = (k >= 0) & (k <= q)
    if window is not None:
        mask &= (q - k < window) | (k < n_sink)
    # A padding query sees no key at all; a fully masked row would give NaNs that leak into every
    # later layer through 0 * NaN, so let it attend everywhere: its output is never used.
    return mask | ~mask.any(dim=-1, keepdim=True)


def attention_reference(q, k, v, mask=None, dropout_p=0.0):
    """Attention as the formula softmax(q k^T / sqrt(hs)) v: what F.scaled_dot_product_attention computes
    in fused kernels. GPTConfig(attention="math") runs the model through this function.
    q (B, nh, Tq, hs), k, v (B, nh, Tk, hs), mask boolean (B, 1, Tq, Tk), True = may attend; None = causal."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, nh, Tq, Tk)
    if mask is None:
        mask = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return probs @ v  # (B, nh, Tq, hs)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        # q, k and v in one matmul; with grouped-query attention k and v have fewer heads
        self.c_attn = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * config.head_dim,
                                bias=config.bias if config.qkv_bias is None else config.qkv_bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.sdpa = config.attention == "sdpa"

    def forward(self, x, rope=None, mask=None, cache=None, layer=0):
        B, T, C = x.shape
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split([nh * hs, nkv * hs, nkv * hs], dim=2)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nkv, Tk, hs): the keys and values of everything seen so far
        if nkv != nh:  # grouped-query: query head h reads k/v head h // (nh / nkv)
            k = k.repeat_interleave(nh // nkv, dim=1)  # (B, nh, Tk, hs)
            v = v.repeat_interleave(nh // nkv, dim=1)
        dropout_p = self.dropout if self.training else 0.0
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout_p)
        else:
            y = attention_reference(q, k, v, mask, dropout_p)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # the heads side by side again
        return self.resid_dropout(self.c_proj(y))


# -----------------------------------------------------------------------------
# The rest of a transformer block


class Norm(nn.Module):
    """LayerNorm (centre and scale, GPT-2) or RMSNorm (scale only, Llama): one switch, same call.
    RMSNorm: x / sqrt(mean(x^2) + eps) * weight, computed in float32 whatever the input dtype."""

    def __init__(self, config):
        super().__init__()
        self.kind, self.eps = config.norm, config.norm_eps
        self.weight = nn.Parameter(torch.ones(config.n_embd))
        self.bias = nn.Parameter(torch.zeros(config.n_embd)) if config.bias and config.norm == "layernorm" else None

    def forward(self, x):
        if self.kind == "layernorm":
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def mlp_width(config):
    """Hidden units of the MLP: config.mlp_hidden if set (pretrained models pick their own), else 4 n_embd
    for GELU, ~8/3 n_embd for SwiGLU (rounded up to a multiple of 64). mlp_width(GPTConfig(mlp="swiglu")) -> 2048"""
    if config.mlp_hidden:
        return config.mlp_hidden
    return 64 * math.ceil(8 * config.n_embd / 3 / 64) if config.mlp == "swiglu" else 4 * config.n_embd


class MLP(nn.Module):
    """GPT-2's 4x GELU MLP, or SwiGLU: c_proj(silu(gate) * up), gate and up the two halves of c_fc, with
    ~8/3 n_embd hidden units so the parameter count stays that of the 4x MLP."""

    def __init__(self, config):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        hidden = mlp_width(config)
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden if self.swiglu else hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)  # (B, T, hidden), or (B, T, 2 * hidden) for SwiGLU
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's "gelu_new"
        return self.dropout(self.c_proj(h))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1, self.attn = Norm(config), CausalSelfAttention(config)
        self.ln_2, self.mlp = Norm(config), MLP(config)

    def forward(self, x, rope=None, mask=None, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), rope, mask, cache, layer)  # pre-norm residual stream
        return x + self.mlp(self.ln_2(x))


# -----------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=Norm(config),
        ))
        if config.pos_emb == "learned":
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.transformer.wte.weight
        if config.pos_emb == "rope":
            self.register_buffer("inv_freq", rope_frequencies(config.head_dim, config.rope_base, config.rope_scaling),
                                 persistent=False)
        # GPT-2 init: N(0, 0.02), and the projections into the residual stream scaled by 1/sqrt(2 n_layer)
        # so the stream's variance does not grow with depth (two residual adds per layer).
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, *, cache=None, attention_mask=None, last_logits_only=False):
        """idx (B, T) token ids -> logits (B, T, V) and the mean cross-entropy loss if targets are given
        (targets == -1 are ignored). attention_mask (B, T), 1 for tokens and 0 for (left) padding, gives
        per-row positions; with a cache it covers the new tokens only. last_logits_only skips the vocab
        projection of all but the last position (prefill in generation)."""
        x = self.hidden_states(idx, cache=cache, attention_mask=attention_mask)  # (B, T, C)
        if last_logits_only and targets is None:
            x = x[:, -1:]  # (B, 1, C)
        logits = self._logits(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def hidden_states(self, idx, *, cache=None, attention_mask=None):
        """idx (B, T) -> the final hidden states (B, T, C) after ln_f: the model without its vocabulary
        projection, which is what a reward model's or a classifier's head reads."""
        if not torch.compiler.is_compiling():
            self._check_input(idx, cache)
        pos, mask = self._positions_and_mask(idx, cache, attention_mask)  # (B, T), (B, 1, T, Tk) or None
        x, rope = self._embed(idx, pos)  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, rope, mask, cache, i)
        if cache is not None:
            cache.commit()
        return self.transformer.ln_f(x)

    def _positions_and_mask(self, idx, cache, attention_mask):
        """Per-row positions (B, T) and the attention mask; mask None means plain causal attention."""
        cfg = self.config
        B, T = idx.shape
        valid = attention_mask.bool() if attention_mask is not None else None
        if cache is not None:
            if valid is None:
                valid = torch.ones(B, T, dtype=torch.bool, device=idx.device)
            pos = cache.positions(valid)
            mask = cache.prepare(pos, valid)
        elif valid is not None or cfg.window is not None:
            if valid is None:
                valid = torch.ones(B, T, dtype=torch.bool, device=idx.device)
            pos = (valid.long().cumsum(1) - 1).clamp(min=0)  # left padding: a row's first token is position 0
            mask = build_mask(pos, torch.where(valid, pos, -1), cfg.window, cfg.n_sink)
        else:  # the training path: plain causal attention, the flash kernel's fast case
            pos = torch.arange(T, device=idx.device).expand(B, T)
            mask = None
        if cfg.pos_emb == "learned" and cache is not None and not idx.is_cuda and not torch.compiler.is_compiling():
            if int(pos.max()) >= cfg.block_size:
                raise ValueError(f"position {int(pos.max())} is beyond block_size {cfg.block_size}: learned "
                                 f"position embeddings do not exist there; crop the context instead")
        return pos, mask

    def _embed(self, idx, pos):
        """Token embeddings plus learned or sinusoidal positions -> x (B, T, C); rotary positions are
        applied inside attention instead, so they come back as (cos, sin) for the blocks."""
        cfg = self.config
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if cfg.pos_emb == "learned":
            x = x + self.transformer.wpe(pos)
        elif cfg.pos_emb == "sinusoidal":
            x = x + sinusoidal_embedding(pos, cfg.n_embd).to(x.dtype)
        else:
            rope = rope_cos_sin(pos, self.inv_freq)  # (B, 1, T, hs) each
        return self.transformer.drop(x), rope

    def _logits(self, x):
        """lm_head: (B, T, C) -> (B, T, V)."""
        if x.device.type == "cpu" and x.numel() > x.size(-1) and not torch.is_grad_enabled() \
                and type(self.lm_head) is nn.Linear:  # not a LoRALinear: its adapter is part of the head
            # CPU BLAS splits x @ W.T of a few rows across threads by row, so each thread streams all V x C
            # weights; W @ x.T splits by vocabulary and reads them once: 2-4x faster for the 2-8 rows of a
            # speculative check or a small batch (bench/results/generate_cpu.md). One row, and training
            # (with its backward pass), come out level or better with nn.Linear.
            return (self.lm_head.weight @ x.reshape(-1, x.size(-1)).T).T.contiguous().view(*x.shape[:-1], -1)
        return self.lm_head(x)

    def _check_input(self, idx, cache):
        cfg = self.config
        T = idx.size(1)
        if cache is None and T > cfg.block_size and (cfg.window is None or cfg.pos_emb == "learned"):
            raise ValueError(f"sequence of {T} tokens is longer than block_size {cfg.block_size}; crop it, "
                             f"or use a sliding-window model (window=...) with rope or sinusoidal positions")
        if idx.is_cuda:
            return  # reading min/max would stall the GPU every step; CUDA's own index assert fires instead
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}); got min {int(idx.min())}, "
                             f"max {int(idx.max())}")

    def new_cache(self, batch_size, max_len=None, dtype=None, device=None):
        """An empty KVCache for this model, by default in its weights' dtype and device."""
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, max_len, dtype or p.dtype, device or p.device)

    # -- bookkeeping ------------------------------------------------------------

    def num_params(self, non_embedding=True):
        """Parameter count; non_embedding drops position embeddings (the token embedding is shared with
        lm_head under tying, so it is counted once as the output layer, as nanoGPT does)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 L H Q T."""
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len

    def configure_optimizer(self, weight_decay, lr, betas=(0.9, 0.95), device_type="cpu"):
        """AdamW with weight decay on matrices only (biases and norm gains are not shrunk towards zero).
        The fused kernel (CUDA, and CPU since torch 2.4) is one pass over the parameters instead of a
        Python loop of small ops: 3.5x faster on CPU for GPT-2's width."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        fused = device_type.split(":")[0] in ("cuda", "cpu")
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)

    # -- weights in and out (the code is below the banner, with the rest of the plumbing) --

    @classmethod
    def from_pretrained(cls, name_or_path, cache_dir=None, dtype=None, **overrides):
        """'gpt2' | 'gpt2-medium' | 'gpt2-large' | 'gpt2-xl' (downloaded from the HF hub), an HF hub name of a
        Llama 3.x or Qwen2.5 model ('meta-llama/Llama-3.2-1B', 'Qwen/Qwen2.5-Math-1.5B', ...; downloaded
        once), a directory with an HF checkpoint of GPT-2, Llama or Qwen2 (config.json + safetensors, one
        file or shards with their index), or a checkpoint file written by save_checkpoint.
        dtype: the weights' dtype; None keeps the checkpoint's (bf16 stays bf16). overrides: GPTConfig fields."""
        if os.path.isfile(name_or_path):
            model = cls.from_checkpoint(name_or_path, **overrides)
        elif os.path.isdir(name_or_path) or is_hf_repo(name_or_path):
            directory = name_or_path if os.path.isdir(name_or_path) else download_hf_repo(name_or_path, cache_dir)
            kind = hf_model_type(directory)
            if kind in HF_ARCHS:
                return load_hf_llama(cls, directory, dtype, **overrides)
            model = load_hf_gpt2(cls, directory, **overrides)
        else:
            model = load_hf_gpt2(cls, name_or_path, cache_dir, **overrides)
        return model.to(dtype) if dtype is not None else model

    @classmethod
    def from_checkpoint(cls, path, map_location="cpu", **overrides):
        ckpt = load_checkpoint(path, map_location)
        model = cls(GPTConfig(**{**ckpt["config"], **overrides}))  # overrides: e.g. dropout for fine-tuning
        load_model_state(model, ckpt["model"], path)
        model.tokenizer_dump = ckpt.get("tokenizer")  # the run's bpe.Tokenizer.dumps(), when it recorded one
        return model

    def save_pretrained(self, directory, max_shard_size=None):
        """Write an HF directory that transformers loads with the same logits: GPT2LMHeadModel for the plain
        GPT-2 architecture, LlamaForCausalLM / Qwen2ForCausalLM for rope + rmsnorm + swiglu models (Qwen2 when
        q, k, v have biases). max_shard_size (bytes): split the weights into shards with an index file."""
        if hf_arch_of(self.config) is not None:
            save_hf_llama(self, directory, max_shard_size)
        else:
            save_hf_gpt2(self, directory)


# -----------------------------------------------------------------------------
# KV cache


class KVCache:
    """Keys and values of past tokens, preallocated per layer in the model's dtype and device.

    Linear cache (no window): column i holds the i-th token fed, for every row; rows of a left-padded
    batch differ only in `kpos`, the position each slot holds (-1 = padding / empty).
    Rolling cache (window): n_sink slots for the first positions, then a ring of `window` slots
    (position p goes to slot n_sink + (p - n_sink) % window), so memory stays constant however long the
    generation runs. New keys are attended together with the buffer and only then written into it, since
    a chunk of new tokens may overwrite slots that its own earlier queries still need.
    """

    def __init__(self, config, batch_size, max_len=None, dtype=torch.float32, device="cpu"):
        self.window, self.n_sink = config.window, config.n_sink
        self.rolling = config.window is not None
        if self.rolling:
            size = config.n_sink + config.window + 1  # the extra slot swallows writes nobody will read
        else:
            size = max_len or config.block_size
            if size > config.block_size:
                raise ValueError(f"cache length {size} exceeds block_size {config.block_size}; without a "
                                 f"sliding window the model cannot see further back than its context")
        shape = (batch_size, config.n_kv_head, size, config.head_dim)  # (B, nkv, size, hs)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.kpos = torch.full((batch_size, size), -1, dtype=torch.long, device=device)  # (B, size)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)  # per-row position counter
        self.length = 0  # linear cache: columns filled
        self.size = size

    def positions(self, valid):
        """Per-row positions of T new tokens; `valid` (B, T) is False for padding."""
        pos = self.next_pos[:, None] + valid.long().cumsum(1) - 1
        return pos.clamp(min=0)

    def prepare(self, pos, valid):
        """Called once per forward before the layers: the attention mask of the new queries."""
        T = pos.size(1)
        new_kpos = torch.where(valid, pos, -1)
        if self.rolling:
            kpos = torch.cat((self.kpos, new_kpos), dim=1)
            # keep a new key only if no later token of its row lands in the same ring slot
            last = (new_kpos.max(dim=1, keepdim=True).values)
            keep = valid & ((pos < self.n_sink) | (pos > last - self.window))
            slot = torch.where(pos < self.n_sink, pos, self.n_sink + (pos - self.n_sink) % self.window)
            self._slot = torch.where(keep, slot, self.size - 1)
        else:
            if self.length + T > self.size:
                raise ValueError(f"KV cache full: {self.length} + {T} tokens > {self.size} slots "
                                 f"(block_size); use a sliding-window model or a shorter generation")
            self.kpos[:, self.length:self.length + T] = new_kpos
            kpos = self.kpos[:, :self.length + T]
        self._new_kpos, self._valid = new_kpos, valid
        return build_mask(pos, kpos, self.window, self.n_sink)

    def update(self, layer, k, v):
        T = k.size(2)
        if self.rolling:
            k_all = torch.cat((self.k[layer], k), dim=2)
            v_all = torch.cat((self.v[layer], v), dim=2)
            idx = self._slot[:, None, :, None].expand_as(k)
            self.k[layer].scatter_(2, idx, k)
            self.v[layer].scatter_(2, idx, v)
            return k_all, v_all
        self.k[layer][:, :, self.length:self.length + T] = k
        self.v[layer][:, :, self.length:self.length + T] = v
        return self.k[layer][:, :, :self.length + T], self.v[layer][:, :, :self.length + T]

    def commit(self):
        """Called once per forward after the layers."""
        if self.rolling:
            self.kpos.scatter_(1, self._slot, self._new_kpos)
            self.kpos[:, -1] = -1
        else:
            self.length += self._new_kpos.size(1)
        self.next_pos += self._valid.long().sum(1)

    def crop(self, length):
        """Forget every column from `length` on (speculative decoding rolls back rejected tokens).
        Only for the linear cache, and only over columns that held real tokens in every row."""
        if self.rolling:
            raise ValueError("a rolling (sliding-window) cache cannot be cropped")
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of length {self.length} to {length}")
        self.next_pos -= self.length - length
        self.kpos[:, length:] = -1
        self.length = length




# =============================================================================
# Plumbing: everything below moves weights in and out or serves the scripts; the model is complete above.
# =============================================================================

# -----------------------------------------------------------------------------
# Weights in and out: OpenAI's GPT-2 in the HF layout

HF_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def load_hf_gpt2(cls, name_or_path, cache_dir=None, **overrides):
    """GPT.from_pretrained for HF GPT-2: a hub name (downloaded once) or a local HF directory -> model."""
    if os.path.isdir(name_or_path):
        directory = name_or_path
    elif name_or_path in HF_MODELS:
        directory = download_hf_model(name_or_path, cache_dir)
    else:
        raise ValueError(f"unknown model {name_or_path!r}: not a file or directory, and not one of "
                         f"{', '.join(HF_MODELS)}")
    with open(os.path.join(directory, "config.json")) as f:
        hf = json.load(f)
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"{directory}: activation {hf['activation_function']!r} is not GPT-2's gelu_new")
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        raise ValueError(f"{directory}: attention scaled otherwise than by 1/sqrt(head size) "
                         f"(scale_attn_weights / scale_attn_by_inverse_layer_idx) is not in gpt2.py")
    config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                       n_head=hf["n_head"], n_embd=hf["n_embd"], norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                       mlp_hidden=hf.get("n_inner"), tie_weights=hf.get("tie_word_embeddings", True), **overrides)
    model = cls(config)
    load_hf_state_dict(model, read_hf_weights(directory))
    return model


def load_hf_state_dict(model, hf_state):
    """Copy HF GPT-2 weights into model. HF stores c_attn / c_proj / c_fc as Conv1D, i.e. (in, out):
    transpose into nn.Linear's (out, in)."""
    state, tied = {}, model.config.tie_weights
    for key, value in hf_state.items():
        key = key.removeprefix("transformer.")
        if key.endswith((".attn.bias", ".attn.masked_bias")) or (key == "lm_head.weight" and tied):
            continue  # causal-mask buffers of old checkpoints; a tied lm_head is wte itself
        if key.endswith(".weight") and any(n in key for n in (".c_attn.", ".c_proj.", ".c_fc.")):
            value = value.t()
        state[key if key == "lm_head.weight" else "transformer." + key] = value
    ours = model.state_dict()
    missing = [k for k in ours if k not in state and not (k == "lm_head.weight" and tied)]
    unexpected = [k for k in state if k not in ours]
    if missing or unexpected:
        raise ValueError(f"HF weights do not fit this config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in state.items():
        if v.shape != ours[k].shape:
            raise ValueError(f"HF weight {k} has shape {tuple(v.shape)}, the model expects {tuple(ours[k].shape)}")
    with torch.no_grad():
        for k, v in state.items():
            ours[k].copy_(v)


def save_hf_gpt2(model, directory):
    """GPT.save_pretrained: config.json + model.safetensors in the layout of transformers' GPT2LMHeadModel."""
    cfg = model.config
    if (cfg.pos_emb, cfg.norm, cfg.mlp, cfg.window) != ("learned", "layernorm", "gelu", None) \
            or cfg.n_kv_head != cfg.n_head:
        raise ValueError("only the plain GPT-2 architecture (learned positions, layernorm, gelu, "
                         "multi-head attention, no window) exists in transformers' GPT-2, and only "
                         "rope + rmsnorm + swiglu without biases (Qwen2: on q, k, v only) in Llama / Qwen2")
    os.makedirs(directory, exist_ok=True)
    tensors = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_weights:
            continue
        if key.endswith(".weight") and any(n in key for n in (".c_attn.", ".c_proj.", ".c_fc.")):
            value = value.t()
        tensors[key] = value
    for key, value in list(tensors.items()):  # GPT-2 always has biases: zeros are the exact equivalent of none
        bias = key.removesuffix(".weight") + ".bias"
        if key.endswith(".weight") and not key.endswith(("wte.weight", "wpe.weight", "lm_head.weight")) \
                and bias not in tensors:  # never over a real one (qkv_bias without the others)
            tensors[bias] = torch.zeros(value.shape[-1] if value.dim() == 2 else value.shape[0], dtype=value.dtype)
    hf_config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
                 "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": cfg.n_embd,
                 "n_layer": cfg.n_layer, "n_head": cfg.n_head, "layer_norm_epsilon": cfg.norm_eps,
                 "activation_function": "gelu_new", "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                 "n_inner": cfg.mlp_hidden, "tie_word_embeddings": cfg.tie_weights}
    eot = 50256 if cfg.vocab_size > 50256 else None  # GPT-2's <|endoftext|>, if the vocabulary has it
    hf_config.update(bos_token_id=eot, eos_token_id=eot)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    write_safetensors(os.path.join(directory, "model.safetensors"), tensors)


# -----------------------------------------------------------------------------
# safetensors by hand: 8-byte little-endian header length, a JSON header {name: {dtype, shape,
# data_offsets}}, then the raw bytes of every tensor.

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def read_safetensors(path):
    data = bytearray(os.path.getsize(path))  # writable, so torch.frombuffer can share it without copying
    with open(path, "rb") as f:
        f.readinto(data)
    if len(data) < 8:
        raise ValueError(f"{path} is not a safetensors file (truncated)")
    (n,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8:8 + n])
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt safetensors header ({e}); delete it and download again") from e
    body = memoryview(data)[8 + n:]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        if end > len(body):
            raise ValueError(f"{path} is truncated ({len(body)} data bytes, tensor {name} ends at {end}); "
                             f"delete it and download again")
        dtype = _ST_DTYPES[info["dtype"]]
        t = torch.frombuffer(body[start:end], dtype=dtype) if end > start else torch.empty(0, dtype=dtype)
        tensors[name] = t.reshape(info["shape"])
    return tensors


def write_safetensors(path, tensors):
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        dtype = next(k for k, v in _ST_DTYPES.items() if v == t.dtype)
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format asks for an 8-byte aligned body
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for raw in blobs:
            f.write(raw)
    os.replace(tmp, path)


def read_hf_weights(directory):
    st, pt = os.path.join(directory, "model.safetensors"), os.path.join(directory, "pytorch_model.bin")
    if os.path.exists(st):
        return read_safetensors(st)
    if os.path.exists(pt):
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{directory} has neither model.safetensors nor pytorch_model.bin")


# -----------------------------------------------------------------------------
# Weights in and out: Llama 3.x and Qwen2.5 in the HF layout
#
# Both are this file's GPT with pos_emb="rope", norm="rmsnorm", mlp="swiglu" and grouped-query attention.
# What differs is in config.json: Qwen2 puts biases on q, k and v (nowhere else) and ties the embeddings
# of its small models; Llama 3.1+ stretches its rotary frequencies (rope_scaling); widths, rope_theta and
# the norm's epsilon vary. HF keeps q, k, v and gate, up as separate matrices where GPT fuses them into
# c_attn and c_fc: every HF tensor has a slot, a block of rows of one of our parameters, so each shard of
# an 8B model is copied into place on its own and never more than one shard sits in memory beside the model.

HF_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
HF_MODERN_MODELS = ("meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.1-8B",
                    "Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-3B", "Qwen/Qwen2.5-7B",
                    "Qwen/Qwen2.5-Math-1.5B")  # and their -Instruct versions: what the loader is tested for
_HF_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_hf_repo(name):
    """An HF hub repository name, owner/name, that is not a local path.
    is_hf_repo("Qwen/Qwen2.5-0.5B") -> True; is_hf_repo("gpt2") -> False"""
    parts = str(name).split("/")
    return (len(parts) == 2 and all(parts) and not name.startswith(".") and not os.path.exists(name)
            and not name.endswith((".pt", ".bin", ".safetensors", ".json")))  # a missing file, not a model


def hf_model_type(directory):
    """The architecture an HF directory holds: 'gpt2', 'llama' or 'qwen2', else a clear error."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} has no config.json: not an HF model directory")
    with open(path) as f:
        kind = json.load(f).get("model_type", "gpt2")
    if kind != "gpt2" and kind not in HF_ARCHS:
        raise ValueError(f"{directory}: architecture {kind!r} is not supported; gpt2.py loads gpt2, "
                         f"{', '.join(HF_ARCHS)} (Llama 3.x, Qwen2 / Qwen2.5)")
    return kind


def hf_config_to_gpt(hf, **overrides):
    """config.json of an HF Llama / Qwen2 model (as a dict) -> GPTConfig. Accepts both the hub's layout
    (rope_theta, rope_scaling) and transformers 5's (rope_parameters).
    {"model_type": "qwen2", "hidden_size": 896, "num_attention_heads": 14, "num_key_value_heads": 2, ...}
    -> GPTConfig(n_embd=896, n_head=14, n_kv_head=2, qkv_bias=True, pos_emb="rope", norm="rmsnorm", ...)"""
    kind = hf.get("model_type")
    if kind not in HF_ARCHS:
        raise ValueError(f"architecture {kind!r} is not supported here; valid: {', '.join(HF_ARCHS)}")
    rope = dict(hf.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or rope
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"rope scaling {rope_type!r} is not supported; gpt2.py has Llama 3's ('llama3') only")
    scaling = {k: scaling[k] for k in ROPE_SCALING_KEYS} if rope_type == "llama3" else None
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim", n_embd // n_head) != n_embd // n_head:
        raise ValueError(f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads: not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"activation {hf['hidden_act']!r}: only SwiGLU (silu) is supported")
    if hf.get("mlp_bias") or hf.get("attention_bias"):
        raise ValueError("Llama with attention_bias / mlp_bias is not supported (no Llama 3 uses them)")
    if hf.get("use_sliding_window"):
        raise ValueError("Qwen2 with use_sliding_window is not supported (no Qwen2.5 model uses it)")
    config = dict(block_size=hf["max_position_embeddings"], vocab_size=hf["vocab_size"],
                  n_layer=hf["num_hidden_layers"], n_head=n_head, n_embd=n_embd,
                  n_kv_head=hf.get("num_key_value_heads") or n_head, bias=False, qkv_bias=kind == "qwen2",
                  pos_emb="rope", rope_base=float(theta), rope_scaling=scaling, norm="rmsnorm",
                  norm_eps=hf["rms_norm_eps"], mlp="swiglu", mlp_hidden=hf["intermediate_size"],
                  tie_weights=bool(hf.get("tie_word_embeddings", False)))
    return GPTConfig(**{**config, **overrides})


def hf_arch_of(config):
    """'qwen2' or 'llama' if the config is exactly one of them (so it can be exported), else None."""
    layout = (config.pos_emb, config.norm, config.mlp, config.bias, config.window)
    if layout != ("rope", "rmsnorm", "swiglu", False, None):
        return None
    return "qwen2" if config.qkv_bias else "llama"


def hf_slots(config):
    """Where each HF tensor goes: {HF name: (our parameter name, (first row, end row) or None = all)}.
    hf_slots(cfg)["model.layers.0.self_attn.k_proj.weight"] -> ("transformer.h.0.attn.c_attn.weight", (q, q + kv))"""
    nh, nkv, hs = config.n_head, config.n_kv_head, config.head_dim
    hidden = mlp_width(config)
    q, kv = nh * hs, nkv * hs
    slots = {"model.embed_tokens.weight": ("transformer.wte.weight", None),
             "model.norm.weight": ("transformer.ln_f.weight", None)}
    if not config.tie_weights:
        slots["lm_head.weight"] = ("lm_head.weight", None)
    for i in range(config.n_layer):
        h, o = f"model.layers.{i}.", f"transformer.h.{i}."
        slots[h + "input_layernorm.weight"] = (o + "ln_1.weight", None)
        slots[h + "post_attention_layernorm.weight"] = (o + "ln_2.weight", None)
        for part in ("weight", "bias") if config.qkv_bias else ("weight",):
            for name, rows in (("q", (0, q)), ("k", (q, q + kv)), ("v", (q + kv, q + 2 * kv))):
                slots[h + f"self_attn.{name}_proj.{part}"] = (o + f"attn.c_attn.{part}", rows)
        slots[h + "self_attn.o_proj.weight"] = (o + "attn.c_proj.weight", None)
        slots[h + "mlp.gate_proj.weight"] = (o + "mlp.c_fc.weight", (0, hidden))
        slots[h + "mlp.up_proj.weight"] = (o + "mlp.c_fc.weight", (hidden, 2 * hidden))
        slots[h + "mlp.down_proj.weight"] = (o + "mlp.c_proj.weight", None)
    return slots


def hf_weight_files(directory):
    """The weight files of an HF directory: the shards its model.safetensors.index.json names, in order,
    else model.safetensors, else pytorch_model.bin."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(directory, s) for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.exists(os.path.join(directory, name)):
            return [os.path.join(directory, name)]
    raise FileNotFoundError(f"{directory} has no model.safetensors.index.json, model.safetensors or pytorch_model.bin")


def load_hf_llama(cls, directory, dtype=None, **overrides):
    """GPT.from_pretrained for HF Llama / Qwen2 directories. The model is built on the meta device (no memory,
    no random init), given uninitialised storage in the final dtype, and every tensor of every shard is copied
    into its slot; a tensor nobody expects, a slot nobody fills or a shape mismatch is an error."""
    with open(os.path.join(directory, "config.json")) as f:
        hf = json.load(f)
    config = hf_config_to_gpt(hf, **overrides)
    if dtype is None:  # the checkpoint's dtype: bf16 weights stay bf16
        dtype = _HF_DTYPES.get(hf.get("torch_dtype") or hf.get("dtype"), torch.float32)
    with torch.device("meta"):
        model = cls(config)
    model = model.to(dtype).to_empty(device="cpu")
    if config.tie_weights:  # to_empty gives every parameter its own new storage: tie the head again
        model.lm_head.weight = model.transformer.wte.weight
    # rotary frequencies stay float32 whatever the weights' dtype (bf16 would round them)
    model.inv_freq = rope_frequencies(config.head_dim, config.rope_base, config.rope_scaling)
    params, slots, filled = dict(model.named_parameters()), hf_slots(config), set()
    for path in hf_weight_files(directory):
        state = read_safetensors(path) if path.endswith(".safetensors") else \
            torch.load(path, map_location="cpu", weights_only=True)
        for name, tensor in state.items():
            if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and config.tie_weights):
                continue  # a buffer of old checkpoints; a tied head is the embedding itself
            if name not in slots:
                raise ValueError(f"{path}: tensor {name!r} has no place in this config ({hf['model_type']}, "
                                 f"{config.n_layer} layers); is config.json from the same model?")
            target, rows = slots[name]
            dst = params[target].data if rows is None else params[target].data[rows[0]:rows[1]]
            if dst.shape != tensor.shape:
                raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, config.json implies "
                                 f"{tuple(dst.shape)}")
            dst.copy_(tensor)
            filled.add(name)
        del state
    missing = sorted(set(slots) - filled)
    if missing:
        raise ValueError(f"{directory}: the weight files lack {len(missing)} tensors, e.g. {missing[:3]} "
                         f"(an incomplete download? delete the directory and download again)")
    model.hf_config, model.hf_dir = hf, directory  # for export (bos / eos ids), and its tokenizer for the scripts
    return model


def save_hf_llama(model, directory, max_shard_size=None):
    """GPT.save_pretrained for Llama / Qwen2: config.json in the hub's layout + safetensors (sharded with an
    index when larger than max_shard_size bytes), every tensor cut back out of its slot."""
    cfg, kind = model.config, hf_arch_of(model.config)
    params = dict(model.named_parameters())
    tensors = {}
    for name, (target, rows) in hf_slots(cfg).items():
        p = params[target].detach()
        tensors[name] = (p if rows is None else p[rows[0]:rows[1]]).contiguous()
    dtype = next(k for k, v in _HF_DTYPES.items() if v == model.lm_head.weight.dtype)
    hf = {"architectures": [HF_ARCHS[kind]], "model_type": kind, "vocab_size": cfg.vocab_size,
          "hidden_size": cfg.n_embd, "intermediate_size": mlp_width(cfg),
          "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head,
          "head_dim": cfg.head_dim, "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
          "rope_theta": cfg.rope_base,
          "rope_scaling": {"rope_type": "llama3", **cfg.rope_scaling} if cfg.rope_scaling else None,
          "hidden_act": "silu", "tie_word_embeddings": cfg.tie_weights, "torch_dtype": dtype,
          "attention_dropout": 0.0, "initializer_range": 0.02}
    if kind == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    else:
        hf.update(use_sliding_window=False, sliding_window=None)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # carried over from the loaded model, if any
        hf[key] = getattr(model, "hf_config", {}).get(key)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    write_hf_shards(directory, tensors, max_shard_size)


def write_hf_shards(directory, tensors, max_shard_size=None):
    """model.safetensors, or (above max_shard_size bytes) model-0000i-of-0000n.safetensors plus
    model.safetensors.index.json {"metadata": {"total_size": bytes}, "weight_map": {tensor: file}}."""
    sizes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    total = sum(sizes.values())
    if max_shard_size is None or total <= max_shard_size:
        write_safetensors(os.path.join(directory, "model.safetensors"), tensors)
        return
    shards, size = [{}], 0
    for k, t in tensors.items():
        if shards[-1] and size + sizes[k] > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += sizes[k]
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(directory, name), shard)
        weight_map.update(dict.fromkeys(shard, name))
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


# -----------------------------------------------------------------------------
# Downloads: bpe.download (requests + tqdm, cached, resumable through an HTTP Range into a .part file,
# size-checked) is the project's one downloader; it lives in bpe.py because that file must not need torch.


def download(url, path, **kwargs):
    """bpe.download, so that every script downloads through gpt2.download; bpe is imported only here.
    download("https://huggingface.co/.../config.json", "~/.cache/.../config.json") -> Path of the file"""
    import bpe
    return bpe.download(url, path, **kwargs)


def cache_dir(sub=""):
    root = os.environ.get("LLM_SCRATCH_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "llm-from-scratch"))
    path = os.path.join(root, sub)
    os.makedirs(path, exist_ok=True)
    return path


def download_hf_model(name, cache_root=None):
    """OpenAI's GPT-2 weights from the HF hub -> the folder holding config.json + model.safetensors.
    download_hf_model("gpt2") -> '~/.cache/llm-from-scratch/hf/gpt2'"""
    import bpe
    directory = os.path.join(cache_root or cache_dir("hf"), name)
    base = f"https://huggingface.co/openai-community/{name}/resolve/main/"
    try:
        download(base + "config.json", os.path.join(directory, "config.json"))
        download(base + "model.safetensors", os.path.join(directory, "model.safetensors"), desc=f"{name} weights")
    except bpe.DownloadError as e:  # name both files: the message of the first alone would send a user back twice
        raise bpe.DownloadError(f"{e}\n{name} needs config.json and model.safetensors from "
                                f"https://huggingface.co/openai-community/{name} in {directory} (or give the "
                                f"folder that holds them instead of {name!r})") from None
    return directory


HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "model.safetensors.index.json", "model.safetensors")


def download_hf_repo(repo, cache_root=None):
    """An HF hub model, e.g. 'Qwen/Qwen2.5-0.5B', into <cache>/hf/<repo>: config, tokenizer and safetensors
    (every shard of the index). Each file resumes where a broken download stopped; a complete copy is used
    without network. Gated models (Llama) need their licence accepted on huggingface.co and HF_TOKEN set;
    HF_ENDPOINT points to a mirror of the hub, as in HF's own tools.
    download_hf_repo("Qwen/Qwen2.5-0.5B") -> '~/.cache/llm-from-scratch/hf/Qwen/Qwen2.5-0.5B'"""
    directory = os.path.join(cache_root or cache_dir("hf"), repo)
    try:  # complete already: no network needed
        if os.path.exists(os.path.join(directory, "config.json")) and \
                all(map(os.path.exists, hf_weight_files(directory))):
            return directory
    except FileNotFoundError:
        pass
    import bpe
    import requests  # only needed to list the repository's files
    token, hub = os.environ.get("HF_TOKEN"), os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        r = requests.get(f"{hub}/api/models/{repo}", headers=headers, timeout=60)
    except requests.RequestException as e:
        raise bpe.DownloadError(f"cannot reach {hub} to list {repo} ({e.__class__.__name__}); without "
                                f"network, download the repository elsewhere and pass its directory") from None
    if r.status_code in (401, 403, 404):
        raise bpe.DownloadError(f"{repo}: HTTP {r.status_code} from the HF hub: no such model, or a gated one "
                                f"(Llama): accept its licence on huggingface.co and set HF_TOKEN")
    if r.status_code >= 400:
        raise bpe.DownloadError(f"{repo}: HTTP {r.status_code} from {hub}; try again later, or pass a downloaded "
                                f"folder")
    names = [s["rfilename"] for s in r.json().get("siblings", [])]
    wanted = [n for n in names if n in HF_FILES or (n.endswith(".safetensors") and "/" not in n)]
    if "config.json" not in wanted or not any(n.endswith(".safetensors") for n in wanted):
        raise bpe.DownloadError(f"{repo} has no config.json + safetensors weights on the HF hub")
    for name in wanted:
        download(f"{hub}/{repo}/resolve/main/{name}", os.path.join(directory, name),
                 headers=headers, desc=f"{repo}/{name}")
    return directory


# -----------------------------------------------------------------------------
# Checkpoints: written to a temp file and renamed (a crash never leaves half a file), read with
# weights_only=True (no arbitrary code from a pickle), and checked against the model they load into.


def save_checkpoint(path, model, state=None, **extra):
    """Model weights (or `state`, e.g. the gathered weights of an FSDP model) + config + whatever the caller adds
    (optimizer, step, ...)."""
    while hasattr(model, "_orig_mod") or hasattr(model, "module"):  # unwrap torch.compile and DDP, any order
        model = getattr(model, "_orig_mod", None) or model.module
    ckpt = {"format": "llm-from-scratch", "version": 1, "config": asdict(model.config),
            "model": model.state_dict() if state is None else state, **extra}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch's own text for a file that is no zip would suggest weights_only=False
        with open(path, "rb") as f:
            zip_start = f.read(4) == b"PK\x03\x04"  # torch.save's zip begins so, even when cut short
        is_zip = zipfile.is_zipfile(path)
        if is_zip or zip_start:
            why = f"{e.__class__.__name__}: {str(e).splitlines()[0][:200]}" if is_zip else "the zip archive ends early"
            raise ValueError(f"checkpoint {path} is corrupt or truncated, or not one of this project ({why}); "
                             f"delete it or point to another one") from e
        # any other file (a text file, a legacy pickle) was given by mistake: never advise deleting it
        raise ValueError(f"{path} is not a checkpoint (not the zip archive torch.save writes); give the ckpt.pt "
                         f"a training script of this project wrote") from e
    if isinstance(ckpt, dict) and ckpt.get("format") == "llm-from-scratch-lora":
        raise ValueError(f"{path} is a LoRA adapter, not a model: load the merged ckpt.pt written beside it, or put "
                         f"it on its base model with gpt2.load_adapter")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint written by this project (no model/config entries)")
    unknown = sorted(set(ckpt["config"]) - set(GPTConfig.__dataclass_fields__))
    if unknown:  # e.g. char_gpt.py's checkpoints, whose config holds its training settings too
        raise ValueError(f"{path} is not a gpt2.py model checkpoint (its config has {', '.join(unknown[:3])}); "
                         f"char_gpt.py checkpoints load only in char_gpt.py (--resume, --sample)")
    return ckpt


RUN_PLACE = ("device", "dtype", "compile", "stop_after", "resume", "out_dir")  # what --resume may change


def tokenizer_of(model, where="the checkpoint"):
    """The tokenizer a loaded model speaks: its HF folder's (Llama 3 / Qwen2.5), the one its checkpoint recorded
    (bytes, a bpe.py BPE), else GPT-2's. `where` names the checkpoint in errors; a tokenizer with more ids than
    the model has rows is one (a ValueError), since its ids would index past the embedding.
    tokenizer_of(GPT.from_pretrained("out/task-base/ckpt.pt")).encode("hi") -> [104, 105]"""
    import bpe
    rows = model.config.vocab_size
    if getattr(model, "hf_dir", None):
        tok = bpe.load_hf_tokenizer(model.hf_dir)
    elif getattr(model, "tokenizer_dump", None):
        tok = bpe.Tokenizer.loads(model.tokenizer_dump, source=f"{where} (tokenizer)")
    else:  # written before checkpoints recorded their tokenizer: GPT-2's, if the vocabulary is GPT-2's
        tok = bpe.load_gpt2()
        if tok.n_vocab > rows:
            raise ValueError(f"{where} records no tokenizer, and GPT-2's {tok.n_vocab} ids do not fit its vocabulary "
                             f"of {rows}; give a checkpoint written by this project's scripts (moe.py's renumber "
                             f"GPT-2's ids to the text's: load those with moe.load_model)")
    if tok.n_vocab > rows:
        raise ValueError(f"{where}: the tokenizer has {tok.n_vocab} ids, more than the model's vocabulary of {rows}")
    return tok


# The pipeline's checkpoints (the presets' --init and --reward-model), each with the command that writes it:
# a missing one is named with its command. The two arithmetic tasks go base -> SFT -> reward model.
MADE_BY = {
    **{f"out/{t}-base/ckpt.pt": f"python train_gpt2.py --preset {t}" for t in ("task", "task-columns")},
    **{f"out/{t}-sft/ckpt.pt": f"python sft.py --preset {t}   (after: python train_gpt2.py --preset {t})"
       for t in ("task", "task-columns")},
    **{f"out/{t}-rm/ckpt.pt": f"python reward_model.py --preset {t}   (after: python sft.py --preset {t})"
       for t in ("task", "task-columns")},
    **{f"out/task-rm-{p}/ckpt.pt": f"python reward_model.py --pairs {p} --out-dir out/task-rm-{p}"
       for p in ("samples", "both")},
    "out/gpt2-alpaca/ckpt.pt": "python sft.py --preset gpt2-alpaca",
    "out/gpt2-polite-rm/ckpt.pt": "python reward_model.py --preset gpt2-dpo --method rm --out-dir out/gpt2-polite-rm"
                                  "   (after: python sft.py --preset gpt2-alpaca)",
}


def load_with_tokenizer(init):
    """--init of a post-training script -> (model, tokenizer, checkpoint or None). A checkpoint of this project
    brings the tokenizer it recorded (so every stage encodes as the one before); gpt2 names and folders come
    with GPT-2's tokenizer; Llama 3 / Qwen2.5 names and folders bring their own, loaded as fp32 master weights
    (autocast computes in --dtype). A missing pipeline checkpoint is named with the command that writes it
    (MADE_BY). Every failure is a ValueError that names the fix."""
    ckpt = None
    if os.path.isfile(init):
        ckpt = load_checkpoint(init)
        model = GPT.from_checkpoint(init)
    elif init in HF_MODELS or os.path.isdir(init) or is_hf_repo(init):
        import bpe
        try:
            model = GPT.from_pretrained(init, dtype=torch.float32)
        except bpe.DownloadError as e:  # offline, most often: the message says where to put the files
            raise ValueError(f"--init {init}: {e}") from None
    elif init in MADE_BY:
        raise ValueError(f"no model at {init}; make it with:\n    {MADE_BY[init]}")
    else:
        raise ValueError(f"--init {init!r}: not a checkpoint file, an HF folder, an HF Llama / Qwen name, or one "
                         f"of {', '.join(HF_MODELS)}")
    return model, tokenizer_of(model, init), ckpt  # tokenizer_of: a ValueError if it does not fit the model


def given_flags(argv=None):
    """The settings a command line names, as argparse dests (argv: sys.argv[1:] when None). The scripts' parsers
    take no abbreviations, so a flag is always spelled out; --no-x names x too.
    given_flags(["--lr", "1e-3", "--dtype=bfloat16", "--no-compile"]) -> {"lr", "dtype", "no_compile", "compile"}"""
    given = set()
    for a in map(str, sys.argv[1:] if argv is None else argv):
        if a == "--":  # what follows is a value, not a flag
            break
        if a.startswith("--"):
            k = a[2:].split("=")[0].replace("-", "_")
            given |= {k, k[3:]} if k.startswith("no_") else {k}
    return given


def resume_settings(args, script, marker, argv=None):
    """--resume for the post-training scripts: -> (args, checkpoint), or (args, None) without --resume. A resumed
    run takes its own settings from the checkpoint, except where it runs and when it stops (RUN_PLACE: given on
    the command line, they win), so a resumed run trains exactly as the uninterrupted one would; flags in `argv`
    (the command line) that ask for another value are named in a note. A missing checkpoint, or one whose
    settings lack `marker` (a flag every run of `script` records: the --out-dir of another script's run), is an
    error naming the fix."""
    if not args.resume:
        return args, None
    path = os.path.join(args.out_dir, "ckpt.pt")
    if not os.path.exists(path):
        raise SystemExit(f"{script}: error: --resume: no checkpoint at {path}; run without --resume to start")
    ckpt = load_checkpoint(path)
    if marker not in ckpt.get("args", {}):
        raise SystemExit(f"{script}: error: --resume: {path} was not written by {script} (another script's run?); "
                         f"give the --out-dir of a run of {script}")
    saved = ckpt["args"]
    given = given_flags(argv)
    unused = [f"--{k.replace('_', '-')} {getattr(args, k)!r} (the run's: {saved[k]!r})" for k in sorted(given)
              if k in saved and k not in RUN_PLACE and getattr(args, k, saved[k]) != saved[k]]
    if unused:
        print(f"{script}: --resume goes on with the run's own settings; not used: {', '.join(unused)}; to change "
              f"them, start a new run in another --out-dir")
    place = {k: getattr(args, k) for k in RUN_PLACE}
    for k in ("device", "dtype", "compile"):  # the run's own unless the command line names another: a bf16 run
        if k in saved and k not in given:     # resumed without --dtype stays bf16
            place[k] = saved[k]
    return argparse.Namespace(**{**saved, **place}), ckpt


def load_model_state(model, state, path="checkpoint"):
    """load_state_dict, with an error that says what does not match instead of a silent partial load."""
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state))
    unexpected = sorted(set(state) - set(ours))
    shapes = [f"{k}: {tuple(state[k].shape)} vs model {tuple(ours[k].shape)}"
              for k in ours if k in state and state[k].shape != ours[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                         f"shape mismatches {shapes[:5]}; was it written with another config?")
    model.load_state_dict(state)


# -----------------------------------------------------------------------------
# Helpers every script shares


def pick_device(name="auto"):
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA GPU is visible; use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("--device mps asked for, but MPS is not available; use --device cpu or auto")
    return name


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_dtype(name, device):
    """auto: bf16 on a GPU that has it, else fp16 (with a grad scaler) on CUDA, else fp32.
    On CPU and MPS auto means fp32: mixed precision there is slower or less reliable than it is worth."""
    if name == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def autocast(device, dtype):
    """Mixed precision for the forward pass: weights stay fp32, matmuls run in dtype."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def grad_scaler(device, dtype):
    """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none."""
    return torch.amp.GradScaler(device.split(":")[0], enabled=dtype == torch.float16)


def restore_scaler(scaler, state):
    """--resume: a checkpoint's grad-scaler state back into scaler. A run trained without fp16 saved an empty
    state (load_state_dict refuses it): resumed in fp16, it keeps the fresh scaler's initial scale."""
    if state:
        scaler.load_state_dict(state)


def maybe_compile(model, enabled):
    return torch.compile(model) if enabled else model


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    """torch's random generators for an exact --resume: the CPU one, and the GPU's (dropout and sampling on a
    GPU draw from the device's generator, not the CPU's) when CUDA is in use or on MPS.
    rng_state() -> {"cpu": ByteTensor(5056), "cuda": ByteTensor(16)}  (no "cuda" on a CPU-only run)"""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state):
    """Restores rng_state()'s generators (a bare CPU state, as older checkpoints hold, works too)."""
    state = state if isinstance(state, dict) else {"cpu": state}
    torch.set_rng_state(state["cpu"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"].cpu())


def epoch_order(n, seed, epoch):
    """The order of n rows in epoch `epoch`: a permutation seeded with (seed, epoch). A loader that reads rows
    in this order keeps no state but its step, so a resumed run sees the rows the uninterrupted one would.
    epoch_order(4, seed=0, epoch=0) -> a permutation of [0, 1, 2, 3], the same at every call"""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


def batch_rows(step, n, batch_size, seed):
    """Row indices of batch `step` when every epoch takes the n rows in epoch_order and cuts them into batches
    of batch_size (an epoch's last, incomplete batch is dropped). batch_rows(4, 10, 3, 0) == epoch_order(10, 0,
    1)[3:6]: step 4 is the second batch of epoch 1."""
    epoch, i = divmod(step, n // batch_size)
    return epoch_order(n, seed, epoch)[i * batch_size:(i + 1) * batch_size]


def lr_at(step, max_lr, warmup_steps, max_steps, min_lr_ratio=0.1):
    """Linear warmup, then cosine decay to min_lr_ratio * max_lr at max_steps."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return max_lr * min_lr_ratio
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return max_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def warmup_note(warmup_steps, max_steps):
    """A note for a warmup as long as the run (its learning rate never reaches the peak, nor decays), else "".
    warmup_note(50, 30) -> "note: --warmup-steps 50 >= --max-steps 30: the learning rate never reaches --lr ..."
    """
    if warmup_steps < max_steps:
        return ""
    return (f"note: --warmup-steps {warmup_steps} >= --max-steps {max_steps}: the learning rate never reaches --lr "
            f"and never decays")


PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


def peak_flops(device):
    """Dense bf16 tensor-core peak of the GPU, or None where unknown (CPU, MPS, other GPUs)."""
    if not str(device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def add_common_args(parser, **defaults):
    """The flags that mean the same thing in every script."""
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="where to run; auto = cuda, else mps, else cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="compute dtype; auto = bfloat16 (or float16) on CUDA, float32 elsewhere")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=defaults.get("compile", False),
                        help="torch.compile the model")
    parser.add_argument("--seed", type=int, default=defaults.get("seed", 1337), help="random seed")
    return parser


class MetricsLog:
    """<out_dir>/metrics.jsonl: one JSON object per logged step; plot() draws the loss curves."""

    def __init__(self, out_dir, resume_step=None):
        """A fresh log, or (resume_step=N) the existing one without the rows logged after step N: a resumed
        run repeats those steps, so keeping them would draw every step past the checkpoint twice."""
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.path = out_dir, os.path.join(out_dir, "metrics.jsonl")
        kept = [] if resume_step is None else [r for r in self.read(out_dir) if r["step"] <= resume_step]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)

    def log(self, **row):
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    @staticmethod
    def read(out_dir):
        """The rows of <out_dir>/metrics.jsonl ([] when there is none)."""
        path = os.path.join(out_dir, "metrics.jsonl")
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [json.loads(line) for line in f]

    def plot(self, title="loss"):
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None  # optional: no plot without matplotlib
        rows = self.read(self.out_dir)
        fig, ax = plt.subplots(figsize=(7, 4))
        smoothed = any(r.get("train_loss_ema") is not None for r in rows)
        for key in ("train_loss", "train_loss_ema", "val_loss"):
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if pts:  # with a smoothed curve, the raw per-step loss is only a faint band behind it
                faint = key == "train_loss" and smoothed
                ax.plot(*zip(*pts), label=key.replace("_", " "), marker="o" if key == "val_loss" else None,
                        alpha=0.3 if faint else 1.0, linewidth=0.8 if faint else 1.5)
        ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.set_title(title), ax.legend(), ax.grid(alpha=0.3)
        out = os.path.join(self.out_dir, "loss.png")
        fig.savefig(out, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return out

    @staticmethod
    def plot_grid(out_dir, keys, filename, title, titles=None, cols=4):
        """One small panel per metric in keys against the step (the signals an RL run is watched by) ->
        <out_dir>/filename, or None without matplotlib. titles renames panels: {"kl": "KL to the reference"}."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        rows = MetricsLog.read(out_dir)
        fig, axes = plt.subplots(-(-len(keys) // cols), cols, figsize=(3.7 * cols, 3 * -(-len(keys) // cols)))
        for ax, key in zip(axes.flat, keys):
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o" if key == "accuracy" else None, linewidth=1.2)
            ax.set_title((titles or {}).get(key, key.replace("_", " "))), ax.grid(alpha=0.3)
        fig.suptitle(title)
        fig.tight_layout()
        out = os.path.join(out_dir, filename)
        fig.savefig(out, dpi=90)
        plt.close(fig)
        return out


# -----------------------------------------------------------------------------
# Sharded data parallel (FSDP2): for models whose weights, gradients and AdamW state do not fit one GPU (Llama
# 3.1 8B in fp32 with AdamW needs ~128 GB). PyTorch's fully_shard splits every parameter of each Block across
# the processes that torchrun starts and all-gathers a block's weights only while it runs (forward, then again
# backward), reduce-scattering its gradients so each process updates only its own shard.
#     torchrun --nproc_per_node 8 sft.py --fsdp --init meta-llama/Llama-3.1-8B ...


def init_distributed(device):
    """Under torchrun (RANK and WORLD_SIZE set): join the process group, NCCL on CUDA (one GPU per process)
    and gloo on CPU, and return (rank, world_size, device); outside torchrun, (0, 1, device).
    init_distributed("cuda") on the 3rd of 8 processes -> (2, 8, "cuda:2")"""
    import torch.distributed as dist
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank = dist.get_rank()
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
        torch.cuda.set_device(device)
    return rank, dist.get_world_size(), device


def end_distributed():
    """Under torchrun: wait until every process is done (process 0 may still be writing the checkpoint and plot),
    then leave the process group. A process that exits while the others still talk to it dies with
    'terminate called without an active exception'. Outside torchrun: nothing."""
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def fsdp_shard(model):
    """Shard a GPT in place with FSDP2: each Block is one unit (gathered for its own forward / backward), the
    embeddings, final norm and head the root unit. The model keeps its class, names and call; its parameters
    become DTensors, each process holding 1 / world_size of every one."""
    from torch.distributed.fsdp import fully_shard
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    return model


def full_state_dict(model):
    """The unsharded weights of an FSDP model, on CPU, for save_checkpoint: every process must call it (it
    gathers), process 0 receives the weights, the others {}. A model that is not sharded: its state_dict()."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    if hasattr(model, "reshard"):  # a forward without backward (evaluation) leaves the root unit gathered
        model.reshard()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# -----------------------------------------------------------------------------
# Post-training: LoRA and batched sampling
#
# LoRA (Hu et al., 2021): a frozen Linear W plus a trainable low-rank update, y = x W^T + (alpha / r) x A^T B^T
# with A (r, in) random and B (out, r) zero, so a fresh adapter changes nothing; training moves r * (in + out)
# numbers per layer instead of in * out, and merging W + (alpha / r) B A gives back a plain model.

LORA_TARGETS = ("c_attn", "c_proj", "c_fc")  # every Linear of attention and MLP; "attn.c_proj" names one


class LoRALinear(nn.Module):
    """A Linear with a low-rank adapter. It keeps the wrapped layer's weight and bias (frozen) under the same
    names, so a base model's state dict loads into the adapted model unchanged; the adapter adds lora_A and
    lora_B next to them."""

    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as in the paper's code
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x):
        update = self.lora_dropout(x) @ self.lora_A.to(x.dtype).T @ self.lora_B.to(x.dtype).T  # (B, T, out)
        return F.linear(x, self.weight, self.bias) + self.scale * update

    def merged(self):
        """The plain nn.Linear with W + (alpha / r) B A."""
        out_f, in_f = self.weight.shape
        # skip_init: no random initialisation to overwrite, and the global RNG stays untouched (exact resume)
        lin = torch.nn.utils.skip_init(nn.Linear, in_f, out_f, bias=self.bias is not None, device=self.weight.device,
                                       dtype=self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight.float() + self.scale * (self.lora_B.float() @ self.lora_A.float()))
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin


def _lora_sites(model, targets):
    """(parent module, attribute name, full name) of every Linear whose name ends with one of targets."""
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, (nn.Linear, LoRALinear)) and any(full == t or full.endswith("." + t) for t in targets):
                yield module, child_name, full


def add_lora(model, r=8, alpha=16, targets=LORA_TARGETS, dropout=0.0):
    """Freeze every weight of `model` and wrap the target Linears with rank-r adapters; returns the model.
    The logits do not change until training moves lora_B away from zero.
    add_lora(GPT(GPTConfig.from_preset("gpt2")), r=8): 1,179,648 trainable of 125M (0.9%)"""
    if r < 1:
        raise ValueError(f"LoRA rank r must be >= 1, got {r}")
    for p in model.parameters():
        p.requires_grad_(False)
    sites = list(_lora_sites(model, targets))
    if not sites:
        raise ValueError(f"no Linear layer matches the LoRA targets {list(targets)}; valid names end with "
                         f"c_attn, c_proj, c_fc (e.g. attn.c_proj) or lm_head")
    for parent, attr, _ in sites:
        if isinstance(getattr(parent, attr), LoRALinear):
            raise ValueError("the model already has LoRA adapters; merge_lora() first to stack another")
        setattr(parent, attr, LoRALinear(getattr(parent, attr), r, alpha, dropout))
    model.lora = dict(r=r, alpha=alpha, targets=list(targets), dropout=dropout)  # checkpoints record this
    return model


def merge_lora(model):
    """Fold every adapter into its weight (W += (alpha / r) B A): a plain model of the original layout, every
    parameter trainable again, for export and for the next stage. Returns the model."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
                if module is model and child_name == "lm_head" and getattr(model.config, "tie_weights", False):
                    model.config.tie_weights = False  # W + BA is no longer the embedding: the head is its own
    for p in model.parameters():
        p.requires_grad_(True)
    model.__dict__.pop("lora", None)
    return model


def lora_state_dict(model):
    """The adapter weights alone (lora_A / lora_B of every wrapped layer): what a LoRA checkpoint needs on
    top of its base model, ~1% of the model's size."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A" in k or ".lora_B" in k}


def load_lora_state(model, state, path="adapter"):
    """Load lora_state_dict()'s output into a model that add_lora() prepared the same way."""
    ours = lora_state_dict(model)
    if set(ours) != set(state) or any(ours[k].shape != state[k].shape for k in ours):
        raise ValueError(f"{path} does not fit this model's adapters ({len(state)} tensors vs {len(ours)}; "
                         f"first keys {sorted(set(state) ^ set(ours))[:3]}): use the same r and targets")
    model.load_state_dict(state, strict=False)


def save_adapter(path, model, **extra):
    """A checkpoint that holds the adapter alone (+ its r / alpha / targets and the model config): load it onto
    the same base with load_adapter. Written to a temp file and renamed, like save_checkpoint."""
    ckpt = {"format": "llm-from-scratch-lora", "version": 1, "config": asdict(model.config), "lora": model.lora,
            "adapter": lora_state_dict(model), **extra}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_adapter(model, path):
    """add_lora(model) with the settings saved at `path`, then its weights; returns the model."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "adapter" not in ckpt:
        raise ValueError(f"{path} is not an adapter checkpoint (written by save_adapter)")
    if ckpt["config"] != asdict(model.config):
        raise ValueError(f"{path} was trained on another base model (config {ckpt['config']})")
    add_lora(model, **ckpt["lora"])
    load_lora_state(model, ckpt["adapter"], path)
    return model


# Batched sampling: what RL rollouts (ppo.py, grpo.py) and evaluation (sft.py) need from the KV cache, and
# the loop generate.py's full inference lesson builds on: a batch of left-padded prompts of different
# lengths, each row stopping at its own end-of-text, and the log-probability of every token drawn.


def top_k_filter(logits, k):
    """Keep the k largest logits of each row (ties with the k-th too); the rest become -inf.
    [1, 5, 3, 4], k=2 -> [-inf, 5, -inf, 4]."""
    if k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits, p):
    """Keep the smallest set of most likely tokens whose probabilities sum to >= p (nucleus sampling).
    log [0.5, 0.2, 0.15, 0.1, 0.05], p=0.6 -> the first two kept, the rest -inf."""
    if p >= 1:
        return logits  # float rounding in the cumsum would otherwise drop a few tail tokens
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    drop = probs.cumsum(dim=-1) - probs >= p  # the tokens before this one already reach p
    drop[..., 0] = False  # the most likely token always stays
    return logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))


def draw(probs, generator=None):
    """One token per row of probs (..., V), by inverse CDF: a uniform number looked up in the running sum.
    The distribution of torch.multinomial, ~15x faster over 50,257 tokens on a CPU (one pass, no sort); rows
    need not be normalized, and a one-hot row gives its token exactly. [0, 0.5, 0, 0.5] -> 1 or 3.
    The sum runs in float64 (where the device has it) so that tokens of tiny probability keep their share."""
    cdf = probs.to(torch.float32 if probs.device.type == "mps" else torch.float64).cumsum(dim=-1)
    u = torch.rand(cdf.shape[:-1] + (1,), device=cdf.device, dtype=cdf.dtype, generator=generator) * cdf[..., -1:]
    # right=True: the first index whose running sum exceeds u, so a token of probability 0 is never drawn
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.size(-1) - 1).squeeze(-1)


def left_pad(seqs, pad_id=0, device=None):
    """Lists of token ids -> (idx (B, T), attention_mask (B, T)), padded on the left so that every row's
    next token goes in the last column. left_pad([[5, 6], [7]]) -> ([[5, 6], [0, 7]], [[1, 1], [0, 1]])"""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("every prompt needs at least one token")
    T = max(map(len, seqs))
    idx = torch.tensor([[pad_id] * (T - len(s)) + list(s) for s in seqs], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (T - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long, device=device)
    return idx, mask


def decode(forward, idx, max_new_tokens, pick, *, attention_mask=None, eos_id=None, sync=False):
    """The generation loop, as a generator of one step at a time. forward(tokens (B, t), valid (B, t)) ->
    the logits (B, V) after them: called once with the whole prompt (the prefill), then with each new token.
    pick(logits (B, V)) -> the next tokens (B,). Yields (tokens (B,), live (B,), logits (B, V)) per step;
    live is False for rows that had already ended with eos_id (their token is eos_id, else 0). Stops after
    max_new_tokens steps or once every row has ended; the last tokens are never fed back.
    sample() below runs it on the KV cache; generate.py adds penalties, min-p, the no-cache path and more.
    sync: the processes of an FSDP model decode different prompts but must run the same forward passes (each
    gathers weights from all of them): they stop when every row of every process has ended."""
    valid = torch.ones_like(idx, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if not valid[:, -1].all() or (valid.long().diff(dim=1) < 0).any():
        raise ValueError("attention_mask must be left padding: zeros first, then ones, ending with a token in "
                         "every row (build the batch with gpt2.left_pad)")
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    pad = eos_id if eos_id is not None else 0
    logits = forward(idx, valid)
    for i in range(max_new_tokens):
        live = ~done
        nxt = torch.where(live, pick(logits), pad)
        yield nxt, live, logits
        if eos_id is not None:
            done = done | (nxt == eos_id)
        finished = done.all()
        if sync and eos_id is not None:  # every process must take the same number of steps
            finished = finished.int()
            torch.distributed.all_reduce(finished, op=torch.distributed.ReduceOp.MIN)
        if i == max_new_tokens - 1 or (eos_id is not None and bool(finished)):  # no sync without eos_id
            return
        logits = forward(nxt[:, None], live[:, None])  # finished rows' tokens may be fed as padding


@torch.no_grad()
def sample(model, idx, max_new_tokens, *, attention_mask=None, temperature=1.0, top_k=None, top_p=None,
           eos_id=None, generator=None, vocab_size=None, sync=False):
    """Continue a batch of prompts with the KV cache: one prefill pass, then one token per step.

    idx (B, T) prompts, left-padded, with attention_mask (B, T) (0 = padding); temperature 0 is greedy. A row
    stops after its first eos_id; the loop stops when every row has, or after max_new_tokens (fewer if the
    context ends first). Returns (tokens, mask, logprobs), each (B, N): the new tokens (eos_id, else 0, after a
    row's end), True for the tokens a row really generated (its end-of-text included), and their
    log-probabilities under softmax(logits / temperature) before top-k / top-p (raw logits when greedy): the
    numbers PPO and GRPO compare with their training forward pass. The model runs in eval mode. vocab_size
    (the tokenizer's n_vocab) keeps the rows a model's embedding table has past its tokenizer (train_gpt2.py
    rounds it up to a multiple of 64) from ever being drawn; the training pass must slice its logits the same.
    idx, mask = left_pad([[5, 6], [7]])
    sample(model, idx, 4, attention_mask=mask, eos_id=256) -> tokens (2, <=4), mask (2, <=4), logprobs (2, <=4)
    sync: under FSDP, every process samples until all have finished (see decode)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    T = idx.size(1)
    n = min(max_new_tokens, model.config.block_size - T)
    if sync:  # prompts padded to different lengths on different processes: the same number of steps anyway
        n = torch.tensor(n, device=idx.device)
        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MIN)
        n = int(n)
    if n < 1:
        raise ValueError(f"prompts of {T} tokens leave no room in the context (block_size "
                         f"{model.config.block_size}); shorten them")
    was_training = model.training
    model.eval()
    cache = model.new_cache(idx.size(0), max_len=T + n)

    def forward(tokens, valid):  # finished rows go in as padding
        return model(tokens, cache=cache, attention_mask=valid, last_logits_only=True)[0][:, -1, :vocab_size].float()

    def scaled(logits):
        return logits / temperature if temperature > 0 else logits

    def pick(logits):
        if temperature == 0:
            return logits.argmax(dim=-1)
        logits = scaled(logits)
        logits = top_k_filter(logits, top_k) if top_k else logits
        logits = top_p_filter(logits, top_p) if top_p is not None else logits
        return draw(logits.softmax(dim=-1), generator)

    tokens, masks, logprobs = [], [], []
    for nxt, live, logits in decode(forward, idx, n, pick, attention_mask=attention_mask, eos_id=eos_id, sync=sync):
        logprobs.append(scaled(logits).log_softmax(dim=-1).gather(-1, nxt[:, None]).squeeze(-1) * live)
        tokens.append(nxt)
        masks.append(live)
    model.train(was_training)
    return torch.stack(tokens, 1), torch.stack(masks, 1), torch.stack(logprobs, 1)


# -----------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="gpt2 | gpt2-medium | ... | HF directory | checkpoint")
    parser.add_argument("--prompt", default="Hello, I'm a language model,", help="text to complete (with --model)")
    add_common_args(parser)
    args = parser.parse_args()
    if args.model is None:
        for name in PRESETS:
            with torch.device("meta"):
                m = GPT(GPTConfig.from_preset(name))
            print(f"{name:12s} {m.num_params() / 1e6:8.1f}M parameters (non-embedding)")
        model = GPT(GPTConfig.from_preset("tiny"))
        logits, _ = model(torch.zeros(1, 8, dtype=torch.long))
        print(f"tiny forward: logits {tuple(logits.shape)}")
        return
    seed_everything(args.seed)
    device = pick_device(args.device)
    import bpe
    try:
        model = GPT.from_pretrained(args.model).to(device).eval()
    except bpe.DownloadError as e:  # offline: the message says which files to fetch and where they go
        raise SystemExit(f"gpt2.py: error: {e}")
    try:
        tok = tokenizer_of(model, args.model)  # a Llama / Qwen folder's, a checkpoint's own, else GPT-2's
    except ValueError as e:  # e.g. a checkpoint that records no tokenizer and is not GPT-2's size
        raise SystemExit(f"gpt2.py: error: {e}")
    idx = torch.tensor([tok.encode(args.prompt)], device=device)
    cache = model.new_cache(1, max_len=idx.size(1) + 31)  # Llama 3.1's 131k-token context would not fit
    with torch.no_grad():
        logits, _ = model(idx, cache=cache, last_logits_only=True)
        out = []
        for _ in range(30):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(int(nxt))
            logits, _ = model(nxt, cache=cache)
    print(args.prompt + tok.decode(out))


if __name__ == "__main__":
    main()
