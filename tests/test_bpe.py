"""Tests for bpe.py: offline, against tiktoken's gpt2 encoding built from the shipped data/gpt2 files
and against the split patterns of tiktoken's own gpt2 and cl100k_base encodings."""
import base64
import doctest
import hashlib
import json
import os
import pickle
import random
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import regex
import requests
import tiktoken
import tiktoken.load
import tokenizers
from tiktoken_ext import openai_public

import bpe

ROOT = Path(__file__).resolve().parent.parent

SHAKESPEARE = (ROOT / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")

EDGE_CASES = [
    "", " ", "  ", "\n", "\n\n", " \n \n", "\t\t x", "hello world", "Hello, World!",
    "0" * 16, "1234567890 12 3 45678", "I'm you're we've they'll he'd she's IT'S I'M",
    "   leading and trailing   ", "a\n\nb\n\n\nc \n d", "\r\n\r\nwindows\r\nlines\r\n",
    "emoji 👍🏽 family 👨‍👩‍👧 flags 🇫🇷", "日本語のテキスト、中文文本。한국어", "ｆｕｌｌｗｉｄｔｈ",
    "def f(x):\n    return x**2  # comment\n\tif x != 0: pass", "<html><body class='x'>hi</body></html>",
    "Ⅻ ½ ² ٣ ߁", "ſ K İ ǅ", "\x00\x01\x1c\x1d\x85\xa0\u2028\u3000", "a" * 500, " " * 300 + "x",
    "x" + "\n" * 100, "1\n ", "ends in spaces after a newline\n \t",
    "🙂" * 50, "naïve café résumé", "'s 's'''s", "<|endoftext|> is special",
]


def random_unicode(n, seed, max_cp=0x10FFFF):
    """Random code points from all planes (no lone surrogates), mixed with spaces and newlines."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.15:
            out.append(rng.choice(" \n\t\r  "))
        elif r < 0.4:
            out.append(chr(rng.randint(0x20, 0x7E)))
        elif r < 0.6:
            out.append(chr(rng.randint(0x80, 0x7FF)))
        else:
            cp = rng.randint(0x800, max_cp)
            out.append(chr(cp if not 0xD800 <= cp < 0xE000 else 0x41))
    return "".join(out)


def tiktoken_pat_str(name):
    """The split pattern of tiktoken's own encoding `name` ("gpt2", "cl100k_base"), read offline: the
    loaders that would download its vocabulary are stubbed out, only pat_str is used."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(openai_public, "load_tiktoken_bpe", lambda *a, **kw: {})
        mp.setattr(openai_public, "data_gym_to_mergeable_bpe_ranks", lambda *a, **kw: {})
        return getattr(openai_public, name)()["pat_str"]


@pytest.fixture(scope="module")
def gpt2():
    return bpe.load_gpt2()


@pytest.fixture(scope="module")
def tiktoken_gpt2():
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # read the shipped files, never a stale cache
    try:
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            str(ROOT / "data/gpt2/vocab.bpe"), str(ROOT / "data/gpt2/encoder.json"))
    finally:  # leave the environment of other test files alone
        if saved is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved
    return tiktoken.Encoding(name="gpt2", pat_str=tiktoken_pat_str("gpt2"), mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


# --- GPT-2: known ids and equality with tiktoken

def test_known_gpt2_ids(gpt2):
    assert gpt2.encode("hello world") == [31373, 995]
    assert gpt2.encode("0" * 16) == [25645]
    assert gpt2.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert gpt2.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [50256]
    assert gpt2.eot_token == 50256 and gpt2.n_vocab == 50257
    # GPT-2's first 256 ids are not the byte values: "!" is id 0, "A" is 32, a space alone is 220
    assert gpt2.encode("!") == [0] and gpt2.encode("A") == [32] and gpt2.encode(" ") == [220]
    assert gpt2.byte_ids[ord("!")] == 0 and gpt2.byte_ids[0] == 188


def test_gpt2_equals_tiktoken_edge_cases(gpt2, tiktoken_gpt2):
    for text in EDGE_CASES:
        assert gpt2.encode_ordinary(text) == tiktoken_gpt2.encode_ordinary(text), repr(text)
        assert gpt2.encode(text, disallowed_special=()) == tiktoken_gpt2.encode(text, disallowed_special=())


def test_gpt2_equals_tiktoken_shakespeare(gpt2, tiktoken_gpt2):
    text = SHAKESPEARE[:300_000]
    assert gpt2.encode_ordinary(text) == tiktoken_gpt2.encode_ordinary(text)


def test_gpt2_equals_tiktoken_random_unicode(gpt2, tiktoken_gpt2):
    for seed in range(4):
        text = random_unicode(30_000, seed, max_cp=0xFFFF if seed % 2 else 0x10FFFF)
        ids = gpt2.encode_ordinary(text)
        assert ids == tiktoken_gpt2.encode_ordinary(text)
        assert gpt2.decode(ids) == text


def test_long_text_cut_into_pieces_where_chunks_stay_the_same(gpt2, tiktoken_gpt2, monkeypatch):
    # encode_ordinary splits a text of >= 2**18 characters piece by piece (_pieces): the chunks of
    # the pieces must be the chunks of the whole, also across blank lines, \r\n and a long line with no cut
    rng = random.Random(2)
    parts = ["word", " ", "\n", "\n\n", "\r\n", " 12", "!", "x\n", "\ty", "é", "1234", " \n", "'s"]
    text = "".join(rng.choice(parts) for _ in range(20_000)) + "x" * 3000 + "".join(rng.choice(parts) for _ in range(2000))
    for pattern in (bpe.GPT2_SPLIT_PATTERN, bpe.GPT4_SPLIT_PATTERN):
        pieces = list(bpe._pieces(text, 300, True))
        assert len(pieces) > 50 and "".join(pieces) == text and max(map(len, pieces)) > 3000
        assert [c for p in pieces for c in regex.findall(pattern, p)] == regex.findall(pattern, text)
    assert list(bpe._pieces(text, 300, False)) == [text]
    long = text * (2**18 // len(text) + 1)
    assert gpt2.encode_ordinary(long) == tiktoken_gpt2.encode_ordinary(long)
    calls, pieces = [], bpe._pieces  # which patterns encode_ordinary cuts: GPT-2's and GPT-4's, no other
    monkeypatch.setattr(bpe, "_pieces", lambda text, n, can_cut: calls.append(can_cut) or pieces(text, n, can_cut))
    for name in ("gpt2", "gpt4", "llama3"):
        assert bpe.Tokenizer(name).encode_ordinary(long) == list(long.encode())  # no merges: the bytes
    assert calls == [True, True, False]


def test_chunk_cache_is_bounded():
    tok = bpe.Tokenizer("gpt2")  # bytes only: the ids are the utf-8 bytes
    tok._cache.max_size = 3
    text = "a b c d e f g"
    assert tok.encode(text) == list(text.encode()) and 0 < len(tok._cache) <= 3
    assert tok.encode(text) == list(text.encode()) and 0 < len(tok._cache) <= 3


def test_lone_surrogates_like_tiktoken(gpt2, tiktoken_gpt2):
    text = "a\ud800b \udfff"
    assert gpt2.encode(text) == tiktoken_gpt2.encode(text)


def test_fast_splitter_equals_regex_module():
    # bpe.py runs the GPT-2/GPT-4 patterns with `re` and spelled-out classes; they must split as `regex` does
    texts = [random_unicode(20_000, s, max_cp=0xFFFF) for s in range(3)] + EDGE_CASES + [SHAKESPEARE[:50_000]]
    texts.append(random_unicode(5000, 9))  # with emoji & co.: the `regex` fallback
    for pattern in (bpe.GPT2_SPLIT_PATTERN, bpe.GPT4_SPLIT_PATTERN):
        fast, slow = bpe.get_splitter(pattern), regex.compile(pattern).findall
        assert fast is not slow
        for text in texts:
            assert fast(text) == slow(text)


def split_texts():
    """Many short texts from a tricky alphabet (whitespace runs at the end, CR/LF, contractions,
    digits, Unicode spaces, astral code points), random Unicode and English."""
    rng = random.Random(0)
    alphabet = list(" \n\r\t\u00a0\u2028\u3000abcXYZé日ſK'sdmtlvre0123456789.,!?-_\"") + ["👍", "  ", "\r\n"]
    short = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 16))) for _ in range(3000)]
    # tiktoken's Rust regex and the `regex` module follow different Unicode versions, so a code
    # point assigned after Unicode 14 (Python 3.11's unicodedata) may be a letter to one and not the
    # other (U+058B is): the random texts keep assigned code points only
    long = ["".join(c for c in random_unicode(20_000, s, max_cp=0xFFFF if s % 2 else 0x10FFFF)
                    if unicodedata.category(c) != "Cn") for s in range(2)]
    return short + EDGE_CASES + long + [SHAKESPEARE[:50_000]]


