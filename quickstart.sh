#!/usr/bin/env bash
# Copyright 2026 The BalancedDPO authors. Licensed under the Apache License, Version 2.0 (see LICENSE).
# A real BalancedDPO training run on tiny local models and data, with the four default scorers on the fly.
# Installs the requirements into .venv, builds the tiny assets offline, trains through `accelerate launch`.
set -euo pipefail
cd "$(dirname "$0")"

VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -r requirements.txt

export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ASSETS=${ASSETS:-tiny_assets}
OUTPUT=${OUTPUT:-quickstart_output}
[ -f "$ASSETS/scorers/reward_config.json" ] || "$VENV/bin/python" tiny_assets.py --output_dir "$ASSETS" --no_sdxl

"$VENV/bin/accelerate" launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  train_balanced_dpo.py \
  --pretrained_model_name_or_path "$ASSETS/sd" \
  --dataset_name "$ASSETS/pickapic" \
  --reward_models pickscore,hpsv2,clip,aesthetic \
  --reward_config "$ASSETS/scorers/reward_config.json" \
  --consensus majority \
  --output_dir "$OUTPUT" \
  --resolution 32 \
  --train_batch_size 4 \
  --gradient_accumulation_steps 2 \
  --max_train_steps 20 \
  --learning_rate 1e-4 \
  --use_8bit_adam \
  --gradient_checkpointing \
  --checkpointing_steps 10 \
  --validation_prompts "a red circle on a white background" "a blue square on a black background" \
  --validation_steps 10 \
  --validation_inference_steps 4 \
  --score_validation \
  --seed 0

echo
echo "LoRA weights: $OUTPUT/pytorch_lora_weights.safetensors (model card: $OUTPUT/README.md)"
