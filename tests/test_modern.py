"""Modern open models through gpt2.py and bpe.py, against transformers, tokenizers and tiktoken, offline: no
weights can be downloaded here, so every model is a small random one written by transformers' save_pretrained
(sharded with an index, with Llama 3's rope scaling, tied and untied, Qwen2's q/k/v biases), and every
tokenizer is built here in the real files' layouts (Qwen2's tokenizer.json, Llama 3's tiktoken rank file)."""

import json

import pytest
import torch
import transformers

import gpt2
from gpt2 import GPT, GPTConfig

VOCAB = 300
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}


def random_hf(kind, tied=False, seed=0, **kw):
    """A small random LlamaForCausalLM / Qwen2ForCausalLM, every parameter perturbed (HF inits norms to 1 and
    biases to 0, which would hide a norm gain or a bias that is not loaded)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=136, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-3,
                  rope_theta=5000.0, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    common.update(kw)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def max_diff(ours, hf, idx):
    with torch.no_grad():
        return (ours(idx)[0] - hf(idx).logits).abs().max().item()


CASES = {  # name: (kind, tied, extra HF config, save_pretrained's max_shard_size)
    "llama-rope-scaling-sharded": ("llama", False, {"rope_scaling": LLAMA3_SCALING}, "60KB"),
    "llama-tied": ("llama", True, {}, None),
    "qwen2-untied-sharded": ("qwen2", False, {}, "60KB"),
    "qwen2-tied": ("qwen2", True, {}, None),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(tmp_path, case):
    kind, tied, extra, shard = CASES[case]
    hf = random_hf(kind, tied, **extra)
    hf.save_pretrained(tmp_path, max_shard_size=shard or "2GB")
    if shard:
        assert (tmp_path / "model.safetensors.index.json").exists()
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    ours = GPT.from_pretrained(str(tmp_path)).eval()
    cfg = ours.config
    assert (cfg.tie_weights, cfg.qkv_bias, cfg.n_kv_head, cfg.mlp_hidden) == (tied, kind == "qwen2", 2, 136)
    assert (ours.lm_head.weight is ours.transformer.wte.weight) == tied
    # positions past original_max_position_embeddings = 16, where the scaled frequencies matter
    idx = torch.randint(0, VOCAB, (2, 100))
    assert max_diff(ours, hf, idx) < 1e-4  # measured ~2e-6


def test_rope_scaling_is_applied(tmp_path):
    """The llama3 case above passes only if the scaled frequencies are used: without them the logits differ."""
    hf = random_hf("llama", rope_scaling=LLAMA3_SCALING)
    hf.save_pretrained(tmp_path)
    unscaled = GPT.from_pretrained(str(tmp_path), rope_scaling=None).eval()
    assert max_diff(unscaled, hf, torch.randint(0, VOCAB, (1, 100))) > 1e-2


def test_hub_config_layout_and_bf16(tmp_path):
    """config.json as on the hub (rope_theta + rope_scaling, torch_dtype bfloat16, no rope_parameters): same
    model; bf16 weights stay bf16 unless another dtype is asked for."""
    hf = random_hf("llama", rope_scaling=LLAMA3_SCALING)
    hf.to(torch.bfloat16).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.pop("dtype", None)
    config.update(rope_theta=rope.pop("rope_theta"), rope_scaling=rope, torch_dtype="bfloat16")
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = GPT.from_pretrained(str(tmp_path))
    assert ours.lm_head.weight.dtype == torch.bfloat16 and ours.inv_freq.dtype == torch.float32
    assert ours.config.rope_scaling["factor"] == 8.0 and ours.config.rope_base == 5000.0
    ours32 = GPT.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    # (not hf.float(): hf.to(bfloat16) above rounded its rotary frequencies to bf16 for good)
    hf32 = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert ours32.lm_head.weight.dtype == torch.float32
    assert max_diff(ours32, hf32, torch.randint(0, VOCAB, (2, 60))) < 1e-4


@pytest.mark.parametrize("kind,tied,shard", [("llama", False, 50_000), ("qwen2", True, None)])
def test_export_loads_back_in_transformers(tmp_path, kind, tied, shard):
    hf = random_hf(kind, tied, **({"rope_scaling": LLAMA3_SCALING} if kind == "llama" else {}))
    hf.save_pretrained(tmp_path / "hf")
    ours = GPT.from_pretrained(str(tmp_path / "hf")).eval()
    ours.save_pretrained(str(tmp_path / "out"), max_shard_size=shard)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists() == bool(shard)
    assert (len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1) == bool(shard)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == kind and (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == gpt2.HF_ARCHS[kind]
    assert max_diff(ours, back, torch.randint(0, VOCAB, (2, 80))) < 1e-4
    # a model built here (not loaded) exports too: a Llama-shaped GPTConfig
    torch.manual_seed(0)
    fresh = GPT(GPTConfig(block_size=64, vocab_size=VOCAB, n_layer=1, n_head=4, n_kv_head=1, n_embd=32, bias=False,
                          pos_emb="rope", norm="rmsnorm", mlp="swiglu", tie_weights=False)).eval()
    fresh.save_pretrained(str(tmp_path / "fresh"))
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fresh").eval()
    assert max_diff(fresh, back, torch.randint(0, VOCAB, (2, 40))) < 1e-4


def test_hub_download_resumes_and_works_offline(tmp_path, monkeypatch):
    """GPT.from_pretrained("owner/name") through a local stand-in for the HF hub (HF_ENDPOINT): the file list from
    its API, every shard of the index, the token sent; an interrupted shard resumes with a Range request; once
    complete, the copy loads without the server."""
    import http.server
    import threading
    hf = random_hf("qwen2")
    hf.save_pretrained(tmp_path / "repo", max_shard_size="60KB")
    files = {p.name: p.read_bytes() for p in (tmp_path / "repo").iterdir()}
    seen = []

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.path, self.headers.get("Authorization"), self.headers.get("Range")))
            if self.path == "/api/models/org/tiny":
                body = json.dumps({"siblings": [{"rfilename": n} for n in [*files, "README.md"]]}).encode()
            else:
                body = files[self.path.removeprefix("/org/tiny/resolve/main/")]
            start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            self.wfile.write(body[start:])

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    shard = next(n for n in files if n.startswith("model-00002"))
    (tmp_path / "cache" / "org" / "tiny").mkdir(parents=True)
    (tmp_path / "cache" / "org" / "tiny" / (shard + ".part")).write_bytes(files[shard][:1000])  # interrupted
    try:
        ours = GPT.from_pretrained("org/tiny", cache_dir=str(tmp_path / "cache")).eval()
    finally:
        server.shutdown()
    assert all(token == "Bearer hf_test" for _, token, _ in seen)
    assert ("/org/tiny/resolve/main/" + shard, "Bearer hf_test", "bytes=1000-") in seen
    assert not any("README" in path for path, _, _ in seen)  # only what loading needs
    idx = torch.randint(0, VOCAB, (1, 20))
    assert max_diff(ours, hf, idx) < 1e-4
    again = GPT.from_pretrained("org/tiny", cache_dir=str(tmp_path / "cache")).eval()  # the server is gone
    assert max_diff(again, hf, idx) < 1e-4


def test_clear_errors(tmp_path):
    hf = random_hf("qwen2")
    hf.save_pretrained(tmp_path / "ok")
    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    (tmp_path / "mistral").mkdir()
    (tmp_path / "mistral" / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    with pytest.raises(ValueError, match="architecture 'mistral' is not supported"):
        GPT.from_pretrained(str(tmp_path / "mistral"))
    (tmp_path / "yarn").mkdir()
    (tmp_path / "yarn" / "config.json").write_text(json.dumps(
        {**config, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}))
    with pytest.raises(ValueError, match="rope scaling 'yarn' is not supported"):
        GPT.from_pretrained(str(tmp_path / "yarn"))
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="lack 12 tensors"):
        GPT.from_pretrained(str(tmp_path / "ok"))
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(ValueError, match="has no place"):
        GPT.from_pretrained(str(tmp_path / "ok"))
    with pytest.raises(ValueError, match="plain GPT-2"):  # neither GPT-2 nor Llama / Qwen2
        GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, pos_emb="rope")).save_pretrained(str(tmp_path / "x"))


# -- tokenizers -------------------------------------------------------------------------------------

import bpe  # noqa: E402
import tiktoken  # noqa: E402
import tiktoken.load  # noqa: E402
import tokenizers  # noqa: E402
from tokenizers import Regex, decoders, normalizers, pre_tokenizers, trainers  # noqa: E402

CORPUS = [bpe.HERE.joinpath("data", "tinyshakespeare.txt").read_text(encoding="utf-8")[:60_000],
          "Numbers 1234567 and 3.14159, dates 2024-05-01; code: def f(x):\n    return x ** 2\n\n" * 20,
          "Ünïcödé: café naïve façade 日本語のテキスト 中文文本 한국어 текст Ελληνικά 🙂🚀 — “quotes” …\n" * 20]
TEXTS = [
    "Hello world!! It's 2024 and I'M here, you'll see... they've\n\n\n  spaces   and\ttabs\r\nend",
    "café (composed) vs cafe\u0301 (decomposed: NFC makes them equal) and ﬁ ligature, \u00c5ngstr\u00f6m",
    "日本語のテキスト、中文文本和한국어 mixed with English 🙂🚀👍🏽 and emoji",
    "x = [1, 22, 333, 4444, 55555];\nif x: print(f'{x!r}')  # comment\n\t\treturn None   \n",
    "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n5<|im_end|><|endoftext|>",
    "  leading spaces, trailing spaces   ",
    "\n\n\nnewlines only\n\n",
    "", " ", "a", "'s 'S 'T 'Re 'VE 'm 'LL 'd don't DON'T",
    "unseen bytes: \x00\x01\x7f \u200b zero-width, \U0001F9EC dna, ½ ⅓ ², Ⅻ roman",
] + [CORPUS[0][i:i + 500] for i in range(0, 5000, 500)]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# The split regexes as the real files spell them (Qwen2.5's tokenizer.json, Meta's Llama 3 tokenizer.py), written
# out here so that a wrong constant in bpe.py cannot pass by being compared with itself.
QWEN2_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


@pytest.fixture(scope="module")
def qwen_json(tmp_path_factory):
    """A byte-level BPE trained by HF tokenizers, saved as tokenizer.json in Qwen2's layout: NFC normalizer,
    Split(Qwen2's regex, isolated) + ByteLevel(no prefix space, no regex), added special tokens."""
    t = tokenizers.Tokenizer(tokenizers.models.BPE())
    t.normalizer = normalizers.NFC()
    t.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=1200, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t.add_special_tokens(QWEN_SPECIALS)
    path = tmp_path_factory.mktemp("qwen") / "tokenizer.json"
    t.save(str(path))
    spec = json.loads(path.read_text())
    assert spec["normalizer"]["type"] == "NFC" and spec["pre_tokenizer"]["pretokenizers"][0]["type"] == "Split"
    return path, t


def test_tokenizer_json_matches_hf_tokenizers(qwen_json):
    path, hf = qwen_json
    tok = bpe.load_tokenizer_json(path)
    assert tok.normalize == "NFC" and tok.pattern == bpe.QWEN2_SPLIT_PATTERN == QWEN2_REGEX
    assert len(tok.vocab) + len(tok.special_tokens) == hf.get_vocab_size() and len(tok.merges) > 800
    for text in TEXTS:
        want = hf.encode(text).ids
        assert tok.encode(text, allowed_special="all") == want, text
        assert tok.decode(want) == hf.decode(want, skip_special_tokens=False)
    # the same ids after a save / load round trip (normalization included)
    again = bpe.Tokenizer.loads(tok.dumps())
    assert all(again.encode(t, allowed_special="all") == tok.encode(t, allowed_special="all") for t in TEXTS)
    assert bpe.get_tokenizer(str(path)).special_tokens == {n: hf.token_to_id(n) for n in QWEN_SPECIALS}


def test_llama3_tokenizer_json_matches_hf_tokenizers(tmp_path):
    """Llama 3's tokenizer.json on the hub: no normalizer, Split(Llama 3's regex) + ByteLevel, BPE with
    ignore_merges (a chunk that is a token stays whole, as in tiktoken), a BOS added by its post-processor
    (left out on both sides here: generate.py adds it)."""
    t = tokenizers.Tokenizer(tokenizers.models.BPE(ignore_merges=True))
    t.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=1000, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"])
    t.save(str(tmp_path / "tokenizer.json"))
    assert json.loads((tmp_path / "tokenizer.json").read_text())["model"]["ignore_merges"]
    tok = bpe.load_hf_tokenizer(tmp_path)
    assert tok.pattern == bpe.LLAMA3_SPLIT_PATTERN and tok.normalize is None
    for text in TEXTS + ["<|begin_of_text|>hi<|eot_id|>"]:
        assert tok.encode(text, allowed_special="all") == t.encode(text, add_special_tokens=False).ids, text
    assert tok.eot_token == t.token_to_id("<|end_of_text|>")


@pytest.fixture(scope="module")
def llama_rank_file(tmp_path_factory):
    """A rank file in Llama 3's layout (base64 token, rank), from a BPE trained with Llama 3's split pattern."""
    path = tmp_path_factory.mktemp("llama") / "tokenizer.model"
    bpe.Tokenizer(LLAMA3_REGEX).train("\n".join(CORPUS), 900).export_tiktoken(path)
    return path


def test_llama3_rank_file_matches_tiktoken(llama_rank_file):
    tok = bpe.load_llama3(llama_rank_file)
    ranks = tiktoken.load.load_tiktoken_bpe(str(llama_rank_file))
    assert tok.special_tokens["<|begin_of_text|>"] == len(ranks) == 900
    assert tok.special_tokens["<|eot_id|>"] == 909 and len(tok.special_tokens) == 256
    ref = tiktoken.Encoding("llama3-test", pat_str=LLAMA3_REGEX, mergeable_ranks=ranks,
                            special_tokens=tok.special_tokens)
    texts = TEXTS + ["<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"]
    for text in texts:
        assert tok.encode(text, allowed_special="all") == ref.encode(text, allowed_special="all"), text
    assert tok.eot_token == tok.special_tokens["<|end_of_text|>"]


CHATML_JINJA = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3_JINJA = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
                "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
CHAT = [{"role": "system", "content": "Please reason step by step, and put your final answer within \\boxed{}."},
        {"role": "user", "content": "What is 12 + 30?\nShow the steps."},
        {"role": "assistant", "content": " 12 + 30 = 42.\n\nSo \\boxed{42}. "},
        {"role": "user", "content": "And 2 + 2?"},
        {"role": "assistant", "content": "\\boxed{4}"}]


@pytest.mark.parametrize("style", bpe.CHAT_STYLES)
def test_chat_templates(style, qwen_json, llama_rank_file):
    """chat_text equals the chat template rendered by jinja (as transformers' apply_chat_template does); the ids
    equal the reference tokenizer's on that text; the mask covers exactly the assistant replies + end of turn."""
    import jinja2
    env = jinja2.Environment()
    for gen in (False, True):
        messages = CHAT[:-1] if gen else CHAT
        template = CHATML_JINJA if style == "chatml" else LLAMA3_JINJA
        rendered = env.from_string(template).render(messages=messages, add_generation_prompt=gen,
                                                    bos_token="<|begin_of_text|>")
        assert bpe.chat_text(messages, style, gen) == rendered
        if style == "chatml":
            tok, want = bpe.load_tokenizer_json(qwen_json[0]), qwen_json[1].encode(rendered).ids
        else:
            tok = bpe.load_llama3(llama_rank_file)
            ref = tiktoken.Encoding("l3", pat_str=LLAMA3_REGEX, special_tokens=tok.special_tokens,
                                    mergeable_ranks=tiktoken.load.load_tiktoken_bpe(str(llama_rank_file)))
            want = ref.encode(rendered, allowed_special="all")
        ids, mask = bpe.format_chat(tok, messages, style, gen)
        assert ids == want and len(mask) == len(ids)
        end = "<|im_end|>" if style == "chatml" else "<|eot_id|>"
        replies = [m["content"] if style == "chatml" else m["content"].strip()
                   for m in messages if m["role"] == "assistant"]
        assert tok.decode([i for i, m in zip(ids, mask) if m]) == "".join(r + end for r in replies)
    with pytest.raises(ValueError, match="unknown chat style"):
        bpe.format_chat(tok, CHAT, "alpaca")
    with pytest.raises(ValueError, match="message 0 must be"):
        bpe.format_chat(tok, [{"role": "bot", "content": "x"}], style)


def test_boxed_answer_verifier():
    assert bpe.boxed_answer(r"first \boxed{1}, finally \boxed{\frac{a}{b^{2}}} done") == r"\frac{a}{b^{2}}"
    assert bpe.boxed_answer(r"no box") is None and bpe.boxed_answer(r"\boxed{cut") is None
    assert bpe.math_reward(r"so the answer is $\boxed{\dfrac{1}{2}}$.", r"\frac{1}{2}") == 1.0
    assert bpe.math_reward(r"\boxed{1,000}", "1000") == 1.0 and bpe.math_reward(r"\boxed{2.50}", "2.5") == 1.0
    assert bpe.math_reward(r"\boxed{\text{(A)}}", "(A)") == 1.0
    assert bpe.math_reward(r"\boxed{3}", "4") == 0.0 and bpe.math_reward("42", "42") == 0.0
    assert bpe.math_reward(r"\boxed{4}<|endoftext|>\boxed{5}", "4") == 1.0  # nothing after end-of-text counts
    assert bpe.math_reward(r"\boxed{1,2}", "12") == 0.0  # a comma is a thousands separator only in groups of 3
    assert bpe.math_reward(r"\boxed{12345678901234567891}", "12345678901234567890") == 0.0  # exact, not float
    assert bpe.math_reward(r"\boxed{1,234,567.0}", "1234567") == 1.0 and bpe.math_reward(r"\boxed{-0}", "0") == 1.0


def test_gpt2_tokenizer_json_keeps_its_end_of_text_special(tmp_path):
    """GPT-2's tokenizer.json lists <|endoftext|> both in the vocabulary and as an added special token."""
    import tokenizers
    gpt2, to_str = bpe.load_gpt2(), bpe.bytes_to_unicode()
    spell = lambda i: "".join(to_str[c] for c in gpt2.vocab[i])  # noqa: E731  (byte-level BPE's characters)
    vocab = {spell(i): i for i in gpt2.vocab} | {bpe.ENDOFTEXT: gpt2.eot_token}
    hf = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, [(spell(a), spell(b)) for a, b, _ in gpt2.merges]))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.add_special_tokens([tokenizers.AddedToken(bpe.ENDOFTEXT, special=True)])
    hf.save(str(tmp_path / "tokenizer.json"))
    ours = bpe.load_tokenizer_json(tmp_path / "tokenizer.json")
    text = "hello world" + bpe.ENDOFTEXT
    assert ours.special_tokens == {bpe.ENDOFTEXT: 50256} and ours.eot_token == 50256
    assert ours.encode(text, allowed_special="all") == hf.encode(text).ids == [31373, 995, 50256]


