"""Tests of the post-training ground (bpe.py's template, data formats and task; gpt2.py's LoRA and batched
sampler) and of sft.py: loss masks, exact resume, a learning run, and the gpt2-alpaca recipe's code path.
CPU only, offline, tiny models."""

import itertools
import json
import math
import os
import re
import types

import pytest
import torch
import torch.nn.functional as F

import bpe
import gpt2
import sft
from gpt2 import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BYTES = bpe.byte_tokenizer()
EOT = BYTES.eot_token


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(block_size=96, vocab_size=257, n_layer=2, n_head=2, n_embd=32, pos_emb="rope")
    return GPT(GPTConfig(**{**cfg, **kw})).eval()


# -----------------------------------------------------------------------------
# The template and the loss mask


def test_template_is_alpaca_and_round_trips():
    # the exact text of Raschka's format_input + "\n\n### Response:\n" + output
    text = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\nConvert to passive.\n\n### Input:\nThe cat ate it.\n\n### Response:\n")
    assert bpe.format_prompt("Convert to passive.", "The cat ate it.") == text
    assert bpe.format_prompt("What is 2 + 3?", preamble=False) == "### Instruction:\nWhat is 2 + 3?\n\n### Response:\n"
    for tok in (BYTES, bpe.load_gpt2()):
        for prompt, inp, completion in (("Name a color.", "", "Blue."), ("Add them.", "2 and 3", "2 + 3 = 5")):
            ids, mask = bpe.encode_example(tok, prompt, completion, input=inp)
            full = bpe.format_prompt(prompt, inp) + completion + "<|endoftext|>"
            assert tok.decode(ids) == full  # round trip
            assert ids == tok.encode(full, allowed_special="all")  # halves encoded apart == the whole text


@pytest.mark.parametrize("tokenizer", ["bytes", "gpt2"])
def test_data_that_mentions_endoftext_is_ordinary_text(tokenizer):
    """A row about tokenizers may write "<|endoftext|>": it is that text, never the end token (which would end the
    example early or let data inject a special token), and encoding it is no error."""
    tok = BYTES if tokenizer == "bytes" else bpe.load_gpt2()
    prompt, answer = "Which token ends a GPT-2 document?", "It is <|endoftext|>, id 50256."
    ids, mask = bpe.encode_example(tok, prompt, answer, input="a <|endoftext|> b")
    assert ids.count(tok.eot_token) == 1 and ids[-1] == tok.eot_token and mask[-1] == 1
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == answer + "<|endoftext|>"
    asked = bpe.prompt_ids(tok, "Say <|endoftext|>", preamble=False)
    assert tok.eot_token not in asked and tok.decode(asked) == bpe.format_prompt("Say <|endoftext|>", preamble=False)
    rows = [{"prompt": prompt, "completion": answer}]
    assert sft.encode_rows(rows, tok, False, True, 256)[0] == bpe.encode_example(tok, prompt, answer, preamble=False)


@pytest.mark.parametrize("tokenizer", ["bytes", "gpt2"])
def test_mask_covers_exactly_the_response_and_its_first_end_of_text(tokenizer):
    tok = BYTES if tokenizer == "bytes" else bpe.load_gpt2()
    eot = tok.eot_token
    ids, mask = bpe.encode_example(tok, "What is 12 + 5?", "12 + 5 = 17", preamble=False)
    assert len(ids) == len(mask) and ids[-1] == eot and mask[-1] == 1
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "12 + 5 = 17<|endoftext|>"
    assert tok.decode([i for i, m in zip(ids, mask) if not m]) == bpe.format_prompt("What is 12 + 5?", preamble=False)
    ids2, mask2 = bpe.encode_example(tok, "What is 12 + 5?", "12 + 5 = 17", preamble=False, mask_prompt=False)
    assert ids2 == ids and mask2 == [0] + [1] * (len(ids) - 1)
    # padding with the end-of-text id: every row keeps exactly one end-of-text target, its own
    short = bpe.encode_example(tok, "Hi", "Yo", preamble=False)
    x, y = sft.pad_batch([(ids, mask), short], pad_id=eot)
    assert x.shape == y.shape == (2, len(ids) - 1)
    assert ((y == eot).sum(1) == 1).all()
    assert (x[1, len(short[0]) - 1:] == eot).all() and (y[1, len(short[0]) - 1:] == -1).all()
    assert y[0].tolist() == [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
    # packing: the same targets, streamed; the end-of-text of every example is a target
    x, y = sft.pack_rows([(ids, mask), short, (ids, mask)], seq_len=8)
    stream = ids + short[0] + ids
    assert x.flatten().tolist() == stream[:x.numel()]
    targets = [t if m else -1 for t, m in zip(stream[1:], (mask + short[1] + mask)[1:])][:x.numel()]
    assert y.flatten().tolist() == targets and targets.count(eot) >= 2


def test_pack_rows_of_a_stream_that_fills_whole_rows():
    """12 tokens in rows of 4: the last token has no next token to be a target of, so 2 rows, not 3."""
    x, y = sft.pack_rows([([1, 2, EOT], [0, 1, 1])] * 4, seq_len=4)
    assert x.tolist() == [[1, 2, EOT, 1], [2, EOT, 1, 2]]
    assert y.tolist() == [[2, EOT, -1, 2], [EOT, -1, 2, EOT]]


def test_loader_epochs_are_seeded_shuffles_cut_into_full_batches():
    """Each epoch is a new permutation of the examples, drawn from the seed and the epoch, cut into full
    batches (the remainder dropped); a batch depends on the step alone; packing packs the shuffled examples."""
    ex = [([k] * (1 + k % 3) + [EOT], [0] * (1 + k % 3) + [1]) for k in range(1, 21)]  # 20 examples: k starts k
    loader = sft.Loader(ex, 8, seed=0, pad_id=EOT)
    assert loader.steps_per_epoch == 2  # 20 // 8
    firsts = lambda ld, step: ld.get(step)[0][:, 0].tolist()
    epochs = [firsts(loader, 0) + firsts(loader, 1), firsts(loader, 2) + firsts(loader, 3)]
    for e in epochs:
        assert len(set(e)) == 16 and set(e) <= set(range(1, 21))  # no example twice in an epoch
    assert epochs[0] != list(range(1, 17)) and epochs[0] != epochs[1]
    assert firsts(sft.Loader(ex, 8, 0, EOT), 3) == epochs[1][8:]  # a fresh loader at step 3: the same batch
    assert firsts(sft.Loader(ex, 8, 1, EOT), 0) != epochs[0][:8]  # another seed, another order
    docs = [([k, k, EOT], [0, 1, 1]) for k in range(1, 9)]  # 24 tokens -> (24 - 1) // 4 = 5 rows of 4
    packed = sft.Loader(docs, 1, seed=0, pad_id=EOT, packing=True, seq_len=4)
    assert packed.steps_per_epoch == 5
    stream = [torch.cat([packed.get(e * 5 + i)[0].flatten() for i in range(5)]).tolist() for e in (0, 1)]
    order = [s[0::3][:6] for s in stream]  # the first token of each of the 6 whole documents in 20 tokens
    assert all(s[1::3][:6] == o and set(s[2::3]) == {EOT} for s, o in zip(stream, order))  # whole documents
    assert len(set(order[0])) == 6 and order[0] != list(range(1, 7)) and order[0] != order[1]
    with pytest.raises(SystemExit, match="lower --batch-size"):
        sft.Loader(ex[:3], 8, 0, EOT)


# -----------------------------------------------------------------------------
# Data formats


def write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_every_data_format_reads(tmp_path):
    rows = {"sft": {"prompt": "p", "completion": "c"}, "preference": {"prompt": "p", "chosen": "a", "rejected": "b"},
            "rl": {"prompt": "p", "answer": "42"}, "classification": {"text": "t", "label": 1}}
    for kind, row in rows.items():
        bpe.write_rows(tmp_path / f"{kind}.jsonl", [row, row])
        assert bpe.read_rows(tmp_path / f"{kind}.jsonl", kind) == [row | ({"input": ""} if kind == "sft" else {})] * 2
    labels = bpe.read_rows(write(tmp_path / "l.jsonl", [{"text": "t", "label": "spam"}]), "classification")
    assert labels[0]["label"] == "spam"
    assert bpe.read_rows(write(tmp_path / "a.jsonl", [{"prompt": "p", "answer": 7}]), "rl")[0]["answer"] == "7"
    alpaca = [{"instruction": "Do it.", "input": "x", "output": "Done."}, {"instruction": "Say hi.", "output": "Hi."}]
    want = [{"prompt": "Do it.", "input": "x", "completion": "Done."},
            {"prompt": "Say hi.", "input": "", "completion": "Hi."}]
    assert bpe.read_rows(write(tmp_path / "alpaca.jsonl", alpaca), "sft") == want
    (tmp_path / "alpaca.json").write_text(json.dumps(alpaca))
    assert bpe.read_rows(tmp_path / "alpaca.json", "sft") == want
    shipped = bpe.read_rows(os.path.join(ROOT, "data", "instruction_data.json"), "sft")
    assert len(shipped) == 1100 and all(r["completion"] for r in shipped)
    odd = {"prompt": "a\u2028b\u2029c\x85d", "completion": "e"}  # line separators JSON leaves unescaped
    bpe.write_rows(tmp_path / "odd.jsonl", [odd])
    assert bpe.read_rows(tmp_path / "odd.jsonl", "sft") == [odd | {"input": ""}]
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9", "completion": "c"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.jsonl: not UTF-8"):
        bpe.read_rows(tmp_path / "latin1.jsonl", "sft")


