"""
bpe.py -- a byte-level BPE tokenizer from scratch, identical to tiktoken's GPT-2 encoding.

What it teaches, in the order the code is written:
  1. pre-tokenization: a regex splits text into chunks (words, numbers, punctuation, spaces),
     and BPE never merges across chunks;
  2. byte pair encoding: a chunk starts as its UTF-8 bytes and adjacent pairs are merged,
     lowest rank first, until no known pair is left;
  3. training: merge the most frequent pair over all chunks, again and again, with incremental
     pair counts and a lazy max-heap;
  4. the Tokenizer: train, encode (with special tokens), decode, save and load.
  ---- sections 1-4 are the whole tokenizer; what follows makes it fast and connects it ----
  5. speed and scale: the split run by Python's faster `re`, a heap merge for long chunks, and
     chunk counting that streams files of any size through several processes;
  6. file formats: OpenAI's GPT-2 files (encoder.json + vocab.bpe) and tiktoken's rank files
     (`<base64 token> <rank>` per line), loaded and exported; today's open models: HF's tokenizer.json
     (Qwen2 / Qwen2.5, Llama 3 on the hub) and Meta's Llama 3 rank file with its pattern and specials;
  7. download: resumable and checksummed;
  8. encoding text files into flat uint16 token files for training;
  9. post-training text: the one prompt template (ids + loss mask), the JSONL data formats, and a
     generated arithmetic task with its verifier, shared by sft.py and the files after it; the chat
     templates of Qwen (ChatML) and Llama 3 (ids + loss mask), and a boxed-answer verifier for MATH;
  10. the command line.

Run it:
  python bpe.py                                            # demo on the bundled tiny Shakespeare
  python bpe.py train --input data/tinyshakespeare.txt --vocab-size 1024 --output out/shakes.bpe
  python bpe.py encode --tokenizer gpt2 --input data/tinyshakespeare.txt --output data/shakes.bin
  echo "hello world" | python bpe.py encode --tokenizer gpt2      # -> 31373 995 198
  python bpe.py decode --tokenizer gpt2 31373 995
  python bpe.py export --tokenizer out/shakes.bpe --output out/shakes.tiktoken

Use it:
  import bpe
  tok = bpe.load_gpt2()                       # data/gpt2/, downloaded when missing
  tok.encode("hello world")                   # [31373, 995], same as tiktoken.get_encoding("gpt2")
  tok.encode("<|endoftext|>", allowed_special="all")   # [50256]
  bpe.encode_file(tok, "data/tinyshakespeare.txt", "data/shakes.bin")   # uint16 token file

Depends on the standard library, numpy, tqdm, requests (downloads only) and regex.
"""

import argparse
import base64
import functools
import hashlib
import heapq
import json
import multiprocessing
import os
import random
import re
import sys
import time
import unicodedata
from collections import Counter, deque
from decimal import Decimal
from itertools import chain, repeat
from pathlib import Path

import numpy as np
import regex
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
ENDOFTEXT = "<|endoftext|>"

# -----------------------------------------------------------------------------
# 1. Pre-tokenization

# The split patterns of GPT-2 (OpenAI's encoder.py) and GPT-4 (tiktoken's cl100k_base, verbatim),
# in the `regex` module's syntax. Alternatives, first match wins: contractions, a letter run, a
# number, a punctuation run (each may take one leading space), then whitespace, which leaves its
# last space to the word after it. GPT-4 changes: contractions in any case, numbers of at most 3
# digits, newlines kept out of words, trailing whitespace (\s++$) one chunk. tests/test_bpe.py
# checks that both split every text exactly as tiktoken's own gpt2 and cl100k_base encodings do.
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT4_SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
# Today's open models took GPT-4's pattern with small changes: Llama 3 keeps it as it is (without the
# possessive quantifiers and \s++$ alternative of tiktoken's spelling); Qwen2 splits numbers into single digits.
LLAMA3_SPLIT_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN2_SPLIT_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
PATTERNS = {"gpt2": GPT2_SPLIT_PATTERN, "gpt4": GPT4_SPLIT_PATTERN, "llama3": LLAMA3_SPLIT_PATTERN,
            "qwen2": QWEN2_SPLIT_PATTERN, "none": ""}
_SPLITTERS = {}  # pattern -> compiled split function, one per process


def get_splitter(pattern):
    r"""Return a function text -> list of chunks for a split pattern ("" means: the text is one chunk).

    >>> get_splitter(GPT2_SPLIT_PATTERN)("Hello world!! It's 2024\n")
    ['Hello', ' world', '!!', ' It', "'s", ' 2024', '\n']
    >>> get_splitter(GPT4_SPLIT_PATTERN)("Hello world!! It's 2024\n")
    ['Hello', ' world', '!!', ' It', "'s", ' ', '202', '4', '\n']
    """
    if pattern not in _SPLITTERS:
        if pattern == "":
            _SPLITTERS[pattern] = lambda text: [text] if text else []
        else:  # the GPT patterns run with the faster `re` where it can (section 5), same chunks
            _SPLITTERS[pattern] = _re_splitter(pattern) or regex.compile(pattern).findall
    return _SPLITTERS[pattern]


# -----------------------------------------------------------------------------
# 2. Byte pair encoding of one chunk

_NO_MERGE = 1 << 62  # larger than any token id


def bpe_merge(ids, ranks, max_rank=None):
    """Merge a chunk's token ids the way tiktoken does: repeatedly merge the adjacent pair whose
    merged token has the lowest rank (= id), the leftmost one on ties. `ranks` maps an id pair to
    the id of its concatenation; pairs that make a rank >= max_rank are not merged. Returns a new list.

    >>> bpe_merge([97, 98, 99], {(97, 98): 256, (256, 99): 257})   # a b c -> ab c -> abc
    [257]
    >>> bpe_merge([99, 97, 98], {(97, 98): 256, (99, 97): 257})    # ab (256) ranks before ca (257)
    [99, 256]
    """
    if len(ids) > 48:  # this loop is O(n^2): long chunks take the heap version (section 5)
        return _bpe_merge_long(ids, ranks, max_rank)
    ids = list(ids)
    # "no merge" is a huge int rather than float("inf"): comparing ints with ints is faster
    inf = max_rank if max_rank is not None else _NO_MERGE
    get = ranks.get
    rs = list(map(get, zip(ids, ids[1:]), repeat(inf)))  # rs[k]: rank of the pair (ids[k], ids[k+1])
    while rs:
        best = min(rs)
        if best >= inf:
            break
        i = rs.index(best)
        ids[i] = best
        del ids[i + 1], rs[i]  # only the two pairs next to the merge change
        if i:
            rs[i - 1] = get((ids[i - 1], best), inf)
        if i < len(rs):
            rs[i] = get((best, ids[i + 1]), inf)
    return ids


def encode_chunk(b, token_id, byte_ids, ranks):
    """The token ids of one chunk's utf-8 bytes `b`: its token if it is one, else bpe_merge of its
    bytes' ids. `token_id` maps bytes to ids, `byte_ids[x]` is the id of the byte x.

    >>> tid = {bytes([x]): x for x in range(256)} | {b"ab": 256}
    >>> encode_chunk(b"ab", tid, range(256), {}), encode_chunk(b"cab", tid, range(256), {(97, 98): 256})
    ((256,), (99, 256))
    """
    t = token_id.get(b)
    if t is not None:  # tiktoken's shortcut: a chunk that is a token is never split
        return (t,)
    return tuple(bpe_merge(list(map(byte_ids.__getitem__, b)), ranks))


# -----------------------------------------------------------------------------
# 3. Training: learn the merges

def _merge_word(w, a, b, z):
    """Replace every adjacent (a, b) in w by z, left to right.

    >>> _merge_word([1, 2, 3, 1, 2, 2], 1, 2, 9)
    [9, 3, 9, 2]
    """
    out, i, n = [], 0, len(w)
    while i < n:
        if i + 1 < n and w[i] == a and w[i + 1] == b:
            out.append(z)
            i += 2
        else:
            out.append(w[i])
            i += 1
    return out