def test_tokenizer_json_errors(tmp_path, qwen_json):
    spec = json.loads(qwen_json[0].read_text())
    for change, match in ((lambda s: s["model"].update(type="Unigram"), "model type 'Unigram'"),
                          (lambda s: s.update(pre_tokenizer={"type": "Metaspace"}), "pre-tokenizer 'Metaspace'"),
                          (lambda s: s.update(normalizer={"type": "Lowercase"}), "normalizer 'Lowercase'")):
        bad = json.loads(json.dumps(spec))
        change(bad)
        (tmp_path / "t.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            bpe.load_tokenizer_json(tmp_path / "t.json")


# -- generation ---------------------------------------------------------------------------------------

import generate as G  # noqa: E402


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_greedy_generate_equals_transformers(tmp_path, kind):
    """generate.py's greedy decoding (KV cache, left-padded batch) gives transformers' generate tokens."""
    hf = random_hf(kind, tied=kind == "qwen2", **({"rope_scaling": LLAMA3_SCALING} if kind == "llama" else {}))
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(str(tmp_path)).eval()
    torch.manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (n,)).tolist() for n in (9, 5, 7)]
    idx, mask = gpt2.left_pad(prompts)
    got = G.generate(ours, idx, 24, G.GREEDY, attention_mask=mask)
    want = hf.generate(idx, attention_mask=mask, max_new_tokens=24, min_new_tokens=24, do_sample=False,
                       pad_token_id=0)
    assert torch.equal(got, want)