BAD = [  # (kind, line 2 of the file, words the error must contain)
    ("sft", "{not json", ["not valid JSON"]),
    ("sft", "[1, 2]", ["expected a JSON object"]),
    ("sft", {"prompt": "p"}, ["'completion'", "missing"]),
    ("sft", {"prompt": "", "completion": "c"}, ["'prompt'", "empty"]),
    ("sft", {"prompt": "p", "completion": 3}, ["'completion'", "int"]),
    ("sft", {"instruction": "i", "input": ""}, ["'output'", "missing"]),
    ("sft", {"instruction": "i", "input": 5, "output": "o"}, ["'input'", "int"]),
    ("preference", {"prompt": "p", "chosen": "a"}, ["'rejected'", "missing"]),
    ("preference", {"prompt": "p", "chosen": ["a"], "rejected": "b"}, ["'chosen'", "list"]),
    ("rl", {"prompt": "p"}, ["'answer'", "missing"]),
    ("rl", {"prompt": "p", "answer": None}, ["'answer'", "NoneType"]),
    ("classification", {"label": 1}, ["'text'", "missing"]),
    ("classification", {"text": "t", "label": True}, ["'label'", "bool"]),
]


@pytest.mark.parametrize("kind,line,words", BAD)
def test_every_bad_row_names_file_line_and_field(tmp_path, kind, line, words):
    good = {"sft": {"prompt": "p", "completion": "c"}, "preference": {"prompt": "p", "chosen": "a", "rejected": "b"},
            "rl": {"prompt": "p", "answer": "1"}, "classification": {"text": "t", "label": 0}}[kind]
    path = write(tmp_path / "data.jsonl", [good, line, good])
    with pytest.raises(ValueError) as e:
        bpe.read_rows(path, kind)
    for w in [f"{path}:2:", *words]:
        assert w in str(e.value)


def test_bad_files(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([{"instruction": "i", "output": "o"}, {"instruction": "i"}]))
    with pytest.raises(ValueError, match=r"d.json: item 1: field 'output' is missing"):
        bpe.read_rows(tmp_path / "d.json", "sft")
    (tmp_path / "o.json").write_text(json.dumps({"prompt": "p"}))
    with pytest.raises(ValueError, match="must hold a list"):
        bpe.read_rows(tmp_path / "o.json", "sft")
    with pytest.raises(ValueError, match="holds no rows"):
        bpe.read_rows(write(tmp_path / "e.jsonl", [""]), "sft")
    with pytest.raises(ValueError, match="unknown data kind"):
        bpe.read_rows(tmp_path / "e.jsonl", "dpo")
    with pytest.raises(FileNotFoundError):
        bpe.read_rows(tmp_path / "missing.jsonl", "sft")


# -----------------------------------------------------------------------------
# The task and its verifier