def train_merges(counts, n_merges, verbose=False):
    """Learn up to n_merges merges from {chunk: count}. Returns (merges, vocab).

    Each step merges the most frequent adjacent pair over all chunks (weighted by chunk count).
    Ties go to the pair with the smallest (first id, second id), so the result is deterministic
    and independent of the order of `counts`. Recounting every pair after each merge would cost
    a pass over all chunks per merge; instead only the chunks that contain the merged pair are
    revisited (`where` remembers them) and the best pair comes from a lazy max-heap: a popped
    entry whose count is out of date is pushed back with the current count.

    >>> merges, vocab = train_merges({"ab": 3, "abc": 1}, 2)   # "ab" 4 times, then "ab"+"c" once
    >>> merges, vocab[257]
    ([(97, 98, 256), (256, 99, 257)], b'abc')
    """
    words = [list(c.encode("utf-8")) for c in counts]
    freqs = list(counts.values())
    pair_counts, where = Counter(), {}
    for wi, (w, f) in enumerate(zip(words, freqs)):
        for p in zip(w, w[1:]):
            pair_counts[p] += f
            where.setdefault(p, set()).add(wi)
    heap = [(-c, a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)
    vocab = {i: bytes([i]) for i in range(256)}
    token_id = {b: i for i, b in vocab.items()}
    merges = []
    bar = tqdm(total=n_merges, desc="merging", disable=not verbose)
    while len(merges) < n_merges and heap:
        neg, a, b = heapq.heappop(heap)
        count = pair_counts.get((a, b), 0)
        if count != -neg:  # stale entry
            if count > 0:
                heapq.heappush(heap, (-count, a, b))
            continue
        merged = vocab[a] + vocab[b]
        z = token_id.get(merged)
        if z is None:  # (rarely, two different pairs spell the same bytes: reuse that token)
            z = len(vocab)
            vocab[z], token_id[merged] = merged, z
        merges.append((a, b, z))
        bar.update()
        new_pairs = set()
        for wi in where.pop((a, b)):
            w = words[wi]
            nw = _merge_word(w, a, b, z)
            if len(nw) == len(w):  # this chunk lost the pair to an earlier merge
                continue
            f = freqs[wi]
            for p in zip(w, w[1:]):
                pair_counts[p] -= f
            for p in zip(nw, nw[1:]):
                pair_counts[p] += f
                if z in p:
                    new_pairs.add(p)
                    where.setdefault(p, set()).add(wi)
            words[wi] = nw
        del pair_counts[(a, b)]
        for p in new_pairs:  # new pairs only grow during a step: push their final counts
            heapq.heappush(heap, (-pair_counts[p], p[0], p[1]))
    bar.close()
    return merges, vocab


# -----------------------------------------------------------------------------
# 4. The tokenizer

def render_token(b):
    r"""Token bytes as readable text for the .vocab file: control characters escaped, bytes that
    are not UTF-8 shown as U+FFFD.

    >>> print(render_token(b"\n\tx\xe2"))
    \n\tx�
    """
    s = b.decode("utf-8", errors="replace")
    return "".join(ch if ch.isprintable() and ch != "\\" else repr(ch)[1:-1] for ch in s)


class Tokenizer:
    """A byte-level BPE tokenizer with tiktoken's behaviour.

    vocab:    {id: bytes} of the mergeable tokens; every single byte must be one of them.
    merges:   [(a, b, id)] in training order: token `id` was made by joining tokens a and b.
    pattern:  "gpt2", "gpt4", "none" or a `regex` pattern string.
    special_tokens: {name: id}, ids outside the mergeable vocabulary.
    normalize: None, or a unicodedata form ("NFC") applied to text before it is split (Qwen2 does).
    Encoding needs only `vocab`: a pair of adjacent tokens merges when their concatenation is a
    token, lowest id first (that is tiktoken's rule). `merges` is the history, for saving and reading.

    >>> tok = Tokenizer("gpt4").train("hug hugs pug pugs hugged hug", 260)
    >>> tok.merges                      # "ug", "h"+"ug", " "+"hug", " "+"p"
    [(117, 103, 256), (104, 256, 257), (32, 257, 258), (32, 112, 259)]
    >>> tok.encode("hugs"), tok.decode([257, 115])
    ([257, 115], 'hugs')
    """

    def __init__(self, pattern="gpt2", vocab=None, merges=None, special_tokens=None, normalize=None):
        self.pattern = PATTERNS.get(pattern, pattern)
        try:  # a typo in a custom pattern fails here, not later in a worker process
            get_splitter(self.pattern)
        except regex.error as e:
            raise ValueError(f"pattern {pattern!r} is not one of {', '.join(PATTERNS)} nor a valid regex "
                             f"({e})") from None
        if normalize not in (None, "NFC", "NFD", "NFKC", "NFKD"):
            raise ValueError(f"normalize must be None or a unicodedata form (NFC, NFD, NFKC, NFKD), got {normalize!r}")
        self.normalize = normalize
        self.vocab = dict(vocab) if vocab is not None else {i: bytes([i]) for i in range(256)}
        self.merges = list(merges or [])
        self.special_tokens = {}
        self._build()
        self.register_special_tokens(special_tokens or {})

    def _build(self):
        self.token_id = {b: i for i, b in self.vocab.items()}
        if len(self.token_id) != len(self.vocab):
            raise ValueError("two token ids have the same bytes; a vocabulary must be unique")
        missing = [b for b in range(256) if bytes([b]) not in self.token_id]
        if missing:
            raise ValueError(f"byte-level BPE needs all 256 single bytes as tokens; missing {missing[:5]}")
        self.byte_ids = [self.token_id[bytes([b])] for b in range(256)]
        # every way to split a token into two tokens; tiktoken merges any of them
        get, self.pair_ranks = self.token_id.get, {}
        for t, b in self.vocab.items():
            for k in range(1, len(b)):
                a, c = get(b[:k]), get(b[k:])
                if a is not None and c is not None:
                    self.pair_ranks[(a, c)] = t
        self._cache = _ChunkCache(self.token_id, self.byte_ids, self.pair_ranks)

    def register_special_tokens(self, special_tokens):
        """Add special tokens, {name: id}; ids must not be used by any other token.

        >>> tok = Tokenizer("gpt2", special_tokens={"<|x|>": 300})
        >>> tok.encode("a<|x|>", allowed_special="all"), tok.n_vocab
        ([97, 300], 301)
        """
        for name, i in special_tokens.items():
            if not isinstance(name, str) or not name or not isinstance(i, int) or i < 0:
                raise ValueError(f"special token {name!r}: {i!r} must be a non-empty str and an id >= 0")
            if i in self.vocab or (i in self.special_tokens.values() and self.special_tokens.get(name) != i):
                raise ValueError(f"special token {name!r} has id {i}, which another token already uses")
            self.special_tokens[name] = i
        self._special_by_id = {i: n.encode("utf-8") for n, i in self.special_tokens.items()}
        self._special_re = {}

    @property
    def n_vocab(self):
        return max(chain(self.vocab, self.special_tokens.values())) + 1

    @property
    def eot_token(self):
        """The end-of-document id: <|endoftext|> (GPT-2, Qwen2), or Llama 3's <|end_of_text|>."""
        for name in (ENDOFTEXT, "<|end_of_text|>"):
            if name in self.special_tokens:
                return self.special_tokens[name]
        raise ValueError(f"this tokenizer has no {ENDOFTEXT} token; train or load it with "
                         f"special_tokens={{'{ENDOFTEXT}': id}}")

    # --- encoding

    def encode_ordinary(self, text):
        """Encode text, treating special-token text as ordinary text.

        >>> Tokenizer("gpt2").encode_ordinary("hi <|endoftext|>")[:4]   # no merges: the bytes
        [104, 105, 32, 60]
        """
        if self.normalize:
            text = unicodedata.normalize(self.normalize, text)
        split = get_splitter(self.pattern)
        # text repeats its chunks (words) all the time: each unique chunk is merged once and remembered.
        # The cache encodes a chunk it does not hold yet when it is looked up (_ChunkCache, section 5),
        # so one pass over the chunks does it all, in C except for the new chunks.
        cache = self._cache
        try:
            if len(text) < 1 << 18:
                return list(chain.from_iterable(map(cache.__getitem__, split(text))))
            ids = []
            # a long text in pieces cut where the chunks stay the same (_pieces, section 5): split at once,
            # its millions of chunks make one young list that the garbage collector walks again and again
            # while new chunks fill the cache
            can_cut = self.pattern in (GPT2_SPLIT_PATTERN, GPT4_SPLIT_PATTERN)
            for piece in _pieces(text, 1 << 17, can_cut):
                ids += chain.from_iterable(map(cache.__getitem__, split(piece)))
            return ids
        except UnicodeEncodeError:  # lone surrogates: tiktoken replaces them with U+FFFD
            fixed = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return self.encode_ordinary(fixed)

    def _specials_regex(self, names):
        key = frozenset(names)
        if key not in self._special_re:
            # longest first, so that a special token that contains another one wins
            alts = "|".join(re.escape(n) for n in sorted(key, key=len, reverse=True))
            self._special_re[key] = re.compile(f"({alts})")
        return self._special_re[key]

    def encode(self, text, *, allowed_special=frozenset(), disallowed_special="all"):
        """Encode text like tiktoken's Encoding.encode.

        allowed_special: "all" or a set of special-token names to encode as their special ids.
        disallowed_special: "all" (every special not allowed) or a set; their text raises
        ValueError. Pass disallowed_special=() to encode such text as ordinary text.

        >>> tok = Tokenizer("gpt2", special_tokens={ENDOFTEXT: 256})
        >>> tok.encode("hi<|endoftext|>", allowed_special="all")
        [104, 105, 256]
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}; decode bytes first")
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        disallowed = set(self.special_tokens) - allowed if disallowed_special == "all" else set(disallowed_special)
        if disallowed and (m := self._specials_regex(disallowed).search(text)):
            raise ValueError(
                f"Encountered text corresponding to disallowed special token {m.group()!r}. Pass "
                f"allowed_special={{{m.group()!r}}} (or 'all') to encode it as a special token, or "
                f"disallowed_special=() to encode it as normal text.")
        allowed &= set(self.special_tokens)
        if not allowed:
            return self.encode_ordinary(text)
        ids = []
        for i, part in enumerate(self._specials_regex(allowed).split(text)):
            if i % 2:  # re.split with a group: odd parts are the separators
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.encode_ordinary(part))
        return ids

    def encode_batch(self, texts, **kwargs):
        """Encode a list of texts (one process; for big data use encode_file).

        >>> Tokenizer("gpt2").encode_batch(["a", "bc"])
        [[97], [98, 99]]
        """
        return [self.encode(t, **kwargs) for t in texts]

    # --- decoding

    def decode_bytes(self, ids):
        r"""Ids to the bytes they stand for.

        >>> Tokenizer("gpt2").decode_bytes([104, 105, 0xE2])
        b'hi\xe2'
        """
        try:
            return b"".join(map(self._decode_one, ids))
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]!r} is not in this tokenizer's vocabulary "
                             f"(ids 0..{self.n_vocab - 1})") from None

    def _decode_one(self, i):
        b = self.vocab.get(i)
        return b if b is not None else self._special_by_id[i]

    def decode(self, ids):
        r"""Ids to text; bytes that are not valid UTF-8 become U+FFFD, as in tiktoken.

        >>> Tokenizer("gpt2").decode([104, 105, 0xE2])
        'hi\ufffd'
        """
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # --- training (the algorithm is train_merges, section 3)

    def train(self, data, vocab_size, *, special_tokens=(), processes=1, verbose=False):
        """Learn merges from `data`: a str (the text itself) or a list of file paths.

        vocab_size counts the 256 bytes, the merges and the special tokens (names, given ids
        right after the merges). Special-token text separates documents and is never merged.
        Returns self (see the class docstring for an example)."""
        specials = list(special_tokens)
        n_merges = vocab_size - 256 - len(specials)
        if n_merges < 0:
            raise ValueError(f"vocab_size {vocab_size} is below 256 bytes + {len(specials)} special tokens")
        t0 = time.time()
        # {chunk: count} over the text split at special tokens; count_chunks (section 5) streams
        # files of any size through `processes` processes to get it
        counts = count_chunks(data, self.pattern, specials, processes=processes, verbose=verbose,
                              normalize=self.normalize)  # trained on the text as it will be encoded
        t1 = time.time()
        if not counts:
            custom = ("" if self.pattern in PATTERNS.values()
                      else f" (or the pattern {self.pattern!r} matches none of it)")
            raise ValueError(f"the training input is empty{custom}: give it some text")
        merges, vocab = train_merges(counts, n_merges, verbose=verbose)
        t2 = time.time()
        self.vocab, self.merges, self.special_tokens = vocab, merges, {}
        self._build()
        self.register_special_tokens({s: len(vocab) + k for k, s in enumerate(specials)})
        self.train_stats = {"unique_chunks": len(counts), "chunks": sum(counts.values()),
                            "merges": len(merges), "count_s": t1 - t0, "merge_s": t2 - t1}
        if verbose:
            s = self.train_stats
            print(f"trained: {s['chunks']:,} chunks ({s['unique_chunks']:,} unique), {s['merges']:,} merges; "
                  f"counting {s['count_s']:.1f}s, merging {s['merge_s']:.1f}s")
        if len(merges) < n_merges:
            print(f"warning: only {len(merges)} merges were possible (asked for {n_merges}): "
                  f"the text is too small for this vocab_size", file=sys.stderr)
        return self

    # --- saving and loading

    def dumps(self):
        """The tokenizer as text (version, pattern, byte ids, specials, merges in order): what save()
        writes and what a checkpoint records, so that every later stage encodes exactly the same way.

        >>> tok = Tokenizer("none", special_tokens={ENDOFTEXT: 256})
        >>> print(tok.dumps(), end="")
        bpe v1
        pattern ""
        bytes identity
        specials 1
        "<|endoftext|>" 256
        merges 0
        >>> Tokenizer.loads(tok.dumps()).special_tokens
        {'<|endoftext|>': 256}
        """
        identity = self.byte_ids == list(range(256))
        lines = ["bpe v1", f"pattern {json.dumps(self.pattern)}"]
        lines += [f"normalize {self.normalize}"] if self.normalize else []  # only when set: older files stay valid
        lines += ["bytes identity" if identity else "bytes " + " ".join(map(str, self.byte_ids)),
                 f"specials {len(self.special_tokens)}"]
        lines += [f"{json.dumps(n)} {i}" for n, i in self.special_tokens.items()]
        lines.append(f"merges {len(self.merges)}")
        lines += [f"{a} {b} {i}" for a, b, i in self.merges]
        return "\n".join(lines) + "\n"

    @classmethod
    def loads(cls, text, source="<string>"):
        """The tokenizer that dumps() wrote as `text`; errors name `source` and the line.
        Tokenizer.loads(tok.dumps()) encodes exactly like tok (example in dumps)."""
        lines = text.splitlines()
        pos = 0

        def take(prefix):
            nonlocal pos
            if pos >= len(lines) or not lines[pos].startswith(prefix):
                raise ValueError(f"{source}:{pos + 1}: expected a line starting with {prefix!r}; the file "
                                 f"is not a bpe.py tokenizer or is corrupt (re-create it with save())")
            pos += 1
            return lines[pos - 1][len(prefix):]
        try:
            if take("bpe v") != "1":
                raise ValueError(f"{source}: unsupported version")
            pattern = json.loads(take("pattern "))
            normalize = take("normalize ") if pos < len(lines) and lines[pos].startswith("normalize ") else None
            byte_spec = take("bytes ")
            byte_ids = list(range(256)) if byte_spec == "identity" else [int(x) for x in byte_spec.split()]
            if sorted(byte_ids) != sorted(set(byte_ids)) or len(byte_ids) != 256:
                raise ValueError(f"{source}: the bytes line must hold 256 distinct ids")
            specials = {}
            for _ in range(int(take("specials "))):
                name, i = take("").rsplit(" ", 1)
                specials[json.loads(name)] = int(i)
            vocab = {i: bytes([b]) for b, i in enumerate(byte_ids)}
            merges = []
            for _ in range(int(take("merges "))):
                a, b, i = map(int, take("").split())
                merged = vocab[a] + vocab[b]
                if vocab.setdefault(i, merged) != merged:
                    raise ValueError(f"{source}:{pos}: merge {a} {b} -> {i} contradicts an earlier token {i}")
                merges.append((a, b, i))
            if any(line.strip() for line in lines[pos:]):
                raise ValueError(f"{source}:{pos + 1}: unexpected lines after the {len(merges)} merges")
        except (ValueError, KeyError, json.JSONDecodeError) as e:
            if isinstance(e, ValueError) and str(e).startswith(str(source)):
                raise  # already names the place and the fix
            raise ValueError(f"{source}:{pos}: corrupt tokenizer file ({e!r}); re-create it with save()") from None
        return cls(pattern, vocab, merges, specials, normalize)

    def save(self, path):
        """Write dumps() to `path` and a human-readable rendering of every token next to it, with
        suffix .vocab: `tok.save("out/t.bpe")` -> out/t.bpe and out/t.vocab, whose lines read
        `[h][ug] -> [hug] 257` for a merged token and `[<|endoftext|>] 260 (special)`."""
        path = Path(path)
        if path.suffix == ".vocab":  # the listing would overwrite the tokenizer itself
            raise ValueError(f"{path}: a tokenizer file may not end in .vocab (its readable listing goes to "
                             f"<name>.vocab); name it e.g. {path.with_suffix('.bpe')}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.dumps(), encoding="utf-8")
        with open(path.with_suffix(".vocab"), "w", encoding="utf-8") as f:
            made = {i: (a, b) for a, b, i in self.merges}
            for i in sorted(self.vocab):
                if i in made:
                    a, b = made[i]
                    f.write(f"[{render_token(self.vocab[a])}][{render_token(self.vocab[b])}] -> ")
                f.write(f"[{render_token(self.vocab[i])}] {i}\n")
            for n, i in self.special_tokens.items():
                f.write(f"[{n}] {i} (special)\n")

    @classmethod
    def load(cls, path):
        """Read a file written by save(): `Tokenizer.load("out/t.bpe")` -> that Tokenizer."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}; train one with: python bpe.py train ...")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not a bpe.py tokenizer (not even UTF-8 text); give a file written by "
                             f"save() (python bpe.py train ...)") from None
        return cls.loads(text, source=path)

    # --- tiktoken's format (section 6 reads it)

    def tiktoken_pattern(self):
        r"""The pattern to give tiktoken.Encoding(pat_str=...).

        >>> Tokenizer("none").tiktoken_pattern()    # "none" = the whole text is one chunk
        '[\\s\\S]+'
        """
        return self.pattern or r"[\s\S]+"

    def export_tiktoken(self, path):
        """Write a tiktoken rank file (`<base64 token> <rank>` per line, like cl100k_base.tiktoken):
        the token b"hi" with id 300 becomes the line `aGk= 300`."""
        with open(path, "wb") as f:
            for i in sorted(self.vocab):
                f.write(base64.b64encode(self.vocab[i]) + b" " + str(i).encode() + b"\n")

    def __getstate__(self):  # for worker processes: no cache, nothing that rebuilds cheaply
        return {"pattern": self.pattern, "vocab": self.vocab, "merges": self.merges,
                "special_tokens": self.special_tokens, "normalize": self.normalize}

    def __setstate__(self, state):
        self.__init__(**state)