def test_generate_cli_with_a_local_qwen_directory(tmp_path, qwen_json, capsys):
    """generate.py --model <HF directory> uses the directory's tokenizer.json; --chat wraps the prompt in ChatML
    and stops at <|im_end|>. The printed text equals transformers' greedy continuation decoded by tokenizers."""
    path, hf_tok = qwen_json
    hf = random_hf("qwen2", vocab_size=hf_tok.get_vocab_size())
    prompt, im_end = "What is 2 + 3?", hf_tok.token_to_id("<|im_end|>")
    chat_ids = torch.tensor([hf_tok.encode(bpe.chat_text([{"role": "user", "content": prompt}], "chatml", True)).ids])
    with torch.no_grad():  # make <|im_end|> the likeliest token where the favourite one was: the chat reply ends
        favourite = hf.generate(chat_ids, max_new_tokens=12, do_sample=False, eos_token_id=None)[0, -12:].mode().values
        hf.lm_head.weight[im_end] = 3 * hf.lm_head.weight[favourite]
    hf.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text(path.read_text())
    for chat in (False, True):
        text = bpe.chat_text([{"role": "user", "content": prompt}], "chatml", True) if chat else prompt
        ids = torch.tensor([hf_tok.encode(text).ids])
        stop = im_end if chat else hf_tok.token_to_id("<|endoftext|>")
        new = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=stop, pad_token_id=stop)
        new = new[0, ids.size(1):].tolist()
        assert (stop in new) == chat  # the chat reply stops early, the plain continuation runs on
        new = new[:new.index(stop)] if stop in new else new
        G.main(["--model", str(tmp_path), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "12",
                "--device", "cpu"] + (["--chat"] if chat else []))
        printed = capsys.readouterr().out
        assert printed == prompt + hf_tok.decode(new, skip_special_tokens=False) + "\n"