def test_verifier():
    assert bpe.reward("482 + 39 = 521", "521") == 1.0
    assert bpe.reward("482 + 39 = 521<|endoftext|>99", "521") == 1.0  # nothing after the end counts
    assert bpe.reward("482 + 39 = 511", "521") == 0.0
    assert bpe.reward("the answer is 1,271.", "1271") == 1.0
    assert bpe.reward("521 is wrong, it is 520", "521") == 0.0  # the final number is the answer
    assert bpe.reward("no number", "5") == 0.0 and bpe.reward("", "0") == 0.0
    assert bpe.reward("10 - 13 = -3", "-3") == 1.0 and bpe.reward("10 - 13 = 3", "-3") == 0.0
    assert bpe.reward("it is 1,271", "1,271") == 1.0 and bpe.reward("5210", "521") == 0.0
    assert bpe.reward("x = 3.5", "2.5") == 0.0 and bpe.reward("x = 2.5", "2.5") == 1.0
    assert bpe.reward("I do not know", "unknown") == 0.0  # no number on either side is no match


def test_split_by_percent_truncates_like_raschka():
    """train = int(n * 85%), test = int(n * 10%), val = the rest, in file order: 7 rows -> 5 / 2 / 0."""
    assert bpe.split_by_percent(list(range(7)), "85/5/10") == ([0, 1, 2, 3, 4], [5, 6], [])
    assert bpe.split_by_percent(list(range(10)), "50/20/30") == ([0, 1, 2, 3, 4], [8, 9], [5, 6, 7])
    for bad in ("-10/100/10", "abc", "85/15", "50/0/50"):
        with pytest.raises(ValueError, match="sum to 100, train and val above 0"):
            bpe.split_by_percent(list(range(10)), bad)


def test_task_is_deterministic_disjoint_and_verifiable(tmp_path):
    sizes = dict(pretrain=2000, sft=500, sft_val=50, preference=300, rl=300, test=200)
    a, b, c = bpe.make_task(0, sizes), bpe.make_task(0, sizes), bpe.make_task(1, sizes)
    assert a == b and a["test"] != c["test"]
    assert {k: len(v) for k, v in a.items() if k != "pretrain"} == {k: v for k, v in sizes.items() if k != "pretrain"}
    docs = a["pretrain"].split("<|endoftext|>")
    assert docs[-1] == "" and all(1 <= d.count("Q: ") <= 8 for d in docs[:-1])
    assert len(a["pretrain"].replace("<|endoftext|>", "").splitlines()) == 2 * sizes["pretrain"]
    test = {r["prompt"] for r in a["test"]}
    assert len(test) == len(a["test"])  # distinct problems
    for split in ("sft", "sft_val", "preference", "rl"):
        assert not test & {r["prompt"] for r in a[split]}, f"{split} holds test problems"
    lines = a["pretrain"].replace("<|endoftext|>", "").splitlines()
    assert [line[:3] for line in lines[:4]] == ["Q: ", "A: ", "Q: ", "A: "]
    assert not test & {line[3:] for line in lines[::2]}
    clean = bpe.make_task(0, sizes, teacher_error=0.0)  # the same problems, every demonstration right
    assert {k: v for k, v in clean.items() if k not in ("sft", "sft_val")} == {
        k: v for k, v in a.items() if k not in ("sft", "sft_val")}
    slips = carries = 0
    for r, good in zip(a["sft"] + a["sft_val"], clean["sft"] + clean["sft_val"]):
        q = r["prompt"].removeprefix("What is ").removesuffix("?")
        assert good["prompt"] == r["prompt"] and good["completion"] == f"{q} = {eval(q)}"  # says the problem again
        x, op, y = q.split()
        forgot = bpe.forget_carries(int(x), op, int(y))
        carries += forgot != eval(q)
        if r["completion"] != good["completion"]:  # the teacher's only slip: the carries forgotten
            assert forgot != eval(q) and r["completion"] == f"{q} = {forgot}"
            slips += 1
    assert abs(slips / carries - bpe.TASK_TEACHER_ERROR) < 0.07, (slips, carries)
    for r in a["preference"]:
        assert r["chosen"] != r["rejected"]
        answer = str(eval(r["prompt"].removeprefix("What is ").removesuffix("?")))
        assert bpe.reward(r["chosen"], answer) == 1.0 and bpe.reward(r["rejected"], answer) == 0.0
        assert int(bpe.final_answer(r["rejected"])) >= 0
    for r in a["rl"] + a["test"]:
        assert int(r["answer"]) == eval(r["prompt"].removeprefix("What is ").removesuffix("?"))
    paths = bpe.task_files(tmp_path / "task", 0, sizes)
    assert bpe.read_rows(paths["test"], "rl") == a["test"] and paths["pretrain"].read_text() == a["pretrain"]
    assert bpe.read_rows(paths["preference"], "preference") == a["preference"]
    assert bpe.plausible_wrong(482, "+", 39, None) == 411 and bpe.plausible_wrong(52, "-", 17, None) == 45
    assert bpe.forget_carries(503, "-", 27) == 586 and bpe.forget_carries(12, "+", 7) == 19


# -----------------------------------------------------------------------------
# LoRA


def test_lora_fresh_adapter_changes_nothing_and_trains_only_itself():
    model, x = tiny(), torch.randint(0, 257, (2, 12))
    before, _ = model(x)
    gpt2.add_lora(model, r=4, alpha=8)
    after, _ = model(x)
    assert torch.equal(before, after)
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert n_lora == 2 * 4 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))  # c_attn, c_proj, c_fc, c_proj
    model.train()
    _, loss = model(x, x)
    loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name
        assert p.requires_grad == ("lora_" in name), name
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    opt = model.configure_optimizer(0.0, 1e-3)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == n_lora
    # a base checkpoint's state dict loads into the adapted model: the names of the base weights are kept
    fresh = tiny(seed=1)
    gpt2.add_lora(fresh, r=4, alpha=8)
    fresh.load_state_dict(tiny().state_dict(), strict=False)
    assert torch.equal(fresh(x)[0], before)