# =============================================================================
# Speed and scale. Sections 1-4 above are the whole tokenizer. What follows gives the same results
# faster and on inputs of any size, reads and writes the real world's files, and runs it all from
# the command line.
# =============================================================================

# -----------------------------------------------------------------------------
# 5. Speed and scale: a faster split, long chunks, streaming parallel counting

# The two GPT patterns for Python's built-in `re`, which runs them about 2x faster than `regex`
# but has no \p{...} classes. {L}, {N} and {S} are filled in with the exact code point ranges (of
# the BMP) that `regex` itself matches for \p{L}, \p{N} and \s, so both spellings split every
# text identically (tests/test_bpe.py checks it). `re` needs Python >= 3.11 for possessive `?+`.
_RE_TEMPLATES = {
    GPT2_SPLIT_PATTERN: r"""'(?:[sdmt]|ll|ve|re)| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+""",
    GPT4_SPLIT_PATTERN: r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n{L}{N}]?+[{L}]++|[{N}]{1,3}+| ?[^{S}{L}{N}]++[\r\n]*+|[{S}]++$|[{S}]*[\r\n]|[{S}]+(?![^{S}])|[{S}]""",
}
_CLASSES = {}   # built on first use: {"L": ranges, "N": ranges, "S": ranges, "ws": set of chars}


def _char_classes():
    if not _CLASSES:
        bmp = "".join(map(chr, range(0x10000)))
        for name, cls in (("L", r"\p{L}"), ("N", r"\p{N}"), ("S", r"\s")):
            cps = [ord(c) for c in regex.findall(cls, bmp)]
            spans, start = [], cps[0]
            for prev, cp in zip(cps, cps[1:] + [-1]):
                if cp != prev + 1:
                    spans.append(f"\\u{start:04x}" if start == prev else f"\\u{start:04x}-\\u{prev:04x}")
                    start = cp
            _CLASSES[name] = "".join(spans)
        _CLASSES["ws"] = frozenset(regex.findall(r"\s", bmp))  # (no whitespace lies beyond the BMP)
    return _CLASSES


def _re_splitter(pattern):
    """The split function of a GPT pattern run by `re`, or None for other patterns (and Python < 3.11)."""
    if pattern not in _RE_TEMPLATES or sys.version_info < (3, 11):
        return None
    c = _char_classes()
    template = _RE_TEMPLATES[pattern]
    for name in "LNS":
        template = template.replace("{" + name + "}", c[name])
    fast, slow = re.compile(template).findall, regex.compile(pattern).findall
    astral = re.compile("[\U00010000-\U0010ffff]").search
    # `re` checks code points beyond the BMP against a long list of ranges, one by one, so the
    # classes above stop at U+FFFF and texts with emoji & co. go to `regex` instead
    return lambda text: fast(text) if text.isascii() or not astral(text) else slow(text)


class _ChunkCache(dict):
    """The chunk cache of Tokenizer.encode_ordinary, {chunk: tuple of ids}: a chunk it does not hold
    is encoded (encode_chunk) and stored when it is looked up. That saves the separate pass that
    would find the new chunks first (a set built from millions of chunks): one pass in C over the chunks,
    Python only for the new ones. It keeps the tokenizer's tables, not the tokenizer, so that the
    two make no reference cycle.

    >>> c = _ChunkCache({bytes([x]): x for x in range(256)}, range(256), {}); c["hi"], dict(c)
    ((104, 105), {'hi': (104, 105)})
    """

    max_size = 1_000_000  # bounds the memory of a long-running encoder: full, it starts over

    def __init__(self, token_id, byte_ids, ranks):
        super().__init__()
        self.tables = token_id, byte_ids, ranks

    def __missing__(self, chunk):  # dict's [] calls this for a key it lacks
        if len(self) >= self.max_size:
            self.clear()
        ids = self[chunk] = encode_chunk(chunk.encode("utf-8"), *self.tables)
        return ids


def _bpe_merge_long(ids, ranks, max_rank=None):
    # bpe_merge for long chunks (a page of CJK text without spaces, pattern "none"): a linked list
    # of tokens plus a heap of (rank, position) candidates, O(n log n). Positions keep their
    # left-to-right order, so (rank, position) pops the leftmost lowest rank, as bpe_merge does.
    # Entries go stale when a neighbour merges; they are checked and skipped when popped.
    n, tok, get = len(ids), list(ids), ranks.get
    nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
    heap = [(r, i) for i, r in enumerate(map(get, zip(tok, tok[1:]))) if r is not None]
    heapq.heapify(heap)
    while heap:
        r, i = heapq.heappop(heap)
        if max_rank is not None and r >= max_rank:
            break
        j = nxt[i]
        if tok[i] < 0 or j >= n or get((tok[i], tok[j])) != r:
            continue
        tok[i], tok[j] = r, -1
        nxt[i] = nxt[j]
        if nxt[j] < n:
            prv[nxt[j]] = i
        if prv[i] >= 0 and (r2 := get((tok[prv[i]], r))) is not None:
            heapq.heappush(heap, (r2, prv[i]))
        if nxt[i] < n and (r2 := get((r, tok[nxt[i]]))) is not None:
            heapq.heappush(heap, (r2, i))
    return [t for t in tok if t >= 0]


def _safe_cut(text):
    r"""Index where `text` can be cut so that chunking both halves equals chunking the whole, or -1.

    We cut after a single newline that sits between two non-space characters: in both GPT patterns
    a chunk always ends at that newline and the next starts fresh, whichever side is read alone.
    (A blank line is not safe: GPT-2 splits "\n\nWord" as "\n", "\n", "Word" but a text ending
    in "\n\n" as one "\n\n".)

    >>> _safe_cut("one\ntwo\n\nthree")    # after "one\n"; the blank line is not safe
    4
    """
    ws = _char_classes()["ws"]
    i = len(text) - 1
    while True:
        i = text.rfind("\n", 0, i)
        if i <= 0:
            return -1
        if text[i - 1] not in ws and text[i + 1] not in ws:
            return i + 1


def _pieces(sources, piece_chars, can_cut):
    """Yield the input as text pieces of about piece_chars characters, cut only where safe, so that
    memory stays flat however large the input. `sources` is a str (the text) or a list of file
    paths; a file is never joined with the next."""
    if isinstance(sources, str):
        readers = [(sources[i:i + piece_chars] for i in range(0, len(sources), piece_chars))]
    else:
        def read(path):
            with open(path, encoding="utf-8", newline="") as f:  # newline="": keep \r\n as is
                try:
                    while block := f.read(piece_chars):
                        yield block
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path} is not valid UTF-8 ({e}); convert it first, "
                                     f"e.g. iconv -f latin1 -t utf-8") from None
        readers = [read(p) for p in sources]
    for blocks in readers:
        carry = ""
        for block in blocks:
            carry += block
            while len(carry) > piece_chars and can_cut:
                # the last safe cut in the first piece_chars, else the last one anywhere (or wait)
                cut = _safe_cut(carry[:piece_chars])
                if cut <= 0 and (cut := _safe_cut(carry)) <= 0:
                    break
                yield carry[:cut]
                carry = carry[cut:]
        if carry:
            yield carry


def _progress(pieces, bar):
    for p in pieces:
        bar.update(len(p))
        yield p


def _map(fn, items, processes, initializer=None, initargs=()):
    """Ordered map over `items` in `processes` worker processes, with a bounded number of items in
    flight so that memory stays flat however long the input is (Pool.imap would read it all)."""
    if processes <= 1:
        if initializer:
            initializer(*initargs)
        yield from map(fn, items)
        return
    with multiprocessing.Pool(processes, initializer, initargs) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= 2 * processes:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _count_piece(args):
    text, pattern, specials, normalize = args
    if normalize:  # per piece = on the whole text: pieces end at newlines, which no normalization crosses
        text = unicodedata.normalize(normalize, text)
    split = get_splitter(pattern)
    parts = re.split("|".join(map(re.escape, specials)), text) if specials else [text]
    counts = Counter()
    for part in parts:
        counts.update(split(part))
    return counts


def count_chunks(data, pattern, special_tokens=(), processes=1, piece_chars=None, verbose=False, normalize=None):
    r"""Count the unique chunks of `data` (a str, or a list of file paths), in `processes` processes.

    The input is streamed in pieces cut at safe newlines (see _safe_cut), so the result does not
    depend on the number of processes and memory grows with the number of unique chunks, not with
    the input size. Special-token text separates documents and is not counted. normalize: the Unicode form
    (NFC, ...) the text is put in first, as the tokenizer will encode it.

    >>> count_chunks("the cat<|endoftext|>the hat\n", "gpt2", ["<|endoftext|>"])
    Counter({'the': 2, ' cat': 1, ' hat': 1, '\n': 1})
    """
    pattern = PATTERNS.get(pattern, pattern)
    if isinstance(data, str):
        if "\n" not in data and len(data) < 4096 and os.path.isfile(data):
            raise ValueError(f"a str is the training text itself, and {data!r} names a file: pass [{data!r}] "
                             f"to train on the file")
        total = len(data)
    else:
        data = [Path(p) for p in ([data] if isinstance(data, os.PathLike) else data)]
        for p in data:
            if not p.is_file():
                raise FileNotFoundError(f"training input {p} " + (f"is a folder; give its files ({p}/*.txt)"
                                                                   if p.is_dir() else "does not exist"))
        total = sum(p.stat().st_size for p in data)
    if piece_chars is None:
        piece_chars = int(min(8 << 20, max(1 << 18, total // (4 * max(1, processes)))))
    can_cut = pattern in (GPT2_SPLIT_PATTERN, GPT4_SPLIT_PATTERN)
    counts = Counter()
    with tqdm(total=total, unit="char", unit_scale=True, desc="counting chunks", disable=not verbose) as bar:
        pieces = _progress(_pieces(data, piece_chars, can_cut), bar)
        for c in _map(_count_piece, ((p, pattern, tuple(special_tokens), normalize) for p in pieces), processes):
            counts.update(c)
    return counts


# -----------------------------------------------------------------------------
# 6. File formats: GPT-2's encoder.json + vocab.bpe, tiktoken rank files

GPT2_DIR = HERE / "data" / "gpt2"
GPT2_URLS = {
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
}
GPT2_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
CL100K_SPECIALS = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                   "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}


def bytes_to_unicode():
    r"""GPT-2's map from the 256 byte values to printable characters: encoder.json and vocab.bpe
    spell tokens with these characters instead of raw bytes (a space is "Ġ", a newline "Ċ").

    >>> b2u = bytes_to_unicode()
    >>> b2u[ord("A")], b2u[ord(" ")], b2u[ord("\n")]
    ('A', 'Ġ', 'Ċ')
    """
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def load_gpt2(path=None, download_missing=True):
    """OpenAI's GPT-2 tokenizer from the directory `path` (default data/gpt2/) holding encoder.json
    and vocab.bpe; they are downloaded there when missing. Its ids equal tiktoken's "gpt2".

    >>> load_gpt2().encode("hello world")
    [31373, 995]
    """
    d = Path(path) if path is not None else GPT2_DIR
    for name, url in GPT2_URLS.items():
        if not (d / name).is_file():
            if not download_missing:
                raise FileNotFoundError(f"{d / name} is missing; download it from {url}")
            download(url, d / name, GPT2_SHA256[name])
    decoder = {c: b for b, c in bytes_to_unicode().items()}
    try:
        encoder = json.loads((d / "encoder.json").read_text(encoding="utf-8"))
        to_bytes = lambda s: bytes(decoder[c] for c in s)  # noqa: E731
        vocab = {i: to_bytes(s) for s, i in encoder.items() if s != ENDOFTEXT}
        token_id = {b: i for i, b in vocab.items()}
        merges = []
        for line in (d / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]:  # line 1: "#version: 0.2"
            if line:
                x, y = line.split(" ")
                merges.append((token_id[to_bytes(x)], token_id[to_bytes(y)], token_id[to_bytes(x + y)]))
    except (ValueError, KeyError) as e:
        raise ValueError(f"{d}: encoder.json / vocab.bpe are not GPT-2's files ({e!r}); delete them "
                         f"and run again to download them, or fetch {GPT2_URLS['encoder.json']} and "
                         f"{GPT2_URLS['vocab.bpe']}") from None
    return Tokenizer("gpt2", vocab, merges, {ENDOFTEXT: encoder[ENDOFTEXT]})


def recover_merges(vocab):
    """Rebuild the merge history of a rank-only vocabulary: token t came from the two pieces that
    BPE leaves when it may use only tokens of lower rank (as tiktoken's _educational.py does).

    >>> recover_merges({**{i: bytes([i]) for i in range(256)}, 256: b"ab", 257: b"abc"})
    [(97, 98, 256), (256, 99, 257)]
    """
    token_id = {b: i for i, b in vocab.items()}
    ranks, merges = {}, []
    for t in sorted(vocab):
        b = vocab[t]
        if len(b) > 1:
            parts = bpe_merge([token_id[bytes([x])] for x in b], ranks, max_rank=t)
            if len(parts) != 2:
                raise ValueError(f"token {t} {b!r} cannot be made from two lower-ranked tokens")
            merges.append((parts[0], parts[1], t))
            for k in range(1, len(b)):  # make t available to the tokens after it
                a, c = token_id.get(b[:k]), token_id.get(b[k:])
                if a is not None and c is not None:
                    ranks[(a, c)] = t
        # pairs whose concatenation has a lower rank but one half a higher rank cannot matter:
        # pieces are built only from lower-ranked tokens
    return merges


def load_tiktoken(path, pattern="gpt4", special_tokens=None):
    """Load a tiktoken rank file (`<base64 token> <rank>` per line) and recover its merges:
    `load_tiktoken("data/cl100k_base.tiktoken")` -> a Tokenizer with cl100k_base's 100,256 tokens."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no rank file at {path} (cl100k_base: {CL100K_URL})")
    vocab = {}
    for lineno, line in enumerate(path.read_bytes().splitlines(), 1):
        if line:
            try:
                tok, rank = line.split()
                vocab[int(rank)] = base64.b64decode(tok, validate=True)
            except ValueError:
                raise ValueError(f"{path}:{lineno}: expected '<base64 token> <rank>', got {line[:60]!r}") from None
    return Tokenizer(pattern, vocab, recover_merges(vocab), special_tokens or {})


def load_cl100k(path=None):
    """GPT-4's cl100k_base, downloaded to data/cl100k_base.tiktoken when missing:
    `load_cl100k().encode("hello world")` -> [15339, 1917], as tiktoken's cl100k_base."""
    path = Path(path) if path is not None else HERE / "data" / "cl100k_base.tiktoken"
    download(CL100K_URL, path, CL100K_SHA256)
    return load_tiktoken(path, "gpt4", CL100K_SPECIALS)


# Today's open models ship their tokenizers in two formats. HF's tokenizer.json (Qwen2, and Llama 3 on the hub)
# spells tokens with GPT-2's byte-to-character map, lists the merges in order, and gives the split regex in its
# pre_tokenizer and the special tokens as added_tokens. Meta's original Llama 3 files are a tiktoken rank file
# (original/tokenizer.model) whose pattern and 256 special tokens live in Meta's code, so they are spelled out here.
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA3_N_SPECIALS = 256  # ids 128000..128255; those not named above are <|reserved_special_token_3|> on


def load_llama3(path):
    """Llama 3's tiktoken rank file (`<base64 token> <rank>` lines, 128,000 tokens) with Llama 3's split
    pattern and special tokens, numbered from the first id after the ranks:
    `load_llama3("original/tokenizer.model").special_tokens["<|eot_id|>"]` -> 128009"""
    tok = load_tiktoken(path, "llama3")
    n_reserved = LLAMA3_N_SPECIALS - len(LLAMA3_SPECIALS)
    names = LLAMA3_SPECIALS + [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + n_reserved)]
    tok.register_special_tokens({name: len(tok.vocab) + k for k, name in enumerate(names)})
    return tok


