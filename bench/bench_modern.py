"""Decode speed of a modern model through gpt2.py vs transformers: a random model of Qwen2.5-0.5B's shape (24
layers, width 896, 14 query / 2 key-value heads, SwiGLU 4864, 151,936-token tied vocabulary, q/k/v biases),
written once by transformers' save_pretrained and loaded by both GPT.from_pretrained and Qwen2ForCausalLM (the
same weights; speed does not depend on their values). Batch 1, greedy, KV cache on both sides; fp32 and bf16,
each loaded in that dtype. Prints a markdown table: tokens/s, ours / transformers, and whether the tokens agree.

    OMP_NUM_THREADS=1 python bench/bench_modern.py --threads 1 --new 32        # the CPU table
    python bench/bench_modern.py --device cuda --new 128 --repeats 3           # on a GPU
    python bench/bench_modern.py --shape tiny                                  # a smoke run in seconds
"""

import argparse
import datetime
import math
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import generate as G  # noqa: E402
from gpt2 import GPT  # noqa: E402

SHAPES = {  # transformers.Qwen2Config fields
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "tiny": dict(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, rope_theta=1000000.0, rms_norm_eps=1e-6,
                 tie_word_embeddings=True),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def model_dir(args):
    """The random model in HF layout (fp32 safetensors), written once."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    path = os.path.join(args.out, f"{args.shape}-random")
    if not os.path.exists(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        Qwen2ForCausalLM(Qwen2Config(**SHAPES[args.shape])).save_pretrained(path)
    return path


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen2.5-0.5b", choices=list(SHAPES), help="model shape")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where both models run")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES), help="dtypes to measure")
    p.add_argument("--prompt-len", type=int, default=16, help="random prompt tokens")
    p.add_argument("--new", type=int, default=32, help="new tokens per generation")
    p.add_argument("--repeats", type=int, default=2, help="timed generations per contender (best kept)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default="/tmp/bench_modern", help="where the random model is written")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import Qwen2ForCausalLM
    path = model_dir(args)
    n_prompt, n = args.prompt_len, args.new
    idx = torch.randint(0, SHAPES[args.shape]["vocab_size"], (1, n_prompt),
                        generator=torch.Generator().manual_seed(0)).to(args.device)
    print(f"### {args.shape}, batch 1, prompt {n_prompt}, {n} new tokens, greedy, {args.device} "
          f"({platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
          f"{', ' + torch.cuda.get_device_name() if args.device == 'cuda' else ''}), "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n")
    print("| dtype | ours tok/s | transformers tok/s | ours / HF | identical tokens |\n|---|---|---|---|---|")
    for name in args.dtypes:
        dtype = DTYPES[name]
        ours = GPT.from_pretrained(path, dtype=dtype).to(args.device).eval()
        hf = Qwen2ForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
        run_ours = lambda: G.generate(ours, idx, n, G.GREEDY)  # noqa: E731
        run_hf = lambda: hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n,  # noqa: E731
                                     min_new_tokens=n, do_sample=False, pad_token_id=0)
        G.generate(ours, idx, 2, G.GREEDY), hf.generate(idx, max_new_tokens=2, do_sample=False, pad_token_id=0)
        t_ours = t_hf = math.inf
        for _ in range(args.repeats):  # interleaved, so a busy spell on the machine hits both
            t, a = timed(run_ours)
            t_ours = min(t_ours, t)
            t, b = timed(run_hf)
            t_hf = min(t_hf, t)
        agree = (a[0, n_prompt:] == b[0, n_prompt:]).float().mean().item()
        first = next((i for i in range(n) if a[0, n_prompt + i] != b[0, n_prompt + i]), None)
        same = "yes" if torch.equal(a, b) else f"no ({agree:.0%} of positions; first difference at token {first})"
        print(f"| {name} | {n / t_ours:.2f} | {n / t_hf:.2f} | {t_hf / t_ours:.2f}x | {same} |", flush=True)
        del ours, hf


if __name__ == "__main__":
    main()