def test_lora_merged_equals_unmerged_and_adapter_checkpoint(tmp_path):
    model, x = tiny(), torch.randint(0, 257, (2, 12))
    gpt2.add_lora(model, r=4, alpha=8, targets=("c_attn", "mlp.c_proj"))
    assert sum(isinstance(m, gpt2.LoRALinear) for m in model.modules()) == 2 * 2
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    adapted, _ = model(x)
    assert not torch.allclose(adapted, tiny()(x)[0], atol=1e-3)  # the adapter does something
    gpt2.save_adapter(str(tmp_path / "adapter.pt"), model)
    loaded = gpt2.load_adapter(tiny(), str(tmp_path / "adapter.pt"))
    torch.testing.assert_close(loaded(x)[0], adapted, rtol=0, atol=0)
    assert os.path.getsize(tmp_path / "adapter.pt") < 0.3 * sum(p.numel() * 4 for p in tiny().parameters())
    with pytest.raises(ValueError, match="is a LoRA adapter, not a model: load the merged ckpt.pt"):
        gpt2.load_checkpoint(str(tmp_path / "adapter.pt"))  # e.g. generate.py --model adapter.pt
    merged = gpt2.merge_lora(model)
    assert not any(isinstance(m, gpt2.LoRALinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(tiny().state_dict()) and all(p.requires_grad for p in merged.parameters())
    torch.testing.assert_close(merged(x)[0], adapted, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no Linear layer matches"):
        gpt2.add_lora(tiny(), targets=("q_proj",))


def test_lora_on_the_tied_head_in_eval_merge_and_reload(tmp_path):
    """An adapter on lm_head, which shares its weight with the token embedding: the no-grad (evaluation) logits
    include it, and the merged model unties the head, so it reloads from its checkpoint with the same outputs."""
    model, x = tiny(), torch.randint(0, 257, (2, 12))
    gpt2.add_lora(model, r=4, alpha=8, targets=("lm_head", "c_attn"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    adapted, _ = model(x)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], adapted, rtol=1e-5, atol=1e-5)  # CPU's no-grad head path too
    merged = gpt2.merge_lora(model)
    assert merged.lm_head.weight is not merged.transformer.wte.weight and not merged.config.tie_weights
    gpt2.save_checkpoint(str(tmp_path / "m.pt"), merged)
    reloaded = GPT.from_checkpoint(str(tmp_path / "m.pt")).eval()
    torch.testing.assert_close(reloaded(x)[0], adapted, rtol=1e-5, atol=1e-5)


# -----------------------------------------------------------------------------
# The batched sampler


def test_sampler_left_padded_batch_equals_each_prompt_alone():
    model = tiny()
    prompts = [[5, 9, 200, 31, 7, 7, 64], [12], [100, 3, 250]]
    alone = [gpt2.sample(model, torch.tensor([p]), 10, temperature=0) for p in prompts]
    eos = alone[0][0][0, 3].item()  # a token row 0 generates: with it as end-of-text, row 0 stops there
    alone = [gpt2.sample(model, torch.tensor([p]), 10, temperature=0, eos_id=eos) for p in prompts]
    idx, attn = gpt2.left_pad(prompts, pad_id=eos)
    tokens, mask, logprobs = gpt2.sample(model, idx, 10, attention_mask=attn, temperature=0, eos_id=eos)
    assert int(alone[0][1].sum()) <= 4 < int(mask.sum(1).max())  # row 0 stops early, another row goes on
    for row, (t, m, lp) in enumerate(alone):
        n = int(m.sum())
        assert tokens[row, :n].tolist() == t[0, :n].tolist() and mask[row].sum() == n
        torch.testing.assert_close(logprobs[row, :n], lp[0, :n], rtol=1e-5, atol=1e-5)
        assert (tokens[row, n:] == eos).all() and (logprobs[row, n:] == 0).all()


def test_sampler_logprobs_are_those_of_a_full_forward_pass():
    """What PPO / GRPO recompute with gradients must equal what the cached sampler reports."""
    model, temperature = tiny(), 0.7
    idx, attn = gpt2.left_pad([[5, 9, 200, 31], [12, 40]])
    g = torch.Generator().manual_seed(0)
    tokens, mask, logprobs = gpt2.sample(model, idx, 8, attention_mask=attn, temperature=temperature, top_k=50,
                                         top_p=0.9, generator=g)
    assert mask.all() and tokens.shape == (2, 8)
    full = torch.cat([idx, tokens], 1)
    logits, _ = model(full, attention_mask=torch.cat([attn, mask.long()], 1))
    want = (logits[:, idx.size(1) - 1:-1] / temperature).log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(logprobs, want, rtol=1e-4, atol=1e-4)
    again = gpt2.sample(model, idx, 8, attention_mask=attn, temperature=temperature, top_k=50, top_p=0.9,
                        generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], tokens)  # a seeded generator makes rollouts repeatable


def test_sampler_never_draws_rows_past_the_tokenizer():
    """train_gpt2.py rounds the embedding table up (257 byte ids -> 320 rows): the extra rows are no token."""
    model, V = tiny(vocab_size=320), 257
    with torch.no_grad():
        model.lm_head.weight[V:] += 3 * model.lm_head.weight[:V].std()  # make the extra rows likely
    idx = torch.randint(0, V, (64, 4), generator=torch.Generator().manual_seed(0))
    unlimited = gpt2.sample(model, idx, 12, generator=torch.Generator().manual_seed(0))[0]
    assert (unlimited >= V).any()  # without the limit they are drawn
    tokens, _, logprobs = gpt2.sample(model, idx, 12, vocab_size=V, generator=torch.Generator().manual_seed(0))
    assert (tokens < V).all()
    logits, _ = model(torch.cat([idx, tokens], 1))
    want = logits[:, 3:-1, :V].log_softmax(-1).gather(-1, tokens[..., None])[..., 0]  # normalized over V ids
    torch.testing.assert_close(logprobs, want, rtol=1e-4, atol=1e-4)


def test_filters_and_draw():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(gpt2.top_k_filter(logits, 2)).tolist() == [[True, False, False, True]]
    probs = logits.softmax(-1)  # 0.032, 0.644, 0.237, 0.087
    assert torch.isinf(gpt2.top_p_filter(logits, 0.8)).tolist() == [[True, False, False, True]]
    assert torch.isinf(gpt2.top_p_filter(logits, 0.5)).tolist() == [[True, False, True, True]]
    draws = gpt2.draw(probs.expand(20000, 4), torch.Generator().manual_seed(0))
    torch.testing.assert_close(torch.bincount(draws, minlength=4) / 20000., probs[0], atol=0.015, rtol=0)


# -----------------------------------------------------------------------------
# sft.py


def base_checkpoint(path, **kw):
    gpt2.save_checkpoint(str(path), tiny(**kw), tokenizer=BYTES.dumps())
    return str(path)


def task_folder(path, **sizes):
    bpe.task_files(path, seed=0, sizes={"pretrain": 10, "preference": 10, "rl": 10, **sizes}, max_digits=1)
    return str(path)


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


RUN = ["--device", "cpu", "--dtype", "float32", "--eval-batch-size", "50"]


@pytest.mark.parametrize("method", [[], ["--lora", "--lora-dropout", "0.1"], ["--packing", "--seq-len", "64"]])
def test_resume_is_exact(tmp_path, method, capsys, monkeypatch):
    init = base_checkpoint(tmp_path / "base.pt", dropout=0.1)
    data = task_folder(tmp_path / "task", sft=300, sft_val=20, test=20)
    common = ["--init", init, "--data", data, "--max-steps", "6", "--batch-size", "8", "--eval-interval", "3",
              "--warmup-steps", "2", "--lr", "3e-3", "--max-new-tokens", "6", *RUN, *method]
    sft.main([*common, "--out-dir", str(tmp_path / "straight")])
    with monkeypatch.context() as m:  # the first part's clock reads 1,000 s more at every look
        m.setattr(sft, "time", types.SimpleNamespace(time=itertools.count(0, 1000).__next__))
        sft.main([*common, "--out-dir", str(tmp_path / "split"), "--stop-after", "3"])
    assert not os.path.exists(tmp_path / "split" / "responses.json")
    sft.main(["--resume", "--out-dir", str(tmp_path / "split")])
    # train_s counts the stopped part's seconds too
    assert [r["train_s"] for r in metrics(tmp_path / "split") if "train_s" in r][-1] >= 1000
    capsys.readouterr()
    sft.main(["--resume", "--out-dir", str(tmp_path / "split"), "--lr", "0.5"])  # finished: trains nothing
    assert "--resume goes on with the run's own settings; not used: --lr 0.5 (the run's: " in capsys.readouterr().out
    train = lambda d: [(r["step"], r["train_loss"]) for r in metrics(d) if "train_loss" in r]
    assert train(tmp_path / "split") == train(tmp_path / "straight") and len(train(tmp_path / "split")) == 6
    evals = lambda d: [(r["step"], r["val_loss"], r["accuracy"]) for r in metrics(d) if "val_loss" in r]
    assert evals(tmp_path / "split") == evals(tmp_path / "straight")  # no second evaluation at the resume step
    capsys.readouterr()
    for extra in ([], ["--stop-after", "2"]):  # finished, or past --stop-after: no step, nothing logged or written
        sft.main(["--resume", "--out-dir", str(tmp_path / "split"), *extra])
        assert capsys.readouterr().out.endswith(f"nothing to do: the run in {tmp_path / 'split'} is at step 6 of 6\n")
    assert len(metrics(tmp_path / "split")) == len(metrics(tmp_path / "straight"))  # no second train_s row
    assert [e[0] for e in evals(tmp_path / "split")] == [0, 3, 6]
    # linear warmup over 2 steps, then cosine from 3e-3 down to 0.1 x 3e-3 at step 6
    lrs = [3e-3 * (s + 1) / 2 if s < 2 else 3e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 4)))
           for s in range(6)]
    assert [r["lr"] for r in metrics(tmp_path / "split") if "lr" in r] == pytest.approx(lrs, rel=1e-9)
    last = metrics(tmp_path / "split")[-1]
    lora_params = 2 * 4 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))  # r=4 on 4 Linears x 2 layers
    assert last["trainable_params"] == (lora_params if "--lora" in method else last["total_params"])
    a = gpt2.load_checkpoint(str(tmp_path / "straight" / "ckpt.pt"))
    b = gpt2.load_checkpoint(str(tmp_path / "split" / "ckpt.pt"))
    assert a["step"] == b["step"] == 6 and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert not torch.equal(a["model"]["transformer.h.0.attn.c_attn.weight"],
                           torch.load(init, weights_only=True)["model"]["transformer.h.0.attn.c_attn.weight"])
    # what the next stage needs: a plain model, the tokenizer, the template
    model = GPT.from_checkpoint(str(tmp_path / "split" / "ckpt.pt"))
    assert bpe.Tokenizer.loads(a["tokenizer"]).encode("7 + 1") == BYTES.encode("7 + 1")
    assert a["template"] == {"preamble": False} and model.config.vocab_size == 257
    responses = json.load(open(tmp_path / "split" / "responses.json"))
    assert len(responses) == 20 and {"instruction", "output", "model_response", "reward"} <= set(responses[0])
    if "--lora" in method:
        assert a["lora"] == {"r": 4, "alpha": 16, "targets": ["c_attn", "c_proj", "c_fc"], "dropout": 0.1}
        assert set(a["adapter"]) == {k for k in a["adapter"] if "lora_" in k}
        gpt2.load_adapter(tiny(dropout=0.1), str(tmp_path / "split" / "adapter.pt"))


