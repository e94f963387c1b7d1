#!/usr/bin/env bash
# Every perplexity and accuracy table of the README, on SmolLM2-135M with the offline data copies.
# Each sweep resumes where it stopped; results land in results/<name>/ (sweep.json, table.md, ppl.png).
# Usage: bash bench/reproduce.sh [DATA_DIR]   (default ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/data}"
COMMON=(--model smollm2-135m --data_dir "$DATA" --device cpu --quiet)
CORE=(--nsamples 32 --seqlen 512 --eval_samples 64 --eval_batch_size 4)
# The small setting: 16 calibration windows of 256 tokens, the first 32 test windows of 256 tokens.
SMALL=(--seqlen 256 --eval_samples 32 --eval_batch_size 8)

# 1. Core methods, plain and with GRAIL at lambda 0 (affine and linear fits), 32 x 512 calibration.
grail sweep "${COMMON[@]}" "${CORE[@]}" --out results/core --methods mag_sp,wanda_sp \
  --ratios 0.1,0.2,0.3,0.5 --lambdas 0 --fits affine,linear
# 2. Every method, no compensation / lambda 0 / lambda 1e-3 / auto, at 16 calibration windows.
grail sweep "${COMMON[@]}" "${SMALL[@]}" --nsamples 16 --out results/lambda_16 --methods flap,wanda_sp \
  --ratios 0.1,0.2,0.3,0.5,0.7 --lambdas 0,0.001,auto
# 3. FLAP with the research code's convention (uncentred fit plus mean bias), same setting.
grail sweep "${COMMON[@]}" "${SMALL[@]}" --nsamples 16 --out results/flap_seed --methods flap \
  --ratios 0.1,0.2,0.3,0.5,0.7 --variants grail --lambdas 0 --fits seed
# 4. SlimGPT and Wanda++, plain, lambda 0 and auto, same setting.
grail sweep "${COMMON[@]}" "${SMALL[@]}" --nsamples 16 --out results/obs_wandapp --methods slimgpt,wanda_pp_sp \
  --ratios 0.1,0.2,0.3,0.5,0.7 --lambdas 0,auto
# 5. Grouped-query attention: query-head bundles instead of whole key/value groups (group rows: sweep 2).
grail sweep "${COMMON[@]}" "${SMALL[@]}" --nsamples 16 --out results/flap_query --methods flap,wanda_sp \
  --attention_unit query --ratios 0.1,0.2,0.3,0.5,0.7 --variants plain
# 6. Zero-shot accuracy (first 200 examples per task), dense and at 20% / 50%, plain and with GRAIL (auto).
grail sweep "${COMMON[@]}" "${SMALL[@]}" --nsamples 16 --out results/zero_shot_200 \
  --methods flap,wanda_sp,slimgpt,wanda_pp_sp --ratios 0.2,0.5 --lambdas auto --zero_shot --zero_shot_limit 200
# 7. The lambda table again with 128 calibration windows (wanda_sp).
grail sweep "${COMMON[@]}" "${SMALL[@]}" --nsamples 128 --out results/lambda_128 --methods wanda_sp \
  --ratios 0.1,0.5 --lambdas 0,0.001,auto
# 8. The planner: predicted against measured peaks (synthetic models), and the 7B-70B predictions.
python bench/bench_plan.py --data_dir "$DATA" --out results/plan
python bench/plan_table.py --out results/plan_table