# -- sft.py and grpo.py on a Llama / Qwen directory -----------------------------------------------------

import grpo  # noqa: E402
import sft  # noqa: E402


@pytest.fixture
def qwen_dir(tmp_path, qwen_json):
    """A random Qwen2 model in HF layout with the tokenizer.json built above (its vocabulary size)."""
    path, hf_tok = qwen_json
    hf = random_hf("qwen2", tied=True, vocab_size=hf_tok.get_vocab_size())
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "qwen")  # as on the hub
    (tmp_path / "qwen" / "tokenizer.json").write_text(path.read_text())
    return tmp_path / "qwen"


def test_grpo_qwen_math_preset(tmp_path, qwen_dir):
    """--preset qwen-math on a local Qwen directory: ChatML prompts with the Math system message, stop at
    <|im_end|>, boxed-answer rewards; one step runs and writes its metrics and checkpoint."""
    data = tmp_path / "math"
    data.mkdir()
    rows = [{"prompt": f"What is {a} + {a}?", "answer": str(2 * a)} for a in range(4)]
    for name in ("rl", "test"):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--preset", "qwen-math", "--init", str(qwen_dir), "--data", str(data), "--out-dir", str(tmp_path / "out"),
            "--max-steps", "1", "--prompts", "2", "--group-size", "2", "--max-new-tokens", "6", "--eval-limit", "2",
            "--device", "cpu", "--format-reward", "0.1"]
    args = grpo.parse_args(argv)
    assert (args.template, args.verifier, args.system) == ("chatml", "boxed", bpe.MATH_SYSTEM)
    model, tok, _ = grpo.load_policy(str(qwen_dir))
    batch = grpo.rollout(model, tok, rows[:2], 2, args, "cpu", torch.float32)
    chat = [{"role": "system", "content": bpe.MATH_SYSTEM}, {"role": "user", "content": rows[0]["prompt"]}]
    want = bpe.format_chat(tok, chat, "chatml", add_generation_prompt=True)[0]
    assert batch["idx"][0, :batch["T"]].tolist()[-len(want):] == want
    assert grpo.score(r"so \boxed{4}<|im_end|>", "4", 0.1, "boxed", "<|im_end|>") == pytest.approx(1.1)
    assert grpo.score(r"so 4<|im_end|>", "4", 0.1, "boxed", "<|im_end|>") == 0.0
    grpo.main(argv)
    logged = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert any("reward" in r for r in logged) and (tmp_path / "out" / "ckpt.pt").exists()