def test_sft_learns_the_task(tmp_path):
    """From a random model, SFT on the 155 one-digit problems: the verifier's accuracy rises from zero. The test
    rows are training problems here: this checks that training and the scored evaluation work end to end (the
    held-out measurements are in bench/results/sft_cpu.md)."""
    init = base_checkpoint(tmp_path / "base.pt", n_layer=2, n_embd=64, n_head=4)
    problems = [(a, op, b) for a in range(10) for op in "+-" for b in range(10) if op == "+" or b <= a]
    texts = [bpe.task_text(*p) for p in problems]
    bpe.write_rows(tmp_path / "sft.jsonl", [{"prompt": q, "completion": w} for q, w, _ in texts])
    bpe.write_rows(tmp_path / "sft_val.jsonl", [{"prompt": q, "completion": w} for q, w, _ in texts[::8]])
    bpe.write_rows(tmp_path / "test.jsonl", [{"prompt": q, "answer": a} for q, _, a in texts[::3]])
    sft.main(["--init", init, "--data", str(tmp_path), "--out-dir", str(tmp_path / "run"), "--max-steps", "300",
              "--batch-size", "32", "--lr", "3e-3", "--warmup-steps", "10", "--eval-interval", "0",
              "--max-new-tokens", "10", *RUN])
    rows = [r for r in metrics(tmp_path / "run") if "accuracy" in r]
    assert [r["step"] for r in rows] == [0, 300]
    assert rows[0]["accuracy"] == 0.0 and rows[-1]["accuracy"] >= 0.3, rows  # measured: 0.56
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] / 10
    responses = json.load(open(tmp_path / "run" / "responses.json"))
    assert sum(r["reward"] for r in responses) / len(responses) == rows[-1]["accuracy"]


