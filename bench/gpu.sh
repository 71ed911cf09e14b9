#!/usr/bin/env bash
# Every GPU measurement of the project, one after another, on a CUDA machine:
#
#     bash bench/gpu.sh            # all steps, ~1-2 hours on one H100 (the speculative pair's training is most of it)
#     bash bench/gpu.sh tests gpt2 # only the named steps
#
# Steps (each writes its own results file under bench/results/, with the GPU's name, torch version and command):
#   tests     the test suite with the device-dependent tests on CUDA too -> bench/results/tests_gpu.md
#   gpt2      GPT-2 124M forward+backward, T=1024, bf16 + compile: tokens/s, MFU  -> gpt2_gpu.md
#   train     train_gpt2.py at 124M, T=1024, bf16 + compile + fused AdamW: tokens/s, MFU -> train_gpt2_gpu.md
#   repro     the first 200 steps of --preset gpt2-10b: loss falls, full-run time extrapolated -> train_gpt2_gpu.md
#   char      char_gpt.py --preset gpu: val loss (goal <= 1.47) and time -> char_gpt_gpu.md
#   generate  generate.py: HF table fp32/bf16, cache vs none, CUDA graphs, speculative -> generate_gpu.md
#   posttrain every post-training script on CUDA (bf16, fp16, --compile), exit status and wall -> cuda_gpu.md
#             (needs the task pipeline's out/task-base, out/task-sft, out/task-rm, made on any machine)
# A failing step is reported and the next one runs; the exit status is the number of failed steps.
set -u
cd "$(dirname "$0")/.."
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: bench/gpu.sh needs a CUDA GPU (torch.cuda.is_available() is False here)" >&2
    exit 2
fi
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(tests gpt2 train repro char generate posttrain)
failed=0
run() {  # run <name> <command...>: time it, keep going on failure
    echo "=== $1: ${*:2}"
    local t0=$SECONDS
    if "${@:2}"; then echo "=== $1: ok ($((SECONDS - t0)) s)"; else echo "=== $1: FAILED ($((SECONDS - t0)) s)"; failed=$((failed + 1)); fi
}
tests_gpu() {
    local log
    log=$(mktemp)
    LLM_SCRATCH_TEST_DEVICES=cpu,cuda python -m pytest -q 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    { echo "## $(date -u +%F) $(python -c 'import torch; print(torch.cuda.get_device_name(), "torch", torch.__version__)')"
      echo; echo '`LLM_SCRATCH_TEST_DEVICES=cpu,cuda python -m pytest -q`'; echo; echo '```'; tail -n 30 "$log"; echo '```'; echo
    } >> bench/results/tests_gpu.md
    rm -f "$log"
    return "$rc"
}
posttrain_gpu() {
    local f=bench/results/cuda_gpu.md failed=0 cmd t rc
    { echo; echo "## $(date -u '+%F %H:%M') UTC, bash bench/gpu.sh posttrain: $(python -c 'import torch; print(torch.cuda.get_device_name(), "torch", torch.__version__)')"
      echo; echo "| command | exit | wall (s) |"; echo "|---|---|---|"; } >> "$f"
    for cmd in "sft.py --dtype float16 --lora --max-steps 20 --eval-interval 10 --eval-limit 100" \
               "sft.py --dtype bfloat16 --compile --max-steps 60 --eval-interval 60 --eval-limit 100" \
               "reward_model.py --dtype bfloat16 --compile --max-steps 60 --eval-interval 60 --eval-limit 100" \
               "reward_model.py --dtype float16 --method dpo --max-steps 20 --eval-interval 10 --eval-limit 100" \
               "ppo.py --dtype bfloat16 --reward rm --max-steps 10 --eval-interval 10 --eval-limit 100" \
               "ppo.py --dtype bfloat16 --compile --reward rm --max-steps 10 --eval-interval 10 --eval-limit 100" \
               "grpo.py --dtype bfloat16 --compile --max-steps 10 --eval-interval 10 --eval-limit 100" \
               "classify.py --dtype bfloat16 --compile --max-steps 60" \
               "moe.py --dtype bfloat16 --max-steps 40 --eval-interval 20"; do
        t=$SECONDS
        python ${cmd%% *} --device cuda ${cmd#* } --out-dir "$(mktemp -d)" > /dev/null 2>&1
        rc=$?
        echo "| \`python ${cmd%% *} --device cuda ${cmd#* }\` | $rc | $((SECONDS - t)) |" >> "$f"
        [ "$rc" -eq 0 ] || failed=1
    done
    return "$failed"
}
for s in "${steps[@]}"; do
    case "$s" in
        tests)    run tests tests_gpu ;;
        gpt2)     run gpt2 python bench/bench_gpt2.py --gpu --out bench/results/gpt2_gpu.md ;;
        train)    run train python bench/bench_train_gpt2.py --gpu ;;
        repro)    run repro python bench/bench_train_gpt2.py --repro ;;
        char)     run char python bench/bench_char_gpt.py ;;
        generate) run generate bash -c "python bench/bench_generate.py train && python bench/bench_generate.py gpu" ;;
        posttrain) run posttrain posttrain_gpu ;;
        *) echo "unknown step $s (tests gpt2 train repro char generate posttrain)" >&2; failed=$((failed + 1)) ;;
    esac
done
echo "=== $failed step(s) failed"
exit "$failed"