@pytest.mark.parametrize("name, ours", [("gpt2", bpe.GPT2_SPLIT_PATTERN), ("cl100k_base", bpe.GPT4_SPLIT_PATTERN)],
                         ids=["gpt2", "cl100k_base"])
def test_split_equals_tiktoken(name, ours):
    # our chunks (through get_splitter: the `re` fast path, and `regex` for astral texts) must be
    # those of tiktoken's own pattern for that encoding...
    pat, split, texts = tiktoken_pat_str(name), bpe.get_splitter(ours), split_texts()
    for text in texts:
        assert split(text) == regex.findall(pat, text), repr(text[:80])
    # ...run by tiktoken's own regex engine (Rust): in an encoding whose vocabulary holds every chunk
    # of every text, each chunk becomes one token, so the ids spell out tiktoken's chunks
    ranks = {bytes([b]): b for b in range(256)}
    for chunk in sorted({c.encode() for text in texts for c in regex.findall(pat, text)}):
        ranks.setdefault(chunk, len(ranks))
    enc = tiktoken.Encoding(name="chunks", pat_str=pat, mergeable_ranks=ranks, special_tokens={})
    for text in texts:
        assert enc.encode_ordinary(text) == [ranks[c.encode()] for c in split(text)], repr(text[:80])


def test_bpe_merge_short_and_long_agree(gpt2):
    rng = random.Random(0)
    for _ in range(200):
        b = bytes(rng.choice(b"ab \n.eehto") for _ in range(rng.randint(2, 120)))
        ids = [gpt2.byte_ids[x] for x in b]
        long = bpe._bpe_merge_long(ids, gpt2.pair_ranks)
        short = ids[:]  # the simple loop, forced on any length
        while len(short) > 1:
            rs = [gpt2.pair_ranks.get(p, float("inf")) for p in zip(short, short[1:])]
            if min(rs) == float("inf"):
                break
            i = rs.index(min(rs))
            short[i:i + 2] = [min(rs)]
        assert long == short == bpe.bpe_merge(ids, gpt2.pair_ranks)


def test_decode_invalid_utf8_like_tiktoken(gpt2, tiktoken_gpt2):
    ids = gpt2.encode("é👍")
    broken = ids[:1] + [gpt2.byte_ids[0xFF]] + ids[1:]
    assert gpt2.decode(broken) == tiktoken_gpt2.decode(broken)
    assert "\ufffd" in gpt2.decode(broken)
    assert gpt2.decode_bytes(broken) == tiktoken_gpt2.decode_bytes(broken)


# --- special tokens

def test_special_token_rules(gpt2, tiktoken_gpt2):
    text = "a<|endoftext|>b"
    with pytest.raises(ValueError, match=r"<\|endoftext\|>"):
        gpt2.encode(text)
    with pytest.raises(ValueError, match="disallowed special token"):
        gpt2.encode(text, disallowed_special={"<|endoftext|>"}, allowed_special=set())
    for kwargs in [dict(allowed_special="all"), dict(disallowed_special=()),
                   dict(allowed_special={"<|endoftext|>"})]:
        assert gpt2.encode(text, **kwargs) == tiktoken_gpt2.encode(text, **kwargs)
    assert gpt2.encode(text, allowed_special="all") == [64, 50256, 65]
    assert gpt2.encode_ordinary(text) == gpt2.encode(text, disallowed_special=())
    assert gpt2.decode([64, 50256, 65]) == text
    assert gpt2.encode_batch(["hello world", text], allowed_special="all") == [[31373, 995], [64, 50256, 65]]


def test_special_ids_never_collide():
    tok = bpe.Tokenizer("gpt2")
    with pytest.raises(ValueError, match="already uses"):
        tok.register_special_tokens({"<|x|>": 65})  # the byte "A"
    tok.register_special_tokens({"<|x|>": 300, "<|y|>": 301})
    with pytest.raises(ValueError, match="already uses"):
        tok.register_special_tokens({"<|z|>": 300})
    assert tok.encode("<|y|><|x|>", allowed_special="all") == [301, 300]
    trained = bpe.Tokenizer("gpt4").train(SHAKESPEARE[:20_000], 300, special_tokens=["<|endoftext|>", "<|pad|>"])
    assert set(trained.special_tokens.values()) == {298, 299}
    assert max(trained.vocab) == 297 and trained.n_vocab == 300