def test_gpt2_alpaca_preset_code_path(tmp_path, capsys):
    """The real recipe's settings, and its code path (HF weights, GPT-2 tokenizer, the shipped instruction data,
    the preamble, responses for judging) on a tiny random GPT-2-vocabulary model."""
    preset = sft.PRESETS["gpt2-alpaca"]
    assert (preset["init"], preset["epochs"], preset["lr"], preset["weight_decay"], preset["batch_size"]) == \
        ("gpt2-medium", 2, 5e-5, 0.1, 8)
    assert os.path.samefile(os.path.join(ROOT, preset["data"]), os.path.join(ROOT, "data", "instruction_data.json"))
    args = sft.parse_args(["--preset", "gpt2-alpaca"])
    assert args.split == "85/5/10" and args.preamble is True and args.lr is None and args.max_new_tokens == 256
    torch.manual_seed(0)
    hf = GPT(GPTConfig(block_size=512, vocab_size=50257, n_layer=1, n_head=2, n_embd=16))
    hf.save_pretrained(str(tmp_path / "hf"))
    cwd = os.getcwd()
    os.chdir(ROOT)  # the preset's data path is relative to the repository
    try:
        sft.main(["--preset", "gpt2-alpaca", "--init", str(tmp_path / "hf"), "--out-dir", str(tmp_path / "run"),
                  "--max-steps", "2", "--eval-limit", "3", "--max-new-tokens", "3", *RUN])
    finally:
        os.chdir(cwd)
    assert "935 train / 3 val / 3 test examples" in capsys.readouterr().out  # --eval-limit 3 cuts val and test
    rows = metrics(tmp_path / "run")
    assert rows[0]["step"] == 0 and "accuracy" not in rows[0] and rows[-1]["trainable_params"] > 800_000
    groups = gpt2.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))["optimizer"]["param_groups"]
    assert [(g["weight_decay"], tuple(g["betas"])) for g in groups] == [(0.1, (0.9, 0.999)), (0.0, (0.9, 0.999))]
    assert [r["lr"] for r in rows if "lr" in r] == pytest.approx([5e-5, 5e-5 * 0.55])  # no warmup, cosine
    responses = json.load(open(tmp_path / "run" / "responses.json"))
    data = json.load(open(os.path.join(ROOT, "data", "instruction_data.json")))
    # the first 85% are the training set, the next 10% the test set
    assert [r["instruction"] for r in responses] == [d["instruction"] for d in data[935:938]]
    assert [r["output"] for r in responses] == [d["output"] for d in data[935:938]] and "model_response" in responses[0]