def load_tokenizer_json(path):
    """An HF tokenizer.json of a byte-level BPE model (Qwen2 / Qwen2.5, Llama 3, GPT-2) -> Tokenizer with its
    vocabulary, merges, split pattern, Unicode normalization and added tokens (all encoded as special tokens
    with allowed_special="all", as HF's tokenizers do). Other kinds of tokenizer.json (SentencePiece-style
    BPE, WordPiece, Unigram) are an error naming what was found.
    `load_tokenizer_json("Qwen2.5-0.5B/tokenizer.json").encode("<|im_start|>", allowed_special="all")` -> [151644]"""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    where = f"{path}: only byte-level BPE tokenizer.json files are supported"
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ValueError(f"{where}; this one has model type {model.get('type')!r}"
                         f"{' with byte_fallback' if model.get('byte_fallback') else ''}")
    pattern = None
    pre = spec.get("pre_tokenizer") or {}
    for step in pre.get("pretokenizers", [pre]):  # a Sequence, or a single pre-tokenizer
        if step.get("type") == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
            pattern = step["pattern"].get("Regex")
        elif step.get("type") == "ByteLevel":
            if step.get("add_prefix_space"):
                raise ValueError(f"{where}; ByteLevel with add_prefix_space is not")
            if step.get("use_regex", True):
                pattern = GPT2_SPLIT_PATTERN  # ByteLevel's own regex is GPT-2's
        else:
            raise ValueError(f"{where}; pre-tokenizer {step.get('type')!r} is not")
    if pattern is None:
        raise ValueError(f"{where}; no split regex found in its pre_tokenizer")
    norm = spec.get("normalizer")
    if norm is not None and norm.get("type") not in ("NFC", "NFD", "NFKC", "NFKD"):
        raise ValueError(f"{where}; normalizer {norm.get('type')!r} is not")
    decoder = {c: b for b, c in bytes_to_unicode().items()}
    try:
        vocab = {i: bytes(decoder[c] for c in s) for s, i in model["vocab"].items()}
        token_id = {b: i for i, b in vocab.items()}
        merges = []
        for m in model.get("merges", []):
            a, b = m.split(" ") if isinstance(m, str) else m  # "a b" in older files, ["a", "b"] in newer ones
            x, y = bytes(decoder[c] for c in a), bytes(decoder[c] for c in b)
            merges.append((token_id[x], token_id[y], token_id[x + y]))
    except KeyError as e:
        raise ValueError(f"{where}; token or merge {e.args[0]!r} is not byte-level BPE") from None
    # bpe_merge merges the pair that makes the lowest id; HF merges the earliest merge. Same when ids grow with
    # the merges, as in every trained BPE vocabulary (tiktoken-derived ones included).
    if any(i >= j for (_, _, i), (_, _, j) in zip(merges, merges[1:])):
        raise ValueError(f"{path}: merge results are not numbered in merge order; bpe.py cannot encode it as HF does")
    made = {k for _, _, k in merges}  # an added token that is also a vocabulary entry (GPT-2's <|endoftext|>)
    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", [])  # is special unless merges make it
                if t["id"] not in vocab or (t.get("special") and t["id"] not in made)}
    for i in specials.values():
        vocab.pop(i, None)
    return Tokenizer(pattern, vocab, merges, specials, norm and norm["type"])