def test_overlapping_and_unknown_specials(gpt2, tiktoken_gpt2):
    # a special token that contains another one wins (HF tokenizers' added tokens match leftmost-longest;
    # tiktoken's order over overlapping specials is a hash order); names that are not special tokens are text
    hf = tokenizers.Tokenizer(tokenizers.models.BPE({"a": 0, "b": 1, "c": 2}, []))
    hf.add_special_tokens(["<|a|>", "<|a|>b"])
    tok = bpe.Tokenizer("none", special_tokens={"<|a|>": 256, "<|a|>b": 257})
    ids = tok.encode("a<|a|>bc<|a|>", allowed_special="all")
    assert [tok.decode([i]) for i in ids] == hf.encode("a<|a|>bc<|a|>").tokens == ["a", "<|a|>b", "c", "<|a|>"]
    text = "x<|foo|>y<|endoftext|>"
    kw = dict(allowed_special={"<|foo|>", "<|endoftext|>"})
    assert gpt2.encode(text, **kw) == tiktoken_gpt2.encode(text, **kw)


def test_tokenizer_state_follows_its_changes():
    tok = bpe.Tokenizer("gpt2")
    assert tok.encode("the the") == list(b"the the")  # no merges yet (and now in the chunk cache)
    tok.train("the the the\n" * 3, 260)
    ids = tok.encode("the the")
    assert ids == bpe.Tokenizer.loads(tok.dumps()).encode("the the") and len(ids) == 2
    tok.register_special_tokens({"<|x|>": 300})
    tok.register_special_tokens({"<|y|>": 301})  # a later call keeps the earlier special decodable
    assert tok.decode([300, 301]) == "<|x|><|y|>"
    with pytest.raises(ValueError, match="unique"):
        bpe.Tokenizer("gpt2", {**{i: bytes([i]) for i in range(256)}, 256: b"a"})
    # vocab_size = 256 bytes + the specials: no merges, and that is allowed
    zero = bpe.Tokenizer("gpt2").train("hello", 257, special_tokens=[bpe.ENDOFTEXT])
    assert zero.merges == [] and zero.special_tokens == {bpe.ENDOFTEXT: 256}
    # a normalizing tokenizer encodes the NFD and NFC spellings alike, also after pickling (worker processes)
    nfc = "café naïve"
    nfd = unicodedata.normalize("NFD", nfc)
    norm = bpe.Tokenizer("gpt2", normalize="NFC")
    assert norm.encode(nfd) == norm.encode(nfc) == list(nfc.encode()) != bpe.Tokenizer("gpt2").encode(nfd)
    assert pickle.loads(pickle.dumps(norm)).encode(nfd) == norm.encode(nfc)


# --- training

def naive_train(counts, n_merges):
    """Reference: recount every pair from scratch each step (minbpe-style), same tie rule."""
    words = {k: list(k.encode()) for k in counts}
    vocab = {i: bytes([i]) for i in range(256)}
    merges = []
    for _ in range(n_merges):
        stats = Counter()
        for k, w in words.items():
            for p in zip(w, w[1:]):
                stats[p] += counts[k]
        if not stats:
            break
        a, b = min(stats, key=lambda p: (-stats[p], p))
        merged = vocab[a] + vocab[b]
        z = next((i for i, v in vocab.items() if v == merged), len(vocab))
        vocab[z] = merged
        merges.append((a, b, z))
        words = {k: bpe._merge_word(w, a, b, z) for k, w in words.items()}
    return merges


def test_incremental_training_equals_naive():
    for pattern, text in [("gpt2", SHAKESPEARE[:15_000]), ("gpt4", random_unicode(3000, 7) + SHAKESPEARE[:3000]),
                          ("gpt2", "aaaaaaa aaaa aa ab ab aba abab " * 5)]:
        counts = bpe.count_chunks(text, pattern)
        merges, _ = bpe.train_merges(counts, 150)
        assert merges == naive_train(counts, 150)


def test_training_sees_the_text_as_encoding_will():
    """A tokenizer that normalizes (NFC) learns its merges from normalized text: NFD input's lone combining
    accents never reach encode, so no merge may be spent on them."""
    import unicodedata
    text = unicodedata.normalize("NFD", "café résumé naïve\n" * 50)
    tok = bpe.Tokenizer("gpt2", normalize="NFC").train(text, 270)
    assert all(b"\xcc" not in tok.vocab[i] for _, _, i in tok.merges)
    assert len(tok.encode(text)) < len(bpe.Tokenizer("gpt2", normalize="NFC").encode(text))  # and they help


def test_training_runs_out_of_pairs():
    tok = bpe.Tokenizer("gpt2").train("ab ab", 400)
    assert [(a, b) for a, b, _ in tok.merges] == [(97, 98), (32, 256)]  # "ab", then " ab"
    assert tok.encode("ab ab") == [256, 257]


def test_count_chunks_split_invariant(tmp_path):
    # pieces are cut only where chunking is unchanged, so counts equal one findall over the whole
    rng = random.Random(1)
    text = "".join(rng.choice(["word", " ", "\n", "\n\n", "\r\n", " 12", "!", "x\n", "\ty", "é", "1234"])
                   for _ in range(20_000))
    (tmp_path / "a.txt").write_text(text, encoding="utf-8", newline="")
    for pattern in (bpe.GPT2_SPLIT_PATTERN, bpe.GPT4_SPLIT_PATTERN):
        expected = Counter(regex.findall(pattern, text))
        pieces = list(bpe._pieces(text, 500, True))
        assert len(pieces) > 20 and "".join(pieces) == text
        assert bpe.count_chunks(text, pattern, piece_chars=500) == expected
        assert bpe.count_chunks([tmp_path / "a.txt"], pattern, processes=2, piece_chars=700) == expected


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_sequential_and_parallel_training_identical(tmp_path, monkeypatch, pattern):
    files = []
    for i in range(2):
        files.append(tmp_path / f"part{i}.txt")
        files[-1].write_text(SHAKESPEARE[i * 40_000:(i + 1) * 40_000] + "<|endoftext|>tail", encoding="utf-8")
    whole = bpe.Tokenizer(pattern).train(files, 600, special_tokens=["<|endoftext|>"], processes=1)
    # the default pieces hold a 40 KB file whole: cut them to 2,000 characters so that the cutting
    # at safe newlines really runs, in one process and in two
    cut, real_pieces = [], bpe._pieces

    def small_pieces(sources, piece_chars, can_cut):
        for piece in real_pieces(sources, 2000, can_cut):
            cut.append(len(piece))
            yield piece
    monkeypatch.setattr(bpe, "_pieces", small_pieces)
    seq = bpe.Tokenizer(pattern).train(files, 600, special_tokens=["<|endoftext|>"], processes=1)
    assert len(cut) > 40 and max(cut) < 4000 and sum(cut) == sum(len(f.read_text()) for f in files)
    par = bpe.Tokenizer(pattern)
    par.train([str(f) for f in files], 600, special_tokens=["<|endoftext|>"], processes=2)
    assert len(cut) > 80
    counts = [{k: t.train_stats[k] for k in ("chunks", "unique_chunks")} for t in (whole, seq, par)]
    assert counts[0] == counts[1] == counts[2]
    assert whole.merges == seq.merges == par.merges and len(seq.merges) == 600 - 257
    # special-token text is a document boundary, never counted as text
    assert all(b"<|" not in seq.vocab[i] for _, _, i in seq.merges)