def test_missing_base_model_prints_the_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        sft.main(["--data", task_folder(tmp_path / "task", sft=40, sft_val=5, test=5), *RUN])
    assert "out/task-base/ckpt.pt; make it with:\n    python train_gpt2.py --preset task\n" in str(e.value) + "\n"
    with pytest.raises(SystemExit, match=r"(?s)out/task-columns-base/ckpt.pt.*"
                                         r"python train_gpt2.py --preset task-columns"):
        sft.main(["--preset", "task-columns", *RUN])
    columns = sft.parse_args(["--preset", "task-columns"])  # the columns' answers: up to 48 bytes + the end
    assert (columns.data, columns.max_new_tokens, columns.out_dir) == ("task-columns", 64, "out/task-columns-sft")
    assert re.fullmatch(r"\d+ [-+] \d+: \d+[-+]\d+-?\+?\d=\d+.*, so \d+", sft.load_splits(columns)[0][0]["completion"])
    with pytest.raises(SystemExit, match="no checkpoint at"):
        sft.main(["--resume", "--out-dir", str(tmp_path / "nothing")])
    bpe.write_rows(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c"}] * 20)
    with pytest.raises(SystemExit, match="sum to 100"):
        sft.main(["--init", base_checkpoint(tmp_path / "b.pt"), "--data", str(tmp_path / "d.jsonl"),
                  "--split", "80/10", *RUN])
    with pytest.raises(SystemExit, match="train and val above 0"):  # no validation rows: nothing to measure
        sft.main(["--init", base_checkpoint(tmp_path / "b.pt"), "--data", str(tmp_path / "d.jsonl"),
                  "--split", "90/0/10", *RUN])


@pytest.mark.parametrize("flag,value,bound", [
    ("--batch-size", "0", 1), ("--max-steps", "-1", 1), ("--epochs", "0", 1), ("--eval-batch-size", "0", 1),
    ("--max-new-tokens", "0", 1), ("--seq-len", "0", 1), ("--lr", "-1", 0), ("--grad-clip", "-1", 0),
    ("--stop-after", "0", 1), ("--stop-after", "-1", 1), ("--eval-limit", "-1", 0), ("--max-len", "-5", 2),
    ("--max-len", "0", 2), ("--min-lr-ratio", "-1", 0), ("--warmup-steps", "-1", 0)])
def test_out_of_range_flags_are_refused(tmp_path, monkeypatch, flag, value, bound):
    """Refused where they are parsed, naming the flag: not a ZeroDivisionError in the loader, a run of 0 (or
    the default number of) steps, or, for a negative --grad-clip, a silently reversed gradient; a --max-len
    below 2 cut every example's end (its end-of-text among them), --stop-after 0 ran every step."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=rf"{flag} {value}(\.0)?: must be at least {bound}"):
        sft.main([flag, value])


def other_run(out_dir):
    """A checkpoint as reward_model.py writes it (its settings, its value head), in out_dir."""
    head = {"weight": torch.zeros(1, 32), "bias": torch.zeros(1)}
    gpt2.save_checkpoint(os.path.join(out_dir, "ckpt.pt"), tiny(), tokenizer=BYTES.dumps(), value_head=head,
                         method="rm", args={"method": "rm", "lr": 1e-4})
    return os.path.join(out_dir, "ckpt.pt")


@pytest.mark.parametrize("case", ["cuda", "reward_model", "char_gpt", "max_new_tokens", "lora_rank", "resume_other"])
def test_wrong_inputs_are_clear_errors(tmp_path, monkeypatch, case):
    """A mistaken device, model, setting or run directory: a SystemExit naming it and the fix, never a traceback
    from deep inside (nor, for a reward model as --init, a silent run)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine
    init = base_checkpoint(tmp_path / "base.pt")
    data = str(write(tmp_path / "d.jsonl", [{"prompt": "What is 1 + 1?", "completion": "1 + 1 = 2"}] * 20))
    if case == "char_gpt":  # a checkpoint whose config is not gpt2.GPTConfig's
        torch.save({"model": {}, "config": {"vocab_size": 65, "batch_size": 32}}, tmp_path / "char.pt")
    argv, words = {
        "cuda": (["--init", init, "--device", "cuda"], "--device cuda asked for, but no CUDA GPU"),
        "reward_model": (["--init", other_run(tmp_path / "rm")], "is a reward model"),
        "char_gpt": (["--init", str(tmp_path / "char.pt")], "not a gpt2.py model checkpoint"),
        "max_new_tokens": (["--init", init, "--max-new-tokens", "96"], "leaves no room for a prompt"),
        "lora_rank": (["--init", init, "--lora", "--lora-r", "0", "--batch-size", "4"], "--lora: LoRA rank r must be"),
        "resume_other": (["--resume", "--out-dir", os.path.dirname(other_run(tmp_path / "rm"))],
                         "was not written by sft.py"),
    }[case]
    with pytest.raises(SystemExit, match=words):
        sft.main(["--data", data, "--device", "cpu", *argv])


def test_response_loss_is_the_mean_over_every_response_token():
    """The held-out loss: cross-entropy summed over the response tokens of all batches, divided by their number
    (not a mean of batch means), with dropout off; the model is back in training mode afterwards."""
    model = tiny(dropout=0.5).train()
    ex = [bpe.encode_example(BYTES, p, c, preamble=False)
          for p, c in (("Hi", "Yo"), ("What is 2 + 3?", "2 + 3 = 5"), ("A", "a much longer answer than the rest"))]
    got = sft.response_loss(model, ex, 2, "cpu", torch.float32)  # batches of 2 and 1
    assert model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in ex:
            logits, _ = model(torch.tensor([ids[:-1]]))
            keep = torch.tensor(mask[1:], dtype=torch.bool)
            total += F.cross_entropy(logits[0][keep], torch.tensor(ids[1:])[keep], reduction="sum").item()
            count += int(keep.sum())
    assert count == 3 + 10 + 35 and got == pytest.approx(total / count, rel=1e-5)


def test_generate_responses_asks_in_the_template_and_returns_the_text(monkeypatch):
    """The sampler gets the prompts in the training template (input, preamble), left-padded, a long one cut to
    its last tokens; greedy, stopping at end-of-text, never drawing ids past the tokenizer; the text is the
    generated tokens without the end-of-text."""
    seen = {}

    def fake_sample(model, idx, max_new_tokens, **kw):
        seen.update(idx=idx, n=max_new_tokens, **kw)
        tokens = torch.tensor([BYTES.encode("ok") + [EOT, EOT], BYTES.encode("a b!")])
        return tokens, torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool), torch.zeros(2, 4)
    monkeypatch.setattr(sft, "sample", fake_sample)
    rows = [{"prompt": "Add them.", "input": "2 and 3"}, {"prompt": "x" * 300 + " What is 2 + 3?"}]
    out = sft.generate_responses(tiny(block_size=256), BYTES, rows, True, 4, 2, "cpu", torch.float32)
    assert out == ["ok", "a b!"]
    assert (seen["n"], seen["temperature"], seen["eos_id"], seen["vocab_size"]) == (4, 0, EOT, 257)
    idx, attn = seen["idx"], seen["attention_mask"]
    first = BYTES.encode(bpe.format_prompt("Add them.", "2 and 3", preamble=True))
    assert idx[0, -len(first):].tolist() == first and attn[0].tolist() == [0] * (252 - len(first)) + [1] * len(first)
    assert idx[1].tolist() == BYTES.encode(bpe.format_prompt(rows[1]["prompt"], preamble=True))[-252:]  # 256 - 4


def test_flags_reach_training_mask_prompt_preamble_epochs_max_len_grad_clip(tmp_path, capsys, monkeypatch):
    """The flags, counted in the target tokens of each step on rows of one length (a 47-byte-token prompt, a
    9-token response + end-of-text): the prompt masked, 10 per example; --no-mask-prompt, all 56 after the first,
    while the validation loss stays on the response; --preamble, 105 + 2 tokens more in training and validation,
    cut at the model's 160-token context even with a larger --max-len; --packing, rows of --seq-len whose only
    untrained targets are the examples' first tokens; --epochs 2 of 20 // 8 = 2 steps; --grad-clip at every
    step; --seed to the batch order."""
    init = base_checkpoint(tmp_path / "base.pt", block_size=160)
    texts = [bpe.task_text(a, "+", b) for a in range(5) for b in range(4)]  # 20 problems, every sum one digit
    bpe.write_rows(tmp_path / "sft.jsonl", [{"prompt": q, "completion": w} for q, w, _ in texts])
    bpe.write_rows(tmp_path / "sft_val.jsonl", [{"prompt": q, "completion": w} for q, w, _ in texts[:4]])
    bpe.write_rows(tmp_path / "test.jsonl", [{"prompt": q, "answer": a} for q, _, a in texts[:2]])
    clips, clip = [], torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda ps, m: clips.append((len(ps), m)) or clip(ps, m))
    loaders, Loader = [], sft.Loader
    monkeypatch.setattr(sft, "Loader", lambda *a, **kw: loaders.append(Loader(*a, **kw)) or loaders[-1])

    def run(name, *flags):
        sft.main(["--init", init, "--data", str(tmp_path), "--out-dir", str(tmp_path / name), "--batch-size", "8",
                  "--eval-interval", "0", "--max-new-tokens", "2", *RUN, *flags])
        rows = metrics(tmp_path / name)
        return [r["tokens"] for r in rows if "tokens" in r], rows[0]["val_loss"]

    masked = run("masked", "--epochs", "2", "--grad-clip", "0.5")
    assert "20 train / 4 val / 2 test examples" in capsys.readouterr().out
    assert masked[0] == [8 * 10] * 4 and clips == [(len(list(tiny().parameters())), 0.5)] * 4
    full = run("full", "--no-mask-prompt", "--max-steps", "1", "--seed", "5")
    assert full == ([8 * 56], masked[1])  # the same model at step 0, judged on the same response tokens
    assert loaders[1].seed == 5
    pre = run("preamble", "--no-mask-prompt", "--preamble", "--max-steps", "1", "--max-len", "1000",
              "--grad-clip", "0")
    val = sft.encode_rows(bpe.read_rows(tmp_path / "sft_val.jsonl", "sft"), BYTES, True, True, 160)
    assert pre == ([8 * 159], pytest.approx(sft.response_loss(GPT.from_checkpoint(init), val, 50, "cpu",
                                                              torch.float32), rel=1e-6))  # 164 tokens, cut to 160
    # 8 rows of 100 from a stream of 57-token examples: the targets 1..800 hold 14 example starts (57 x 14 = 798)
    assert run("packed", "--packing", "--seq-len", "100", "--no-mask-prompt", "--max-steps", "1")[0] == [800 - 14]
    assert len(clips) == 6
    # --packing into rows shorter than a prompt: a row of prompt tokens only has no loss; no NaN is logged and
    # no optimizer step taken (it would replay Adam's momentum)
    steps, adam_step = [], torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **kw: steps.append(1) or adam_step(self, *a, **kw))
    sft.main(["--init", init, "--data", str(tmp_path), "--out-dir", str(tmp_path / "windows"), "--batch-size", "1",
              "--packing", "--seq-len", "16", "--max-steps", "8", "--eval-interval", "0", "--max-new-tokens", "2", *RUN])
    rows = [r for r in metrics(tmp_path / "windows") if "tokens" in r]
    assert len(rows) == 8 and 0 < sum(r["tokens"] > 0 for r in rows) < 8
    assert all(("train_loss" in r) == (r["tokens"] > 0) for r in rows)
    assert all(math.isfinite(r["train_loss"]) for r in rows if "train_loss" in r)
    assert len(steps) == sum(r["tokens"] > 0 for r in rows)