def load_hf_tokenizer(directory):
    """The tokenizer of an HF model directory: its tokenizer.json, else Meta's original/tokenizer.model rank
    file (Llama 3). load_hf_tokenizer("~/.cache/.../Qwen/Qwen2.5-0.5B").eot_token -> 151643"""
    d = Path(directory)
    if (d / "tokenizer.json").is_file():
        return load_tokenizer_json(d / "tokenizer.json")
    for rank_file in (d / "original" / "tokenizer.model", d / "tokenizer.model"):
        if rank_file.is_file():
            return load_llama3(rank_file)
    raise FileNotFoundError(f"{d} has no tokenizer.json (nor Llama 3's original/tokenizer.model)")


def get_tokenizer(name):
    """'gpt2', 'cl100k_base', a .tiktoken rank file, an HF tokenizer.json or model directory, or a file written
    by Tokenizer.save: `get_tokenizer("gpt2").encode("hello world")` -> [31373, 995]."""
    if name == "gpt2":
        return load_gpt2()
    if name == "cl100k_base":
        return load_cl100k()
    if str(name).endswith(".json"):
        return load_tokenizer_json(name)
    if Path(name).is_dir():
        return load_hf_tokenizer(name)
    if str(name).endswith(".tiktoken"):
        return load_tiktoken(name)
    return Tokenizer.load(name)


# -----------------------------------------------------------------------------
# 7. Download

class DownloadError(RuntimeError):
    """A file could not be fetched (no network, an HTTP error, an incomplete or corrupt copy). Its message names
    the URL and what to do; the scripts print it as their error, without a traceback."""


def download(url, path, sha256=None, chunk_size=1 << 20, expected_size=None, desc=None, headers=None):
    """Download url to path with a progress bar, unless a complete copy is there; returns the Path:
    `download(GPT2_URLS["vocab.bpe"], "data/gpt2/vocab.bpe", GPT2_SHA256["vocab.bpe"])` ->
    Path("data/gpt2/vocab.bpe"). Resumable: bytes go to path + ".part" and a later call continues
    it with an HTTP Range request; the file is renamed into place only when its size (and sha256,
    when given) is right. The one downloader of the project: gpt2.py re-exports it (this file
    cannot import gpt2.py, which needs torch). headers: extra HTTP headers (an HF token for gated models)."""
    import requests  # only needed here
    path = Path(path)
    if path.is_file() and (expected_size is None or path.stat().st_size == expected_size):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    headers = {**(headers or {}), **({"Range": f"bytes={have}-"} if have else {})}
    hint = f"Without network access, download it elsewhere and put it at {path}"
    try:
        r = requests.get(url, headers=headers, stream=True, timeout=60)
    except requests.RequestException as e:
        raise DownloadError(f"could not download {url} ({e.__class__.__name__}). {hint}") from None
    if have and r.status_code == 416:  # nothing left to fetch: the .part is complete
        total = have
    else:
        if r.status_code != 206:  # the server ignored Range: start over
            have = 0
        if r.status_code >= 400:
            raise DownloadError(f"could not download {url}: HTTP {r.status_code}. {hint}")
        length = r.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with open(part, "ab" if have else "wb") as f, \
                tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=desc or path.name) as bar:
            for block in r.iter_content(chunk_size):
                f.write(block)
                bar.update(len(block))
    size = part.stat().st_size
    want = expected_size if expected_size is not None else total
    if (want is not None and size != want) or (total is not None and size != total):
        raise DownloadError(f"download of {url} is incomplete: {size} of {want} bytes; run again to resume")
    if sha256 and hashlib.sha256(part.read_bytes()).hexdigest() != sha256:
        part.unlink()
        raise DownloadError(f"{url} downloaded with the wrong sha256 (corrupt); run again to retry")
    os.replace(part, path)
    return path


# -----------------------------------------------------------------------------
# 8. Encoding files for training

_WORKER = {}  # each worker process receives the tokenizer once, not with every piece


def _init_worker(tok, allowed_special):
    _WORKER["tok"], _WORKER["allowed"] = tok, allowed_special


def _encode_piece(text):
    return np.array(_WORKER["tok"].encode(text, allowed_special=_WORKER["allowed"]), dtype=np.uint16)