def test_save_load_roundtrip(tmp_path, gpt2):
    tok = bpe.Tokenizer("gpt2").train(SHAKESPEARE[:50_000], 500, special_tokens=["<|endoftext|>"])
    tok.save(tmp_path / "t.bpe")
    vocab_file = (tmp_path / "t.vocab").read_text(encoding="utf-8")
    assert len(vocab_file.splitlines()) == 500 and tok.merges[0] == (32, 116, 256)  # " t" comes first
    for line in ["[\\n] 10", "[ ][t] -> [ t] 256", "[ t][he] -> [ the] 260", "[<|endoftext|>] 499 (special)"]:
        assert line + "\n" in vocab_file, line
    back = bpe.Tokenizer.load(tmp_path / "t.bpe")
    assert back.merges == tok.merges and back.vocab == tok.vocab and back.special_tokens == tok.special_tokens
    sample = SHAKESPEARE[60_000:70_000] + "<|endoftext|>"
    assert back.encode(sample, allowed_special="all") == tok.encode(sample, allowed_special="all")
    assert back.decode(back.encode(sample, allowed_special="all")) == sample
    # GPT-2 itself (permuted byte ids) survives save/load
    gpt2.save(tmp_path / "gpt2.bpe")
    g = bpe.Tokenizer.load(tmp_path / "gpt2.bpe")
    assert g.encode("hello world <|endoftext|>", allowed_special="all") == [31373, 995, 220, 50256]


def test_dumps_loads_roundtrip(gpt2):
    # a checkpoint records its tokenizer as dumps() text; loads() must give back one that encodes alike
    tok = bpe.Tokenizer("gpt4").train(SHAKESPEARE[:5000], 300, special_tokens=["<|endoftext|>", "<|pad|>"])
    text = tok.dumps()
    back = bpe.Tokenizer.loads(text)
    assert (back.pattern, back.vocab, back.merges, back.special_tokens) == \
        (tok.pattern, tok.vocab, tok.merges, tok.special_tokens)
    assert back.dumps() == text
    sample = SHAKESPEARE[9000:12_000] + "<|pad|>\n 🙂"
    assert back.encode(sample, allowed_special="all") == tok.encode(sample, allowed_special="all")
    g = bpe.Tokenizer.loads(gpt2.dumps())  # permuted byte ids survive too
    assert g.byte_ids == gpt2.byte_ids and g.encode("hello world <|endoftext|>", allowed_special="all") == \
        [31373, 995, 220, 50256]
    with pytest.raises(ValueError, match="<string>:4"):
        bpe.Tokenizer.loads(text.replace("specials 2", "specials two"))
    with pytest.raises(ValueError, match="ckpt.pt:1"):
        bpe.Tokenizer.loads("hello\n", source="ckpt.pt")


def test_loads_keeps_every_field_and_checks_every_line():
    tok = bpe.Tokenizer("gpt2", normalize="NFC", special_tokens={"<|my token|>": 256})
    back = bpe.Tokenizer.loads(tok.dumps())
    assert back.normalize == "NFC" and back.special_tokens == {"<|my token|>": 256}
    good = "bpe v1\npattern \"\"\nbytes identity\nspecials 0\nmerges 2\n97 98 256\n256 99 257\n"
    assert bpe.Tokenizer.loads(good).vocab[257] == b"abc"
    with pytest.raises(ValueError, match="unsupported version"):
        bpe.Tokenizer.loads(good.replace("bpe v1", "bpe v2"))
    with pytest.raises(ValueError, match="256 distinct"):
        bpe.Tokenizer.loads(good.replace("identity", " ".join(map(str, [0] + list(range(255))))))
    with pytest.raises(ValueError, match="contradicts"):
        bpe.Tokenizer.loads(good.replace("256 99 257", "98 99 256"))


def test_docstring_examples():
    # the input -> output examples in bpe.py's docstrings are true
    result = doctest.testmod(bpe)
    assert result.attempted >= 25 and result.failed == 0


def test_pattern_none_basic_bpe():
    text = SHAKESPEARE[:5000]
    tok = bpe.Tokenizer("none").train(text, 300)
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) < 0.75 * len(text.encode())
    # with no split pattern merges may cross spaces
    assert any(b" " in tok.vocab[i][1:] and tok.vocab[i].strip() for _, _, i in tok.merges)


# --- tiktoken rank files

@pytest.mark.parametrize("pattern", ["gpt2", "gpt4", "none"])
def test_export_loads_in_tiktoken_with_same_ids(tmp_path, pattern):
    n = 8000 if pattern == "none" else 60_000  # "none" trains on each text as one long chunk: slow
    tok = bpe.Tokenizer(pattern).train(SHAKESPEARE[:n], 700 if n > 8000 else 350, special_tokens=["<|endoftext|>"])
    tok.export_tiktoken(tmp_path / "t.tiktoken")
    # tiktoken splits with its own gpt2 / cl100k_base pattern, not with ours
    pat_str = {"gpt2": tiktoken_pat_str("gpt2"), "gpt4": tiktoken_pat_str("cl100k_base")}.get(pattern,
                                                                                             tok.tiktoken_pattern())
    enc = tiktoken.Encoding(name="t", pat_str=pat_str,
                            mergeable_ranks=tiktoken.load.load_tiktoken_bpe(str(tmp_path / "t.tiktoken")),
                            special_tokens=tok.special_tokens)
    texts = [SHAKESPEARE[100_000:110_000], random_unicode(1000, 3)] + EDGE_CASES[:-1]
    if pattern == "none":
        texts = [t[:2000] for t in texts]
    for text in texts:
        assert tok.encode(text) == enc.encode(text), repr(text[:50])
    assert tok.encode("x<|endoftext|>", allowed_special="all") == enc.encode("x<|endoftext|>", allowed_special="all")