def test_sft_init_from_a_qwen_directory(tmp_path, qwen_dir):
    """sft.py --init <HF Qwen directory>: the model in fp32 with the directory's tokenizer; a step trains."""
    model, tok = sft.load_base(str(qwen_dir))
    assert model.lm_head.weight.dtype == torch.float32 and tok.special_tokens["<|im_end|>"] == 1202
    sft.main(["--init", str(qwen_dir), "--data", "task", "--out-dir", str(tmp_path / "out"), "--max-steps", "2",
              "--batch-size", "2", "--eval-limit", "2", "--max-new-tokens", "4", "--device", "cpu"])
    logged = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "train_loss" in r] == [1, 2]


def test_sft_fsdp_two_processes_give_the_loss_of_one(tmp_path, qwen_dir):
    """torchrun --nproc_per_node 2 sft.py --fsdp (FSDP2 over gloo on CPU, each process half of every batch)
    logs the losses of the same run in one process, step after step, across a stop and --resume (weights and
    AdamW state gathered into the checkpoint and sharded again), and ends with the same weights."""
    import subprocess
    import sys
    common = ["--init", str(qwen_dir), "--data", "task", "--max-steps", "3", "--batch-size", "4", "--eval-limit", "2",
              "--max-new-tokens", "2", "--eval-interval", "0", "--device", "cpu", "--lr", "1e-3", "--warmup-steps", "0"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    root = str(bpe.HERE)
    sft.main([*common, "--out-dir", str(tmp_path / "one")])  # 1 process, no FSDP
    for extra in (["--stop-after", "2"], ["--resume"]):  # 2 processes, stopped after step 2 and resumed
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "sft.py", "--fsdp",
                              *common, "--out-dir", str(tmp_path / "two"), *extra], cwd=root, env=env,
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-3000:]

    def losses(name):
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["train_loss"], r["tokens"]) for r in rows if "train_loss" in r]
    one, two = losses("one"), losses("two")
    assert [s for s, _, _ in one] == [s for s, _, _ in two] == [1, 2, 3]
    assert [n for _, _, n in one] == [n for _, _, n in two]
    for (_, a, _), (_, b, _) in zip(one, two):
        assert abs(a - b) < 1e-4, (one, two)  # the same batches, the same gradients, the same updates
    assert len({a for _, a, _ in one}) == 3  # the model did change from step to step
    ckpt = gpt2.load_checkpoint(str(tmp_path / "two" / "ckpt.pt"))
    ref = gpt2.load_checkpoint(str(tmp_path / "one" / "ckpt.pt"))
    assert max((ckpt["model"][k].float() - ref["model"][k].float()).abs().max().item() for k in ref["model"]) < 1e-4