def encode_file(tokenizer, input_path, output_path, processes=None, append_eot=True, allowed_special=()):
    """Tokenize a UTF-8 text file of any size into a flat token file; returns the number of tokens:
    `encode_file(load_gpt2(), "hw.txt", "hw.bin")` with hw.txt = "hello world" -> 3, and hw.bin
    holds 31373 995 50256.

    Format of output_path: the token ids as raw little-endian uint16, no header (nanoGPT's .bin);
    read it with np.memmap(output_path, dtype=np.uint16, mode="r") or load_tokens(). The ids are
    exactly tokenizer.encode(text, allowed_special=allowed_special), plus the <|endoftext|> id at
    the end when append_eot. The file is cut into pieces at safe newlines and encoded in
    `processes` processes (default: all cores); it is written to output_path + ".part" and renamed,
    so a crash never leaves a truncated file that looks complete."""
    if tokenizer.n_vocab > 1 << 16:
        raise ValueError(f"uint16 holds ids below 65536, this tokenizer has {tokenizer.n_vocab}")
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.is_file():
        raise FileNotFoundError(f"input file {input_path} does not exist")
    processes = processes or os.cpu_count() or 1
    size = input_path.stat().st_size
    piece_chars = int(min(4 << 20, max(1 << 16, size // (4 * processes))))
    can_cut = tokenizer.pattern in (GPT2_SPLIT_PATTERN, GPT4_SPLIT_PATTERN)
    eot = [tokenizer.eot_token] if append_eot else []
    output_path.parent.mkdir(parents=True, exist_ok=True)
    part = output_path.with_name(output_path.name + ".part")
    n = 0
    with open(part, "wb") as f, tqdm(total=size, unit="char", unit_scale=True, desc=f"encoding {input_path.name}") as bar:
        pieces = _progress(_pieces([input_path], piece_chars, can_cut), bar)
        for arr in _map(_encode_piece, pieces, processes, _init_worker, (tokenizer, allowed_special)):
            arr.tofile(f)
            n += len(arr)
        np.array(eot, dtype=np.uint16).tofile(f)
        n += len(eot)
    os.replace(part, output_path)
    return n


def load_tokens(path):
    """The token file written by encode_file, as a read-only uint16 array (memory-mapped, so a file
    larger than memory costs nothing until read): `load_tokens("hw.bin")` -> memmap([31373, 995, 50256])."""
    return np.memmap(path, dtype=np.uint16, mode="r")


# -----------------------------------------------------------------------------
# 9. Post-training text: one prompt template, the data formats, and a task whose answers can be checked
#
# Every post-training file (sft.py, reward_model.py, ppo.py, grpo.py, classify.py) formats prompts, reads
# its data and scores answers with the functions below, so a model sees the same text at every stage.

PREAMBLE = ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.")


def byte_tokenizer():
    """256 byte tokens plus <|endoftext|> = 256, no merges: each character of ASCII text is one token (so
    every digit is its own token), and a 257-row embedding keeps a small model fast on a CPU. (GPT-2's split
    pattern changes nothing without merges; it is kept so that every byte tokenizer dumps() the same text.)
    byte_tokenizer().encode("12+3") -> [49, 50, 43, 51]"""
    return Tokenizer("gpt2", special_tokens={ENDOFTEXT: 256})


def format_prompt(instruction, input="", preamble=True):
    """The Alpaca prompt (the format of Raschka's "Build a Large Language Model (From Scratch)", ch. 7), up
    to the line where the response begins. preamble=False leaves out the first sentence only (same format,
    ~110 fewer byte tokens, for the small byte-level task model).
    format_prompt("What is 2 + 3?", preamble=False) -> '### Instruction:\\nWhat is 2 + 3?\\n\\n### Response:\\n'"""
    text = (PREAMBLE + "\n\n" if preamble else "") + f"### Instruction:\n{instruction}"
    if input:
        text += f"\n\n### Input:\n{input}"
    return text + "\n\n### Response:\n"


def encode_example(tok, prompt, completion, *, input="", preamble=True, mask_prompt=True):
    """Token ids of format_prompt(prompt) + completion + <|endoftext|>, and a loss mask of the same length:
    mask[i] = 1 where ids[i] is a target (predicted from ids[:i]). mask_prompt=True: the completion and its
    end-of-text only; False: every token after the first. The end-of-text is always a target: it is how
    the model learns to stop. It is marked here, explicitly, because a batch padded with the same id cannot
    tell it from padding afterwards. The prompt ends with a newline, so encoding the two halves separately
    gives the ids of the whole text under GPT-2's split pattern too, unless the completion starts with a
    newline; the halves are then what the model sees when it answers the prompt encoded alone. The data's text
    is ordinary text (encode_ordinary): an "<|endoftext|>" written in a prompt or answer is its characters,
    so no row can end a sequence early or inject a special token (HF tokenizers would read it as the token).
    encode_example(byte_tokenizer(), "Hi", "Yo", preamble=False) -> (ids of '### Instruction:\\nHi\\n\\n
    ### Response:\\nYo' + [256], [0] * 35 + [1, 1, 1])"""
    p = tok.encode_ordinary(format_prompt(prompt, input, preamble))
    c = tok.encode_ordinary(completion) + [tok.eot_token]
    mask = [0] * len(p) + [1] * len(c) if mask_prompt else [0] + [1] * (len(p) + len(c) - 1)
    return p + c, mask


# The data formats: JSON Lines with the field names TRL's trainers use. An SFT file may instead use
# Alpaca's (instruction, input, output); a .json file holding a list of such objects is read as well.
DATA_FORMATS = {
    "sft": ("prompt", "completion"),  # "input" is optional (Alpaca's second field)
    "preference": ("prompt", "chosen", "rejected"),
    "rl": ("prompt", "answer"),
    "classification": ("text", "label"),
}
ALPACA = {"instruction": "prompt", "input": "input", "output": "completion"}


def read_items(path):
    """The JSON values of a data file, a .json list or JSON Lines (one per line), with where each one stands
    for error messages. Not UTF-8, not JSON, no rows: a ValueError naming the file and the line.
    read_items("rl.jsonl") -> ([{"prompt": "What is 2 + 3?", "answer": "5"}, ...], ["rl.jsonl:1", ...])"""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
    if path.suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(items, list):
            raise ValueError(f"{path}: a .json data file must hold a list of objects (or use JSON Lines, .jsonl)")
        where = [f"{path}: item {i}" for i in range(len(items))]
    else:
        items, where = [], []
        for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 and kin are inside strings
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); JSON Lines holds one object "
                                     f"per line") from None
                where.append(f"{path}:{lineno}")
    if not items:
        raise ValueError(f"{path} holds no rows")
    return items, where


def read_rows(path, kind):
    """The rows of a data file as dicts with the fields of DATA_FORMATS[kind] (Alpaca rows come back as
    prompt / input / completion). A bad row is a ValueError naming the file, the line and the field.
    read_rows("sft.jsonl", "sft") -> [{"prompt": "What is 2 + 3?", "completion": "2 + 3 = 5"}, ...]"""
    if kind not in DATA_FORMATS:
        raise ValueError(f"unknown data kind {kind!r}; valid: {', '.join(DATA_FORMATS)}")
    items, where = read_items(path)
    return [check_row(item, kind, w) for item, w in zip(items, where)]


def check_row(row, kind, where="row"):
    """One row of a data file, checked (see read_rows); `where` starts the error message."""
    fields = DATA_FORMATS[kind]
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object with fields {', '.join(fields)}, got {type(row).__name__}")
    turns = lambda v: isinstance(v, list) and v and all(isinstance(t, dict) and "role" in t for t in v)  # noqa: E731
    if "messages" in row or any(turns(row.get(f)) for f in fields):  # TRL's conversational rows
        raise ValueError(f"{where}: a conversational row ('messages', or turns as lists of {{role, content}}); "
                         f"this project reads {', '.join(fields)} as strings: join each side's turns into text")
    names = {f: f for f in (*fields, "input")}  # our field -> the field as the file spells it
    if kind == "sft" and "prompt" not in row and "instruction" in row:
        names = {ours: theirs for theirs, ours in ALPACA.items()}
        row = {**{k: v for k, v in row.items() if k not in ALPACA}, **{ALPACA[k]: row[k] for k in ALPACA if k in row}}
    for f in fields:
        if f not in row:
            alt = " (or Alpaca's instruction, input, output)" if kind == "sft" else ""
            raise ValueError(f"{where}: field {names[f]!r} is missing; a {kind} row needs {', '.join(fields)}{alt}")
        v = row[f]
        if f == "label" and isinstance(v, int) and not isinstance(v, bool):
            continue
        if f == "answer" and isinstance(v, int) and not isinstance(v, bool):
            row = {**row, "answer": str(v)}
            continue
        if not isinstance(v, str) or not v:
            got = "an empty string" if v == "" else type(v).__name__
            raise ValueError(f"{where}: field {names[f]!r} must be a non-empty string"
                             f"{' or an integer' if f in ('label', 'answer') else ''}, got {got}")
    if kind == "sft" and not isinstance(row.setdefault("input", ""), str):
        raise ValueError(f"{where}: field {names['input']!r} must be a string, got {type(row['input']).__name__}")
    return row


def write_rows(path, rows):
    """Rows as JSON Lines, written to a temp file and renamed (a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    os.replace(tmp, path)


# The task: arithmetic whose answers a program can check, so post-training is measured by accuracy rather
# than by a judge. "What is 482 + 39?" -> "482 + 39 = 521": the response restates the problem (a scratchpad:
# the digits to combine sit right before the answer, where pretraining put them) and the verifier reads its
# last number, as GSM8K graders read the final answer. Operands have 1..TASK_MAX_DIGITS digits, each length
# equally likely. The pretraining text holds problems of the same kind as "Q: ... / A: ..." worked examples,
# all of them right (a base model trained on bare equations never learns to restate a question, and SFT
# alone does not teach it that in minutes). The SFT demonstrations come from a sloppy teacher: on a problem
# with a carry (or borrow) it forgets every carry with probability TASK_TEACHER_ERROR, as a hurried person
# would. Imitation learns the slip along with the format; the preference pairs (right vs carries forgotten)
# and the verifier know better, so the reward model, DPO, PPO and GRPO have something real to fix: the case
# for learning from feedback rather than from demonstrations alone. teacher_error=0 gives the same problems
# with every demonstration right.
# Two ways to work an answer (`worked`): "equation" writes the result straight after the problem, so the model
# must find every carry before it writes the first digit; "columns" works right to left, one column per step
# with its carry in plain sight ("482 + 39: 2+9+0=11, 8+3+1=12, 4+0+1=5, so 521"), a scratchpad of the kind that
# lets a small model do arithmetic it cannot do in its head (Nye et al. 2021), and the sloppy teacher's slip is
# a visible "+0" where a carry belongs. data/task/ holds the first, data/task-columns/ the second.

TASK_DIR = HERE / "data" / "task"
TASK_DATA = {"task": "equation", "task-columns": "columns"}  # --data name -> how its answers are worked
TASK_SIZES = {"pretrain": 200_000, "sft": 20_000, "sft_val": 500, "preference": 10_000, "rl": 10_000,
              "test": 500}
TASK_MAX_DIGITS = 3
TASK_TEACHER_ERROR = 0.75


def task_problem(rng, max_digits=TASK_MAX_DIGITS):
    """(a, op, b) drawn by `rng` (a random.Random): + or -, never a negative result. -> (482, "+", 39)"""
    a, b = (rng.randrange(10 ** (d - 1) if d > 1 else 0, 10 ** d)
            for d in (rng.randint(1, max_digits), rng.randint(1, max_digits)))
    op = rng.choice("+-")
    return (max(a, b), op, min(a, b)) if op == "-" else (a, op, b)


def column_work(a, op, b, carries=True):
    """The columns of a + b or a - b worked right to left, each "top op bottom op carry-in = result" (a column
    that borrows shows its top digit plus 10), and the number they spell; carries=False drops every carry
    (borrow), the sloppy teacher's slip.
    column_work(482, "+", 39) -> ("2+9+0=11, 8+3+1=12, 4+0+1=5", 521)
    column_work(503, "-", 27) -> ("13-7-0=6, 10-2-1=7, 5-0-1=4", 476)
    column_work(482, "+", 39, carries=False) -> ("2+9+0=11, 8+3+0=11, 4+0+0=4", 411)"""
    n = max(len(str(a)), len(str(b)))
    cols, digits, carry = [], [], 0
    for x, y in zip(map(int, str(a).zfill(n)[::-1]), map(int, str(b).zfill(n)[::-1])):  # ones first
        if op == "+":
            total = x + y + carry
            cols.append(f"{x}+{y}+{carry}={total}")
            digits.append(total % 10)
            carry = total // 10 if carries else 0
        else:
            diff = x - y - carry
            cols.append(f"{x + 10 if diff < 0 else x}-{y}-{carry}={diff % 10}")
            digits.append(diff % 10)
            carry = int(diff < 0) if carries else 0
    if op == "+" and carry:  # the last column's carry is the leading digit
        digits.append(carry)
    return ", ".join(cols), int("".join(map(str, digits[::-1])))


def task_text(a, op, b, result=None, worked="equation"):
    """-> (question, worked answer, answer), the worked answer stating `result` (default: the right one).
    task_text(482, "+", 39) -> ("What is 482 + 39?", "482 + 39 = 521", "521")
    worked="columns": "482 + 39: 2+9+0=11, 8+3+1=12, 4+0+1=5, so 521"; with result=forget_carries(...), the
    columns drop their carries too: "482 + 39: 2+9+0=11, 8+3+0=11, 4+0+0=4, so 411"."""
    if worked not in TASK_DATA.values():
        raise ValueError(f"worked={worked!r}: give one of {', '.join(TASK_DATA.values())}")
    answer = str(a + b if op == "+" else a - b)
    result = answer if result is None else result
    if worked == "equation":
        return f"What is {a} {op} {b}?", f"{a} {op} {b} = {result}", answer
    careless = str(result) != answer and int(result) == forget_carries(a, op, b)
    return f"What is {a} {op} {b}?", f"{a} {op} {b}: {column_work(a, op, b, not careless)[0]}, so {result}", answer


def forget_carries(a, op, b):
    """The answer of a learner who adds (or subtracts) column by column and drops every carry (borrow).
    forget_carries(482, "+", 39) -> 411; forget_carries(503, "-", 27) -> 586"""
    return column_work(a, op, b, carries=False)[1]


def plausible_wrong(a, op, b, rng):
    """A wrong answer of the kind a learner makes: every carry (or borrow) forgotten; when the problem has
    none, one digit off by one. plausible_wrong(482, "+", 39, rng) -> 411"""
    right = a + b if op == "+" else a - b
    wrong = forget_carries(a, op, b)
    if wrong == right:
        step = 10 ** rng.randrange(len(str(right)))
        wrong = right - step if right >= step and rng.random() < 0.5 else right + step
    return wrong


def make_task(seed=0, sizes=None, max_digits=TASK_MAX_DIGITS, teacher_error=TASK_TEACHER_ERROR, worked="equation"):
    """Every split of the task, deterministic from the seed: {"pretrain": text, split: [rows]}.
    test (500 {"prompt", "answer"} rows, distinct problems) comes first and no other split holds any of its
    problems. pretrain: "Q: <question>\nA: <worked answer>\n" per problem, the way worked examples appear in
    ordinary text, in documents of 1-8 problems that end with <|endoftext|> (the base model learns arithmetic,
    to restate a problem and the end-of-text token, but not the template nor to stop after one answer);
    sft / sft_val: {"prompt", "completion"}, written by a teacher who forgets the carries of a problem that
    has any with probability teacher_error (the same problems whatever the rate); preference: {"prompt",
    "chosen", "rejected"} with a plausible wrong answer; rl: {"prompt", "answer"}. `worked`: how answers are
    written (task_text); the problems and the teacher's slips are the same either way."""
    text = functools.partial(task_text, worked=worked)
    sizes = {**TASK_SIZES, **(sizes or {})}
    n = 10 ** max_digits
    distinct = n * n + n * (n + 1) // 2  # a + b, and a - b with a >= b, for a, b < 10^max_digits
    if sizes["test"] >= distinct:  # drawing distinct test problems, then others, would never end
        raise ValueError(f"operands of up to {max_digits} digits make {distinct} distinct problems; {sizes['test']} "
                         f"test problems leave none for the other splits: ask for fewer, or raise max_digits")
    rng = random.Random(f"task-{seed}-{max_digits}")
    test, seen = [], set()
    while len(test) < sizes["test"]:
        p = task_problem(rng, max_digits)
        if p not in seen:
            seen.add(p)
            test.append(p)

    def draw(n):
        out = []
        while len(out) < n:
            p = task_problem(rng, max_digits)
            if p not in seen:
                out.append(p)
        return out

    out = {"test": [{"prompt": q, "answer": ans} for q, _, ans in (text(*p) for p in test)]}
    lines = ["Q: {}\nA: {}\n".format(*text(*p)[:2]) for p in draw(sizes["pretrain"])]
    docs, k, doc_rng = [], 0, random.Random(f"task-docs-{seed}")
    while k < len(lines):  # documents of 1-8 worked problems, each ended by <|endoftext|> as in GPT-2's data
        n = doc_rng.randint(1, 8)
        docs.append("".join(lines[k:k + n]) + ENDOFTEXT)
        k += n
    out["pretrain"] = "".join(docs)
    teacher = random.Random(f"task-teacher-{seed}")  # its own generator: the problems do not depend on the rate

    def demonstrate(a, op, b):
        slip = forget_carries(a, op, b)
        return text(a, op, b, slip if teacher.random() < teacher_error else None)[1]
    for split in ("sft", "sft_val"):
        out[split] = [{"prompt": text(*p)[0], "completion": demonstrate(*p)} for p in draw(sizes[split])]
    out["preference"] = [{"prompt": text(*p)[0], "chosen": text(*p)[1],
                          "rejected": text(*p, plausible_wrong(*p, rng))[1]} for p in draw(sizes["preference"])]
    out["rl"] = [{"prompt": q, "answer": ans} for q, _, ans in (text(*p) for p in draw(sizes["rl"]))]
    return out


def task_files(directory=None, seed=0, sizes=None, max_digits=TASK_MAX_DIGITS,
               teacher_error=TASK_TEACHER_ERROR, worked="equation"):
    """Write make_task's splits to directory (default: data/task/, or data/task-columns/ for worked="columns":
    pretrain.txt, sft.jsonl, sft_val.jsonl, preference.jsonl, rl.jsonl, test.jsonl) unless the same task is
    there already; returns {split: path}."""
    names = {w: name for name, w in TASK_DATA.items()}
    if worked not in names:
        raise ValueError(f"worked={worked!r}: give one of {', '.join(names)}")
    directory = Path(directory or TASK_DIR.with_name(names[worked]))
    spec = {"seed": seed, "max_digits": max_digits, "teacher_error": teacher_error,
            "sizes": {**TASK_SIZES, **(sizes or {})}, "worked": worked, "version": 4}
    paths = {s: directory / (f"{s}.txt" if s == "pretrain" else f"{s}.jsonl") for s in spec["sizes"]}
    manifest = directory / "task.json"
    if manifest.is_file() and json.loads(manifest.read_text()) == spec and all(p.is_file() for p in paths.values()):
        return paths
    data = make_task(seed, sizes, max_digits, teacher_error, worked)
    directory.mkdir(parents=True, exist_ok=True)
    for split, path in paths.items():
        if split == "pretrain":
            tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
            tmp.write_text(data[split], encoding="utf-8")
            os.replace(tmp, path)
        else:
            write_rows(path, data[split])
    manifest.write_text(json.dumps(spec) + "\n")  # written last: its presence marks a complete set
    return paths


def task_folder(data):
    """The post-training scripts' --data -> where a task's files are: "task" and "task-columns" are this file's
    task (written to data/task/ or data/task-columns/ on first use); anything else comes back as given (a folder
    of such files, or a data file).
    task_folder("task") -> TASK_DIR; task_folder("my_task") -> 'my_task'"""
    return task_files(worked=TASK_DATA[data])["test"].parent if data in TASK_DATA else data


def split_by_percent(rows, spec):
    """--split "train/val/test" percentages -> (train, val, test) rows, in file order: train first, then test,
    then val (Raschka's chapter 7). A bad spec is a ValueError saying what to give.
    split_by_percent(list(range(20)), "85/5/10") -> ([0, ..., 16], [19], [17, 18])"""
    try:
        pcts = [float(x) for x in spec.split("/")]
    except ValueError:
        pcts = []
    if len(pcts) != 3 or abs(sum(pcts) - 100) > 1e-6 or min(pcts) < 0 or min(pcts[:2]) == 0:
        raise ValueError(f"--split {spec!r}: give train/val/test percentages that sum to 100, train and val above "
                         f"0, e.g. 85/5/10")
    n_train, n_test = int(len(rows) * pcts[0] / 100), int(len(rows) * pcts[2] / 100)
    return rows[:n_train], rows[n_train + n_test:], rows[n_train:n_train + n_test]


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_answer(text):
    """The last number in a text (commas dropped), None if it has none: "3 + 4 = 7" -> "7"."""
    nums = _NUMBER.findall(text.split(ENDOFTEXT)[0])
    return nums[-1].replace(",", "").rstrip(".") if nums else None


def reward(completion, answer):
    """The verifier: 1.0 when the completion's final number is the answer, else 0.0 (GSM8K's exact match).
    reward("482 + 39 = 521", "521") -> 1.0; reward("482 + 39 = 511", "521") -> 0.0"""
    got, want = final_answer(completion), final_answer(str(answer))
    return float(got is not None and got == want)


# Chat templates: how instruction-tuned open models see a conversation. Each message is framed by special
# tokens; SFT trains on the assistant's replies and their end-of-turn token only (the mask), and generation
# starts after the assistant header (add_generation_prompt). ChatML is Qwen's; Llama 3 frames each message
# with header tokens and trims its content. (The chat_template in each model's tokenizer_config.json also adds
# a default system message, which the caller passes here explicitly when it wants one.)
CHAT_STYLES = ("chatml", "llama3")
CHAT_ROLES = ("system", "user", "assistant")


def _chat_pieces(messages, style, add_generation_prompt):
    """The conversation as [(text, is_target)], special tokens spelled out in the text."""
    if style not in CHAT_STYLES:
        raise ValueError(f"unknown chat style {style!r}; valid: {', '.join(CHAT_STYLES)}")
    pieces = [] if style == "chatml" else [("<|begin_of_text|>", False)]
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {k} must be {{'role': one of {CHAT_ROLES}, 'content': str}}, got {m!r}")
        target = m["role"] == "assistant"
        if style == "chatml":
            pieces += [(f"<|im_start|>{m['role']}\n", False), (m["content"] + "<|im_end|>", target), ("\n", False)]
        else:
            pieces += [(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n", False),
                       (m["content"].strip() + "<|eot_id|>", target)]
    if add_generation_prompt:
        pieces.append(("<|im_start|>assistant\n" if style == "chatml"
                       else "<|start_header_id|>assistant<|end_header_id|>\n\n", False))
    return pieces


def chat_text(messages, style="chatml", add_generation_prompt=False):
    """The conversation as the text its model reads.
    chat_text([{"role": "user", "content": "2+3?"}], "chatml", True)
    -> '<|im_start|>user\\n2+3?<|im_end|>\\n<|im_start|>assistant\\n'"""
    return "".join(text for text, _ in _chat_pieces(messages, style, add_generation_prompt))


def format_chat(tok, messages, style="chatml", add_generation_prompt=False):
    """Token ids of chat_text(messages) and a loss mask of the same length: mask[i] = 1 where ids[i] belongs
    to an assistant reply or its end-of-turn token (<|im_end|> / <|eot_id|>), the tokens SFT learns.
    format_chat(qwen_tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}])
    -> (ids of '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nYo<|im_end|>\\n', [0]*9 + [1, 1] + [0])"""
    ids, mask = [], []
    for text, target in _chat_pieces(messages, style, add_generation_prompt):
        # every piece boundary is a special token or a newline, where the split patterns cut anyway: piece by
        # piece gives the ids of the whole text, except where a message starts with a newline (the header's
        # newline would merge with it). Then these are the ids a model sees when it answers a prompt encoded
        # alone, which is what training should match; HF's apply_chat_template encodes the whole text.
        piece = tok.encode(text, allowed_special="all")
        ids += piece
        mask += [int(target)] * len(piece)
    return ids, mask


# A verifier for MATH-style problems (the GRPO recipe of Qwen2.5-Math): the model is asked to put its final
# answer in \boxed{...}; the reward compares that answer with the reference after light normalisation.

def boxed_answer(text):
    r"""The content of the last \boxed{...} in text (nested braces kept), None if there is none.
    boxed_answer(r"so $x = \boxed{\frac{1}{2}}$.") -> '\\frac{1}{2}'"""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unbalanced: the answer was cut off


def normalize_math(answer):
    r"""A canonical spelling of a math answer: no spaces, no $ \$ % \% \left \right \! \, or \text{...} wrappers,
    \dfrac and \tfrac as \frac, a trailing period dropped, and numbers as plain decimals (1,000.50 -> 1000.5).
    normalize_math(r"\dfrac{1}{2} ") -> '\\frac{1}{2}'; normalize_math("1,000.50") -> '1000.5'"""
    s = str(answer).strip()
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\$", ""), ("$", ""),
                     ("\\%", ""), ("%", ""),  # MATH writes money as \$18.90 and percentages as 50\%
                     ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), (" ", "")):
        s = s.replace(old, new)
    s = s.rstrip(".")
    if re.fullmatch(r"-?(\d{1,3}(,\d{3})+|\d*)(\.\d+)?", s) and re.search(r"\d", s):  # commas: thousands only
        number = Decimal(s.replace(",", "")).normalize()  # exact: no float rounding of long integers
        s = format(number, "f") if number != 0 else "0"  # 1000.50 -> 1000.5, 1E+3 -> 1000, -0 -> 0
    return s


