#!/usr/bin/env bash
# Every perplexity table of the README, on SmolLM2-135M with the offline WikiText-2 copy.
# Each sweep resumes where it stopped; results land in results/<name>/ (sweep.json, table.md, ppl.png).
# Usage: bash bench/reproduce.sh [DATA_DIR]   (default ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/data}"
COMMON=(--model smollm2-135m --data_dir "$DATA" --device cpu --quiet)
CORE=(--nsamples 32 --seqlen 512 --eval_samples 64 --eval_batch_size 4)

# Core methods, plain and with GRAIL at lambda 0 (affine and linear fits).
grail sweep "${COMMON[@]}" "${CORE[@]}" --out results/core --methods mag_sp,wanda_sp \
  --ratios 0.1,0.2,0.3,0.5 --lambdas 0 --fits affine,linear
# FLAP (WIFV, AL-AM): plain, GRAIL affine, and the research code's convention (uncentred fit plus mean bias).
grail sweep "${COMMON[@]}" "${CORE[@]}" --out results/flap --methods flap \
  --ratios 0.1,0.2,0.3,0.5 --lambdas 0 --fits affine,seed
# Grouped-query attention: query-head bundles instead of key/value groups.
grail sweep "${COMMON[@]}" "${CORE[@]}" --out results/flap_query --methods flap,wanda_sp --attention_unit query \
  --ratios 0.2,0.3,0.5 --variants plain
# SlimGPT and Wanda++, plain and with GRAIL.
grail sweep "${COMMON[@]}" "${CORE[@]}" --out results/obs_wandapp --methods slimgpt,wanda_pp_sp \
  --ratios 0.1,0.2,0.3,0.5 --lambdas 0
# Choosing lambda: none, 0, 1e-3 and auto, at 16 and at 128 calibration windows of 256 tokens.
for N in 16 128; do
  grail sweep "${COMMON[@]}" --nsamples "$N" --seqlen 256 --eval_samples 64 --eval_batch_size 8 \
    --out "results/lambda_$N" --methods wanda_sp,flap --ratios 0.1,0.2,0.3,0.5,0.7 --lambdas 0,0.001,auto
done
# Zero-shot mean accuracy (first 200 examples per task), dense and at 20% / 50%.
grail sweep "${COMMON[@]}" "${CORE[@]}" --out results/zero_shot --methods flap,wanda_sp --ratios 0.2,0.5 \
  --lambdas auto --zero_shot --zero_shot_limit 200 --eval_batch_size 8