def test_grpo_fsdp_two_processes(tmp_path, qwen_json):
    """torchrun --nproc_per_node 2 grpo.py --fsdp (FSDP2 over gloo) runs: each process samples its share of the
    prompts, answers end at different steps, and training, evaluation and the gathered checkpoint complete. A
    run to completion is all this test shows: that N processes compute the gradient of 1 is tested on sft.py
    above (GRPO's rollouts draw different random numbers in 2 processes), the sampler's sync below."""
    import subprocess
    import sys
    path, hf_tok = qwen_json
    hf = random_hf("qwen2", vocab_size=hf_tok.get_vocab_size())
    rows = [{"prompt": f"What is {a} + {a}?", "answer": str(2 * a)} for a in range(8)]
    tok = bpe.load_tokenizer_json(path)
    with torch.no_grad():  # greedy answers (~ temperature 0.01) with the commonest answer token end there instead
        prompts = [torch.tensor([bpe.prompt_ids(tok, r["prompt"], "chatml", system=bpe.MATH_SYSTEM)]) for r in rows]
        answers = torch.cat([hf.generate(p, max_new_tokens=12, do_sample=False, eos_token_id=None)[0, -12:]
                             for p in prompts])
        hf.lm_head.weight[tok.special_tokens["<|im_end|>"]] = 3 * hf.lm_head.weight[answers.mode().values]
    hf.save_pretrained(tmp_path / "qwen")
    (tmp_path / "qwen" / "tokenizer.json").write_text(path.read_text())
    data = tmp_path / "math"
    data.mkdir()
    for name in ("rl", "test"):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "grpo.py", "--fsdp",
                          "--preset", "qwen-math", "--init", str(tmp_path / "qwen"), "--data", str(data),
                          "--out-dir", str(tmp_path / "out"), "--max-steps", "2", "--prompts", "4", "--group-size", "2",
                          "--max-new-tokens", "12", "--eval-limit", "1", "--device", "cpu", "--temperature", "0.01"],
                         cwd=str(bpe.HERE), env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    logged = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert any(0 < r["length"] < 12 for r in steps), [(r["length"], r["reward"]) for r in steps]  # some ended early
    ckpt = gpt2.load_checkpoint(str(tmp_path / "out" / "ckpt.pt"))
    model = GPT(GPTConfig(**ckpt["config"]))
    gpt2.load_model_state(model, ckpt["model"])  # the whole model, gathered from both processes