def test_load_rank_file_recovers_merges(tmp_path, gpt2):
    # write GPT-2 as a tiktoken rank file, load it back: the merges recovered from the ranks alone
    # are GPT-2's vocab.bpe merges, and the ids are the same
    lines = [base64.b64encode(gpt2.vocab[i]) + b" " + str(i).encode() for i in sorted(gpt2.vocab)]
    (tmp_path / "gpt2.tiktoken").write_bytes(b"\n".join(lines) + b"\n")
    tok = bpe.load_tiktoken(tmp_path / "gpt2.tiktoken", "gpt2", {"<|endoftext|>": 50256})
    assert tok.merges == gpt2.merges
    text = SHAKESPEARE[:20_000] + random_unicode(2000, 5)
    assert tok.encode(text) == gpt2.encode(text)


def test_tiny_hand_written_rank_file(tmp_path):
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({b"ab": 256, b"abc": 257, b"cab": 258})
    (tmp_path / "r.tiktoken").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    tok = bpe.load_tiktoken(tmp_path / "r.tiktoken", "none")
    assert tok.merges == [(97, 98, 256), (256, 99, 257), (99, 256, 258)]
    assert tok.encode("abcab") == [257, 256]
    assert tok.encode("cabc") == [99, 257]  # c,ab,c: "abc" (257) ranks before "cab" (258)


def test_rank_file_specials_and_llama3_numbering(tmp_path):
    def write(name, merged):
        ranks = {bytes([b]): b for b in range(256)} | {t: 256 + k for k, t in enumerate(merged)}
        (tmp_path / name).write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
        return tmp_path / name, len(ranks)
    path, n = write("r.tiktoken", [b"ab", b"abc"])
    tok = bpe.load_tiktoken(path, "gpt2", {bpe.ENDOFTEXT: 258})
    assert tok.encode("abc" + bpe.ENDOFTEXT, allowed_special="all") == [257, 258]
    # Meta's Llama 3 numbering (tokenizer.py; 128000.. in the real file): right after the ranks
    llama = bpe.load_llama3(path)
    assert len(llama.special_tokens) == 256 and llama.n_vocab == n + 256
    assert [llama.special_tokens[k] - n for k in ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                                   "<|eot_id|>", "<|reserved_special_token_3|>")] == [0, 1, 6, 9, 11]
    assert llama.eot_token == n + 1
    # a token that BPE cannot build from two lower-ranked tokens: "abc" with neither "ab" nor "bc" ranked before it
    with pytest.raises(ValueError, match="cannot be made from two"):
        bpe.load_tiktoken(write("bad.tiktoken", [b"abc"])[0], "none")