def math_reward(completion, answer):
    r"""1.0 when the completion's last \boxed{} answer equals the reference answer after normalize_math, else 0.0.
    math_reward(r"... = \boxed{\dfrac12}", r"\dfrac12") -> 1.0; math_reward("the answer is 4", "4") -> 0.0"""
    got = boxed_answer(completion.split(ENDOFTEXT)[0])
    return float(got is not None and normalize_math(got) == normalize_math(answer))


# Prompting a model for an answer, in the project's template or a chat template, and checking that answer:
# what the RL files (grpo.py) share between their rollouts and their evaluation.
TEMPLATES = ("alpaca",) + CHAT_STYLES
MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."  # Qwen2.5-Math's
VERIFIERS = {"number": reward, "boxed": math_reward}


def prompt_ids(tok, prompt, template="alpaca", preamble=True, system=None, input=""):
    """The ids a model is asked with: format_prompt's text (template "alpaca"), or a chat of an optional system
    message and one user turn (the prompt, then the input if any), ending with the assistant's header
    (templates "chatml", "llama3").
    prompt_ids(tok, "2+3?", "chatml") -> ids of '<|im_start|>user\\n2+3?<|im_end|>\\n<|im_start|>assistant\\n'"""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; valid: {', '.join(TEMPLATES)}")
    if template == "alpaca":  # the prompt is ordinary text, as in encode_example
        return tok.encode_ordinary(format_prompt(prompt, input, preamble=preamble))
    user = f"{prompt}\n\n{input}" if input else prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return format_chat(tok, messages, template, add_generation_prompt=True)[0]