SYNC_SCRIPT = '''
import json, sys, torch
import gpt2
rank, world, _ = gpt2.init_distributed("cpu")
torch.manual_seed(0)
model = gpt2.GPT(gpt2.GPTConfig(block_size=64, vocab_size=50, n_layer=1, n_head=2, n_embd=16)).eval()
prompt = torch.tensor([[1, 2, 3]])
if rank == 0:  # its answer ends at once: the end-of-text is the greedy first token
    eos = int(model(prompt)[0][0, -1].argmax())
else:  # its answer never ends: the end-of-text token's logit is 0, below the best of 49 random ones
    eos = 49
    with torch.no_grad():
        model.lm_head.weight[49] = 0
calls = []
forward = model.forward
model.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
out = {}
for sync in (True, False):
    calls.clear()
    tokens, mask, _ = gpt2.sample(model, prompt, 10, temperature=0, eos_id=eos, sync=sync)
    out[sync] = {"calls": len(calls), "live": int(mask.sum())}
json.dump(out, open(f"{sys.argv[1]}/{rank}.json", "w"))
gpt2.end_distributed()  # leaving while the other process still runs can abort the one that exits
'''


def test_sample_sync_keeps_processes_in_step(tmp_path):
    """gpt2.sample(sync=True) in 2 processes: one row ends at the first token, the other never; both processes
    run the same 10 forward passes (FSDP gathers weights in each one), and the ended row stays ended."""
    import subprocess
    import sys
    (tmp_path / "s.py").write_text(SYNC_SCRIPT)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(tmp_path / "s.py"),
                    str(tmp_path)], cwd=str(bpe.HERE), check=True, capture_output=True, timeout=120,
                   env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(bpe.HERE)})
    got = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    for sync, want in (("true", [10, 10]), ("false", [1, 10])):  # without sync, process 0 would stop after 1
        assert [g[sync]["calls"] for g in got] == want and [g[sync]["live"] for g in got] == [1, 10], got