def test_long_prompts_keep_their_end_when_answered(capsys):
    """Evaluation answers a prompt longer than the context leaves next to the answer from its last tokens,
    instead of failing (the model only reads block_size tokens)."""
    model = tiny()  # block_size 96
    rows = [{"prompt": "x" * 200 + " What is 2 + 3?"}, {"prompt": "What is 2 + 3?"}]
    out = sft.generate_responses(model, BYTES, rows, False, 8, 2, "cpu", torch.float32)
    assert len(out) == 2 and "1 of 2 prompts were longer than the 88 tokens" in capsys.readouterr().out
    with pytest.raises(ValueError, match="leaves no room for a prompt"):
        sft.generate_responses(model, BYTES, rows, False, 96, 2, "cpu", torch.float32)


def test_no_example_fits_says_which_limit(tmp_path):
    """No training example keeps a response token: raise --max-len if it is below the model's context; at the
    context, the prompts are the problem (raising --max-len, which is cut to the context, would change nothing)."""
    init = base_checkpoint(tmp_path / "base.pt")  # block_size 96
    data = str(write(tmp_path / "d.jsonl", [{"prompt": "x" * 120, "completion": "y"}] * 20))
    with pytest.raises(SystemExit, match="within 40 tokens; raise --max-len \\(up to the model's 96\\)"):
        sft.main(["--init", init, "--data", data, "--max-len", "40", "--max-new-tokens", "4", *RUN])
    with pytest.raises(SystemExit, match="within 96 tokens; the prompts fill the model's context"):
        sft.main(["--init", init, "--data", data, "--max-len", "400", "--max-new-tokens", "4", *RUN])


def test_examples_whose_prompt_fills_max_len_are_left_out(capsys):
    tok = bpe.byte_tokenizer()
    rows = [{"prompt": "a" * 80, "completion": "b"}, {"prompt": "a", "completion": "b"}]
    out = sft.encode_rows(rows, tok, False, True, 60)
    assert len(out) == 1 and any(out[0][1]) and "1 of them left out" in capsys.readouterr().out
    assert len(sft.encode_rows(rows, tok, False, False, 60)) == 2  # loss on the prompt too: every row trains
    (ids, mask), = sft.encode_rows([{"prompt": "a", "completion": "b" * 80}], tok, False, True, 60)
    want = bpe.encode_example(tok, "a", "b" * 80, preamble=False)
    assert (ids, mask) == (want[0][:60], want[1][:60])  # cut at 60 tokens: the prompt and the response's start


def test_compile_flag_compiles_the_training_pass(tmp_path, monkeypatch, counting_compile):
    fake, calls = counting_compile  # stands in for torch.compile
    monkeypatch.setattr(sft, "maybe_compile", fake)
    init, data = base_checkpoint(tmp_path / "base.pt"), task_folder(tmp_path / "task", sft=40, sft_val=8, test=4)
    sft.main(["--init", init, "--data", data, "--max-steps", "2", "--batch-size", "8", "--eval-interval", "0",
              "--max-new-tokens", "4", "--compile", *RUN, "--out-dir", str(tmp_path / "c")])
    assert calls == [2]  # one forward per step


def test_task_folder_maps_the_word_task_to_the_written_task(monkeypatch):
    written = []
    monkeypatch.setattr(bpe, "task_files", lambda worked: written.append(worked) or {
        "test": bpe.TASK_DIR.with_name({"equation": "task", "columns": "task-columns"}[worked]) / "test.jsonl"})
    assert bpe.task_folder("task") == bpe.TASK_DIR and written == ["equation"]  # the files are written first
    assert bpe.task_folder("task-columns") == bpe.TASK_DIR.with_name("task-columns") and written[-1] == "columns"
    assert bpe.task_folder("my_task") == "my_task" and len(written) == 2


def test_offline_init_is_an_error_naming_the_files(tmp_path, offline):
    """OpenAI's weights (--init gpt2) without network: the script's one-line error names the download and where
    to put it."""
    with pytest.raises(SystemExit) as e:
        sft.main(["--init", "gpt2", "--out-dir", str(tmp_path / "out")])
    assert str(e.value.code).startswith("sft.py: error: --init gpt2: could not download "
                                        "https://huggingface.co/openai-community/gpt2/")
    assert "model.safetensors" in str(e.value.code)