def stop_id(tok, template="alpaca"):
    """The id that ends an answer: end-of-text after an Alpaca response, the end-of-turn token in a chat.
    stop_id(byte_tokenizer()) -> 256"""
    if template == "alpaca":
        return tok.eot_token
    name = "<|im_end|>" if template == "chatml" else "<|eot_id|>"
    if name not in tok.special_tokens:
        raise ValueError(f"template {template!r} needs the special token {name}, which this tokenizer lacks")
    return tok.special_tokens[name]


# -----------------------------------------------------------------------------
# 10. Command line


def demo():
    text = (HERE / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:300_000]
    print("Training a 512-token tokenizer (GPT-4 split pattern) on 300 KB of tiny Shakespeare...")
    tok = Tokenizer("gpt4").train(text, 512, special_tokens=[ENDOFTEXT], verbose=True)
    print("first merges:", ", ".join(f"'{render_token(tok.vocab[i])}'" for _, _, i in tok.merges[:12]))
    print("last merges: ", ", ".join(f"'{render_token(tok.vocab[i])}'" for _, _, i in tok.merges[-8:]))
    sample = "To be, or not to be, that is the question:<|endoftext|>"
    ids = tok.encode(sample, allowed_special="all")
    print(f"\n{sample!r}\n -> {len(ids)} ids {ids}")
    print(" -> pieces", [tok.decode([i]) for i in ids])
    assert tok.decode(ids) == sample
    gpt2 = load_gpt2()
    g = gpt2.encode(sample, allowed_special="all")
    print(f"\nGPT-2 (50,257 tokens) uses {len(g)}: {g}\n -> pieces {[gpt2.decode([i]) for i in g]}")
    print("\nNext: python bpe.py --help")


def main(argv=None):
    p = argparse.ArgumentParser(description="Byte-level BPE tokenizer (tiktoken-compatible). "
                                "With no command: a short demo.")
    sub = p.add_subparsers(dest="command")
    t = sub.add_parser("train", help="train a tokenizer on text files")
    t.add_argument("--input", nargs="+", required=True, help="UTF-8 text files")
    t.add_argument("--vocab-size", type=int, required=True, help="256 bytes + merges + specials")
    t.add_argument("--output", required=True, help="tokenizer file to write (a .vocab file goes next to it)")
    t.add_argument("--pattern", default="gpt4", help="gpt2, gpt4, none, or a regex (default gpt4)")
    t.add_argument("--special", nargs="*", default=[ENDOFTEXT], help=f"special tokens (default {ENDOFTEXT})")
    t.add_argument("--processes", type=int, default=os.cpu_count(), help="processes for counting")
    for name in ("encode", "decode", "export"):
        s = sub.add_parser(name, help={"encode": "text to ids (stdout, or a uint16 .bin with --output)",
                                       "decode": "ids to text", "export": "write a tiktoken rank file"}[name])
        s.add_argument("--tokenizer", default="gpt2",
                       help="gpt2, cl100k_base, a .tiktoken file, an HF tokenizer.json or model folder, or a saved tokenizer")
        s.add_argument("--input", help="input file (default: stdin)")
        s.add_argument("--output", required=name == "export", help="output file")
        if name == "encode":
            s.add_argument("--allowed-special", default="all", choices=["all", "none"],
                           help="all: special-token text becomes its id; none: such text is an error (default all)")
            s.add_argument("--processes", type=int, default=None,
                           help="processes for encoding an --output file (default: all cores)")
        if name == "decode":
            s.add_argument("ids", nargs="*", type=int, help="ids (default: read from --input or stdin)")
    args = p.parse_args(argv)
    if args.command is None:
        return demo()
    if args.command == "train":
        tok = Tokenizer(args.pattern).train(args.input, args.vocab_size, special_tokens=args.special,
                                            processes=args.processes, verbose=True)
        tok.save(args.output)
        print(f"wrote {args.output} and {Path(args.output).with_suffix('.vocab')}")
        return
    tok = get_tokenizer(args.tokenizer)
    source = args.input or "stdin"

    def read_input():
        try:
            if not args.input:
                return sys.stdin.read()
            with open(args.input, encoding="utf-8", newline="") as f:  # newline="": \r\n stays, as in tiktoken
                return f.read()
        except UnicodeDecodeError as e:
            raise ValueError(f"{source} is not valid UTF-8 ({e}); convert it first, "
                             f"e.g. iconv -f latin1 -t utf-8") from None
    if args.command == "export":
        tok.export_tiktoken(args.output)
        print(f"wrote {args.output}; load it with tiktoken.Encoding(name=..., pat_str={tok.tiktoken_pattern()!r}, "
              f"mergeable_ranks=tiktoken.load.load_tiktoken_bpe(path), special_tokens={tok.special_tokens})")
    elif args.command == "encode":
        allowed = "all" if args.allowed_special == "all" else ()
        if args.output and not args.input:
            sys.exit("encode --output needs --input FILE")
        try:
            if args.output:
                n = encode_file(tok, args.input, args.output, args.processes, append_eot=False, allowed_special=allowed)
                print(f"wrote {n:,} tokens to {args.output} (uint16)")
            else:
                print(" ".join(map(str, tok.encode(read_input(), allowed_special=allowed))))
        except ValueError as e:
            if "disallowed special token" not in str(e):
                raise
            raise ValueError(f"{source} holds the text of a special token, which --allowed-special none refuses; "
                             f"give --allowed-special all to encode it as the token ({e})") from None
    elif args.command == "decode":
        words = [] if args.ids else read_input().split()
        if bad := [w for w in words if not w.lstrip("-").isdecimal()]:  # isdigit() takes "²", which int() refuses
            raise ValueError(f"{source} holds {bad[0]!r}, not a token id; decode reads ids separated by spaces, "
                             f"as encode prints them")
        text = tok.decode(args.ids or list(map(int, words)))
        if args.output:
            Path(args.output).write_text(text, encoding="utf-8")
        else:
            sys.stdout.write(text)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, RuntimeError) as e:  # bad input: the message, not a traceback
        sys.exit(f"error: {e}")