def test_tokenizer_json_normalizer_and_merge_order(tmp_path):
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.normalizer = tokenizers.normalizers.NFC()
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator([SHAKESPEARE[:20_000], "café naïve résumé\n" * 20], tokenizers.trainers.BpeTrainer(
        vocab_size=400, show_progress=False, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    hf.save(str(tmp_path / "tokenizer.json"))
    ours = bpe.load_tokenizer_json(tmp_path / "tokenizer.json")
    text = unicodedata.normalize("NFD", "café naïve résumé, the end")
    assert ours.encode(text) == hf.encode(text).ids
    # HF applies merges in list order, bpe.py by result id: a file whose ids do not follow the merges is refused
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    first, second = ("".join(m if isinstance(m, list) else m.split(" ")) for m in spec["model"]["merges"][:2])
    vocab = spec["model"]["vocab"]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (tmp_path / "swapped.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="merge order"):
        bpe.load_tokenizer_json(tmp_path / "swapped.json")


# --- encode_file

@pytest.mark.parametrize("processes", [1, 2])
def test_encode_file(tmp_path, gpt2, processes):
    text = SHAKESPEARE[:200_000] + "\n<|endoftext|>The end.\n"
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    n = bpe.encode_file(gpt2, tmp_path / "in.txt", tmp_path / "out.bin", processes=processes,
                        allowed_special="all")
    got = bpe.load_tokens(tmp_path / "out.bin")
    assert got.dtype == np.uint16 and n == len(got)
    assert got.tolist() == gpt2.encode(text, allowed_special="all") + [50256]
    assert not (tmp_path / "out.bin.part").exists()
    with pytest.raises(ValueError, match="disallowed special"):
        bpe.encode_file(gpt2, tmp_path / "in.txt", tmp_path / "out2.bin", processes=1)


def test_encode_file_options_and_pattern_none_is_never_cut(tmp_path):
    tok = bpe.Tokenizer("gpt2", special_tokens={bpe.ENDOFTEXT: 65535})  # the largest vocabulary uint16 holds
    (tmp_path / "in.txt").write_text("hi\nthere")
    assert bpe.encode_file(tok, tmp_path / "in.txt", tmp_path / "a.bin", processes=1, append_eot=False) == 8
    assert bpe.load_tokens(tmp_path / "a.bin").tolist() == list(b"hi\nthere")
    bpe.encode_file(tok, tmp_path / "in.txt", tmp_path / "b.bin", processes=1)
    assert bpe.load_tokens(tmp_path / "b.bin").tolist() == list(b"hi\nthere") + [65535]
    # pattern "none": the text is one chunk, so counting must not cut it at newlines
    text = "one\ntwo\nthree\n" * 20
    assert bpe.count_chunks(text, "none", piece_chars=50) == Counter({text: 1})


# --- bad input

def test_bad_inputs(tmp_path, gpt2):
    with pytest.raises(ValueError, match="below 256"):
        bpe.Tokenizer("gpt2").train("hello", 256, special_tokens=["<|endoftext|>"])
    with pytest.raises(ValueError, match="empty"):
        bpe.Tokenizer("gpt2").train("", 300)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bpe.Tokenizer("gpt2").train([tmp_path / "nope.txt"], 300)
    (tmp_path / "some.txt").write_text("some text")
    with pytest.raises(ValueError, match="names a file"):
        bpe.Tokenizer("gpt2").train(str(tmp_path / "some.txt"), 300)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not valid UTF-8"):
        bpe.Tokenizer("gpt2").train([tmp_path / "latin1.txt"], 300)
    with pytest.raises(ValueError, match="not in this tokenizer's vocabulary"):
        gpt2.decode([31373, 50257])
    with pytest.raises(ValueError, match="-1"):
        gpt2.decode([-1])
    with pytest.raises(TypeError, match="expects str"):
        gpt2.encode(b"bytes")
    with pytest.raises(FileNotFoundError, match="train one"):
        bpe.Tokenizer.load(tmp_path / "missing.bpe")
    tok = bpe.Tokenizer("gpt2").train(SHAKESPEARE[:5000], 280)
    tok.save(tmp_path / "ok.bpe")
    good = (tmp_path / "ok.bpe").read_text().splitlines()
    corruptions = {"garbage": ["hello"], "truncated": good[:-5],
                   "bad merge": good[:-1] + ["1 2 three"], "contradiction": good + ["97 98 256"],
                   "bad bytes": [good[0], good[1], "bytes 1 2 3"] + good[3:]}
    for name, lines in corruptions.items():
        (tmp_path / "bad.bpe").write_text("\n".join(lines) + "\n")
        with pytest.raises(ValueError, match="bad.bpe"):
            bpe.Tokenizer.load(tmp_path / "bad.bpe")
    (tmp_path / "bad.tiktoken").write_text("YQ== 0\nnot-base64!! 1\n")
    with pytest.raises(ValueError, match="bad.tiktoken:2"):
        bpe.load_tiktoken(tmp_path / "bad.tiktoken")
    (tmp_path / "short.tiktoken").write_text("YQ== 0\n")
    with pytest.raises(ValueError, match="all 256 single bytes"):
        bpe.load_tiktoken(tmp_path / "short.tiktoken")
    with pytest.raises(FileNotFoundError, match="openaipublic"):
        bpe.load_gpt2(tmp_path / "empty_dir", download_missing=False)
    with pytest.raises(ValueError, match="no <\\|endoftext\\|>"):
        bpe.Tokenizer("gpt2").eot_token


# --- downloads (no network: a fake requests.get that honours Range)

class FakeResponse:
    def __init__(self, data, headers):
        start = 0
        if "Range" in headers:
            start = int(headers["Range"].split("=")[1].rstrip("-"))
        self.status_code = 206 if start else 200
        if start >= len(data):
            self.status_code = 416
        self.body = data[start:]
        self.headers = {"Content-Length": str(len(self.body))}

    def iter_content(self, n):
        for i in range(0, len(self.body), n):
            yield self.body[i:i + n]


def test_download_resumes_and_checks(tmp_path, monkeypatch):
    data = bytes(range(256)) * 1000
    calls = []

    def fake_get(url, headers=None, **kw):
        calls.append(dict(headers or {}))
        return FakeResponse(data, headers or {})
    monkeypatch.setattr(requests, "get", fake_get)
    target = tmp_path / "sub" / "file.bin"
    target.parent.mkdir()
    (tmp_path / "sub" / "file.bin.part").write_bytes(data[:1000])  # an interrupted earlier download
    bpe.download("https://example/file", target, hashlib.sha256(data).hexdigest(), chunk_size=4096)
    assert calls[-1] == {"Range": "bytes=1000-"} and target.read_bytes() == data
    bpe.download("https://example/file", target)  # cached: no request
    assert len(calls) == 1
    with pytest.raises(RuntimeError, match="sha256"):
        bpe.download("https://example/file", tmp_path / "other.bin", "0" * 64)
    assert not (tmp_path / "other.bin").exists() and not (tmp_path / "other.bin.part").exists()


def test_load_gpt2_downloads_missing_files(tmp_path, monkeypatch):
    files = {url: (ROOT / "data/gpt2" / name).read_bytes() for name, url in bpe.GPT2_URLS.items()}
    monkeypatch.setattr(requests, "get", lambda url, headers=None, **kw: FakeResponse(files[url], headers or {}))
    tok = bpe.load_gpt2(tmp_path / "gpt2")
    assert tok.encode("hello world") == [31373, 995]
    assert (tmp_path / "gpt2" / "vocab.bpe").read_bytes() == files[bpe.GPT2_URLS["vocab.bpe"]]


# --- command line

def test_cli(tmp_path, capsys):
    (tmp_path / "in.txt").write_text(SHAKESPEARE[:30_000], encoding="utf-8")
    bpe.main(["train", "--input", str(tmp_path / "in.txt"), "--vocab-size", "400", "--output",
              str(tmp_path / "t.bpe"), "--pattern", "gpt2", "--processes", "1"])
    assert len(bpe.Tokenizer.load(tmp_path / "t.bpe").merges) == 400 - 256 - 1
    bpe.main(["decode", "--tokenizer", "gpt2", "31373", "995"])
    assert capsys.readouterr().out.endswith("hello world")
    (tmp_path / "hw.txt").write_text("hello world<|endoftext|>")
    bpe.main(["encode", "--tokenizer", str(tmp_path / "t.bpe"), "--input", str(tmp_path / "hw.txt")])
    ids = [int(x) for x in capsys.readouterr().out.split()]
    assert ids[-1] == 399 and bpe.Tokenizer.load(tmp_path / "t.bpe").decode(ids) == "hello world<|endoftext|>"
    (tmp_path / "crlf.txt").write_bytes(b"a\r\nb\rc")  # a file's \r\n and \r are text, as tiktoken reads them
    bpe.main(["encode", "--tokenizer", "gpt2", "--input", str(tmp_path / "crlf.txt")])
    assert capsys.readouterr().out.split() == [str(i) for i in bpe.load_gpt2().encode("a\r\nb\rc")]  # was "a\nb\nc"
    with pytest.raises(ValueError, match=r"may not end in \.vocab .* name it e\.g\. .*t2\.bpe"):
        bpe.main(["train", "--input", str(tmp_path / "in.txt"), "--vocab-size", "300", "--output",
                  str(tmp_path / "t2.vocab"), "--processes", "1"])  # the listing overwrote the tokenizer
    bpe.main(["export", "--tokenizer", str(tmp_path / "t.bpe"), "--output", str(tmp_path / "t.tiktoken")])
    assert bpe.load_tiktoken(tmp_path / "t.tiktoken", "gpt2").vocab == bpe.Tokenizer.load(tmp_path / "t.bpe").vocab



def test_cli_bad_input_names_the_file_and_the_fix(tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9".encode("latin1"))
    (tmp_path / "words.txt").write_text("31373 hello")
    (tmp_path / "sup.txt").write_text("31373 \u00b2")
    (tmp_path / "eot.txt").write_text("the end<|endoftext|>")
    (tmp_path / "folder").mkdir()
    cases = [  # (argv, the message); each was a bare codec / int() error, a wrong message or a regex traceback
        (["encode", "--input", tmp_path / "latin1.txt"], "latin1.txt is not valid UTF-8 .*iconv"),
        (["decode", "--input", tmp_path / "words.txt"], "words.txt holds 'hello', not a token id"),
        (["decode", "--input", tmp_path / "sup.txt"], "sup.txt holds '\u00b2', not a token id"),  # int() refused it
        (["encode", "--input", tmp_path / "eot.txt", "--allowed-special", "none"],  # named only Python's argument
         "eot.txt holds the text of a special token, .* give --allowed-special all"),
        (["encode", "--tokenizer", tmp_path / "latin1.txt"], "latin1.txt is not a bpe.py tokenizer .*bpe.py train"),
        (["train", "--input", tmp_path / "folder", "--vocab-size", "300", "--output", tmp_path / "t.bpe"],
         "folder is a folder; give its files"),
        (["train", "--input", tmp_path / "words.txt", "--vocab-size", "300", "--output", tmp_path / "t.bpe",
          "--pattern", "("], r"pattern '\(' is not one of gpt2, .* nor a valid regex"),
        (["train", "--input", tmp_path / "words.txt", "--vocab-size", "300", "--output", tmp_path / "t.bpe",
          "--pattern", "gpt5", "--processes", "1"], "or the pattern 'gpt5' matches none of it")]
    for argv, match in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            bpe.main([*map(str, argv)])
    with pytest.raises(SystemExit):  # a typo of none was taken for none
        bpe.main(["encode", "--allowed-special", "nne"])
    assert "invalid choice: 'nne'" in capsys.readouterr().err


# --- post-training text: prompt template, data files, the arithmetic task, verifiers, chat templates

def test_prompt_template_and_loss_mask():
    alpaca = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
              "request.\n\n### Instruction:\nAdd.\n\n### Input:\n2 3\n\n### Response:\n")  # Raschka ch. 7, by hand
    assert bpe.format_prompt("Add.", "2 3") == alpaca
    tok = bpe.byte_tokenizer()
    ids, mask = bpe.encode_example(tok, "Add.", "5", input="2 3")
    assert ids == list(alpaca.encode()) + [ord("5"), 256] and mask == [0] * len(alpaca) + [1, 1]
    short = "### Instruction:\nAdd.\n\n### Response:\n"  # preamble=False: the first sentence left out
    assert bpe.encode_example(tok, "Add.", "5", preamble=False)[0] == list(short.encode()) + [ord("5"), 256]


def test_read_rows_lines_and_fields(tmp_path):
    # JSON Lines ends a row at "\n" only: U+2028 / U+0085 inside a string (written raw) are text
    rows = [{"prompt": "a\u2028b\x85c", "completion": "d"}, {"prompt": "e", "completion": "f"}]
    bpe.write_rows(tmp_path / "r.jsonl", rows)
    assert "\u2028" in (tmp_path / "r.jsonl").read_text(encoding="utf-8")
    assert bpe.read_rows(tmp_path / "r.jsonl", "sft") == [r | {"input": ""} for r in rows]
    with pytest.raises(ValueError, match="label"):
        bpe.check_row({"text": "t", "label": True}, "classification")
    # TRL's conversational rows: named as such (they were "field 'prompt' is missing")
    chat = [{"role": "user", "content": "hi"}]
    for row, kind in (({"messages": chat}, "sft"), ({"prompt": chat, "completion": chat}, "sft"),
                      ({"prompt": "hi", "chosen": chat, "rejected": chat}, "preference")):
        with pytest.raises(ValueError, match="r: a conversational row .* join each side's turns into text"):
            bpe.check_row(row, kind, "r")


def test_arithmetic_task():
    rng = random.Random(0)
    problems = [bpe.task_problem(rng, 2) for _ in range(2000)]
    assert all(0 <= a < 100 and 0 <= b < 100 and (op == "+" or a >= b) for a, op, b in problems)
    assert 0 in {x for a, _, b in problems for x in (a, b)}  # a 1-digit operand is 0..9, 0 included
    assert bpe.task_text(7, "-", 3) == ("What is 7 - 3?", "7 - 3 = 4", "4")
    # column by column, carries dropped, worked by hand: 482 + 039 -> 4|11|11 -> 411; 503 - 027 -> 5|-2|-4 -> 586
    assert bpe.forget_carries(482, "+", 39) == 411 and bpe.forget_carries(503, "-", 27) == 586
    assert all(bpe.plausible_wrong(12, "+", 3, random.Random(s)) != 15 for s in range(20))  # no carry: still wrong
    sizes = {"pretrain": 40, "sft": 40, "sft_val": 5, "preference": 20, "rl": 20, "test": 60}
    task = bpe.make_task(0, sizes, max_digits=1, teacher_error=0.0)
    test = {r["prompt"] for r in task["test"]}
    assert len(test) == 60 and not test & {r["prompt"] for s in ("sft", "sft_val", "preference", "rl") for r in task[s]}
    for r in task["sft"]:  # teacher_error=0: every demonstration is right
        a, op, b = r["prompt"][len("What is "):-1].split()
        assert r["completion"] == bpe.task_text(int(a), op, int(b))[1]
    docs = task["pretrain"].split(bpe.ENDOFTEXT)
    assert docs[-1] == "" and sum(d.count("Q: ") for d in docs) == 40 and all(d.endswith("\n") for d in docs[:-1])
    # 1-digit operands: 100 sums + 55 differences. Asking for all of them as test problems never ended
    assert len({bpe.task_problem(rng, 1) for _ in range(20000)}) == 155
    with pytest.raises(ValueError, match="up to 1 digits make 155 distinct problems; 155 test problems"):
        bpe.make_task(0, {**sizes, "test": 155}, max_digits=1)
    assert len({r["prompt"] for r in bpe.make_task(0, {**sizes, "test": 154}, max_digits=1)["test"]}) == 154


def test_column_work_by_hand():
    """Each column is "top op bottom op carry-in = result", ones first; a borrowing column shows its top + 10."""
    assert bpe.column_work(482, "+", 39) == ("2+9+0=11, 8+3+1=12, 4+0+1=5", 521)
    assert bpe.column_work(99, "+", 1) == ("9+1+0=10, 9+0+1=10", 100)  # the last carry leads
    assert bpe.column_work(503, "-", 27) == ("13-7-0=6, 10-2-1=7, 5-0-1=4", 476)
    assert bpe.column_work(100, "-", 99) == ("10-9-0=1, 10-9-1=0, 1-0-1=0", 1)  # leading zeros dropped
    assert bpe.column_work(482, "+", 39, carries=False) == ("2+9+0=11, 8+3+0=11, 4+0+0=4", 411)
    assert bpe.column_work(503, "-", 27, carries=False) == ("13-7-0=6, 10-2-0=8, 5-0-0=5", 586)
    assert bpe.column_work(7, "+", 0) == ("7+0+0=7", 7)
    rng = random.Random(1)
    for a, op, b in (bpe.task_problem(rng, 3) for _ in range(3000)):  # right, and the slip is forget_carries'
        assert bpe.column_work(a, op, b)[1] == (a + b if op == "+" else a - b)
        assert bpe.column_work(a, op, b, carries=False)[1] == bpe.forget_carries(a, op, b)
    assert bpe.task_text(482, "+", 39, worked="columns") == (
        "What is 482 + 39?", "482 + 39: 2+9+0=11, 8+3+1=12, 4+0+1=5, so 521", "521")
    assert bpe.task_text(482, "+", 39, 411, worked="columns")[1] == "482 + 39: 2+9+0=11, 8+3+0=11, 4+0+0=4, so 411"
    assert bpe.task_text(482, "+", 39, 511, worked="columns")[1] == "482 + 39: 2+9+0=11, 8+3+1=12, 4+0+1=5, so 511"
    with pytest.raises(ValueError, match="worked='steps': give one of equation, columns"):
        bpe.task_text(1, "+", 2, worked="steps")


def test_columns_task_is_the_same_problems_worked_in_columns(tmp_path):
    """worked="columns": the same problems, the same slips of the teacher, only the written answers differ; the
    verifier reads each one's last number."""
    sizes = {"pretrain": 300, "sft": 300, "sft_val": 20, "preference": 100, "rl": 50, "test": 50}
    eq, col = bpe.make_task(0, sizes), bpe.make_task(0, sizes, worked="columns")
    assert eq["test"] == col["test"] and eq["rl"] == col["rl"]
    slips = 0
    for e, c in zip(eq["sft"] + eq["sft_val"], col["sft"] + col["sft_val"]):
        a, op, b = e["prompt"].removeprefix("What is ").removesuffix("?").split()
        assert c["prompt"] == e["prompt"] and bpe.final_answer(c["completion"]) == bpe.final_answer(e["completion"])
        slip = bpe.final_answer(e["completion"]) != str(eval(f"{a}{op}{b}"))
        assert c["completion"] == bpe.task_text(int(a), op, int(b), bpe.forget_carries(int(a), op, int(b)) if slip
                                                else None, worked="columns")[1]
        slips += slip
    assert slips > 50  # 300 problems, about half with a carry, 3 in 4 of those slipped
    for e, c in zip(eq["preference"], col["preference"]):
        assert [bpe.final_answer(c[k]) for k in ("chosen", "rejected")] == [bpe.final_answer(e[k]) for k in
                                                                             ("chosen", "rejected")]
    lines = col["pretrain"].replace(bpe.ENDOFTEXT, "").splitlines()
    assert lines[1].startswith("A: ") and ", so " in lines[1] and "+0=" in col["pretrain"]
    paths = bpe.task_files(tmp_path / "col", 0, sizes, worked="columns")
    assert paths["pretrain"].read_text() == col["pretrain"]
    assert json.loads((tmp_path / "col" / "task.json").read_text())["worked"] == "columns"
    assert bpe.task_files(tmp_path / "col", 0, sizes)["pretrain"].read_text() == eq["pretrain"]  # rewritten
    with pytest.raises(ValueError, match="worked='steps'"):
        bpe.task_files(tmp_path / "x", worked="steps")


def test_task_files_rewritten_for_another_task(tmp_path):
    sizes = {"pretrain": 5, "sft": 5, "sft_val": 5, "preference": 5, "rl": 5, "test": 5}
    first = bpe.task_files(tmp_path, seed=0, sizes=sizes, max_digits=2)["test"].read_text()
    assert bpe.task_files(tmp_path, seed=1, sizes=sizes, max_digits=2)["test"].read_text() != first


def test_split_and_verifiers():
    with pytest.raises(ValueError, match="sum to 100"):
        bpe.split_by_percent(list(range(10)), "50/30/30")
    assert bpe.boxed_answer(r"\boxed{1} or rather \boxed{2}") == "2"
    assert bpe.normalize_math("-0") == "0" and bpe.normalize_math("-0.0") == "0"
    # MATH's references write money and percentages escaped: \$18.90 is 18.90 (it was "\18.90"), 50\% is 50
    assert bpe.normalize_math(r"\$18.90") == "18.9" and bpe.normalize_math(r"50\%") == "50"
    assert bpe.math_reward(r"so \boxed{18.90}", r"\$18.90") == 1.0 and bpe.math_reward(r"\boxed{50}", r"50\%") == 1.0


def test_chat_templates_by_hand():
    names = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
             "<|eot_id|>"]
    tok = bpe.Tokenizer("gpt2", special_tokens={n: 256 + k for k, n in enumerate(names)})
    chat = [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": " 5 "}]
    # the texts of Qwen's ChatML and Meta's Llama 3 chat templates, written out by hand
    chatml = "<|im_start|>user\n2+3?<|im_end|>\n<|im_start|>assistant\n 5 <|im_end|>\n"
    llama = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n2+3?<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\n\n5<|eot_id|>")
    for style, text, reply in (("chatml", chatml, " 5 <|im_end|>"), ("llama3", llama, "5<|eot_id|>")):
        assert bpe.chat_text(chat, style) == text
        ids, mask = bpe.format_chat(tok, chat, style)
        assert tok.decode(ids) == text and tok.decode([i for i, m in zip(ids, mask) if m]) == reply
    assert bpe.chat_text(chat[:1], "chatml", add_generation_prompt=True) == chatml[:chatml.index(" 5")]
    asked = bpe.prompt_ids(tok, "2+3?", "chatml", system="Be brief.")
    assert tok.decode(asked) == "<|im_start|>system\nBe brief.<|im_end|>\n" + chatml[:chatml.index(" 5")]
    # a row's input follows its prompt (it was dropped): in the Alpaca text, and in the user's turn
    assert tok.decode(bpe.prompt_ids(tok, "Add them.", "alpaca", False, input="2 and 3")) == \
        bpe.format_prompt("Add them.", "2 and 3", preamble=False)
    assert "<|im_start|>user\nAdd them.\n\n2 and 3<|im_end|>" in tok.decode(
        bpe.prompt_ids(tok, "Add them.", "chatml", input="2 and 3"))
    assert bpe.stop_id(tok, "chatml") == 257 and bpe.stop_id(tok, "llama3") == 261
