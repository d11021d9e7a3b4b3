#!/usr/bin/env bash
# Make the shipped shapes pair from nothing, the Hybrid-SD way: train the cloud model (hybrid-sd train-shapes),
# make the edge from its large UNet with hybrid-sd compress (prune to a fifth of its MACs per step, distil from
# it, W8A8 with the per-layer kernel choice, a tiny decoder distilled from its VAE), then measure the pair and
# write its card.
#
#   bash scripts/make_shapes_pair.sh OUT     # about four and a half hours on a 2-core CPU; rerun it to continue
#
# Writes OUT/trained (train-shapes' cloud model, checkpointed in OUT/checkpoints), OUT/edge-* (one bundle per action)
# and OUT/pair, the shipped layout (cloud/, edge/, training.json, evaluation.json, README.md): copy it over
# hybrid_sd/shapes/pair to ship it. Finished steps are kept. The defaults make the shipped pair. TRAIN_ARGS replaces
# the recipe's train-shapes options (train_args below; e.g. add "--device cuda" to them to train on a GPU);
# DISTILL_STEPS, LATE_DISTILL_STEPS, TINY_VAE_STEPS, PROMPTS and EVAL_PROMPTS shorten the chain for a quick trial.
# LATE_DISTILL_STEPS > 0 adds a distillation on the steps after the default switch alone (compress distill
# --from-step) before quantizing; TIMESTEP_POWER writes the pair's serving.json, its default timestep_power
# (empty: none, the scheduler's own spacing).
set -euo pipefail
out=${1:?usage: bash scripts/make_shapes_pair.sh OUT}
venv="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin"
hybrid_sd="$venv/hybrid-sd"
# The shipped cloud model: a contrastively pretrained, then frozen, text encoder and a large UNet on a zero
# terminal SNR schedule (docs/design.md, "Training the shapes pair").
train_args=${TRAIN_ARGS-"--schedule zero-terminal-snr --freeze-text-encoder --text-steps 1500 --large-steps 8000"}
distill_steps=${DISTILL_STEPS:-2000}
late_distill_steps=${LATE_DISTILL_STEPS:-1000}
tiny_vae_steps=${TINY_VAE_STEPS:-2000}
timestep_power=${TIMESTEP_POWER-1.5}
prompts=${PROMPTS:-384}  # training captions whose large-model generations the distillations learn from
eval_prompts=${EVAL_PROMPTS:-64}  # held-out captions the card's evaluation scores
# The pair's serving guidance: compress defaults to 7.5 for a model named by path.
guidance=$("$venv/python" -c "from hybrid_sd.shapes_pair.pair_models import GUIDANCE_SCALE; print(GUIDANCE_SCALE)")
# The default switch step of compress's 20-step generations: the first step an edge continues from.
switch_step=$("$venv/python" -c "from hybrid_sd.request import DEFAULT_SWITCH_FRACTION as f; print(round(f * 20))")

if [ ! -f "$out/trained/training.json" ]; then
  resume=()
  [ -f "$out/checkpoints/run.json" ] && resume=(--resume)
  # shellcheck disable=SC2086  # train_args is a list of options
  "$hybrid_sd" train-shapes --cloud-only --out "$out/trained" --checkpoints "$out/checkpoints" "${resume[@]}" \
    $train_args
fi

cloud="$out/trained/cloud"
compress() {  # BUNDLE ACTION [OPTIONS...]: one action on the cloud model, skipped once its bundle exists
  local bundle=$1
  shift
  [ -f "$out/$bundle/bundle.json" ] ||
    "$hybrid_sd" compress "$@" --cloud-model "$cloud" --edge-model "$cloud" --guidance "$guidance" --out "$out/$bundle"
}
compress edge-pruned prune --source cloud --metric macs --budget 0.2 --widths \
  --prompts shapes-train:4 --calibration-rows 4
# Width pruning changes every block's output width, so no block feature matches the teacher's: output alone.
compress edge-distilled distill --edge-bundle "$out/edge-pruned" --teacher cloud --feature-weight 0 \
  --prompts "shapes-train:$prompts" --train-steps "$distill_steps"
distilled=edge-distilled
if [ "$late_distill_steps" -gt 0 ]; then
  # Then on the steps the edge serves in a hybrid at the default switch, where a large model that decides late
  # leaves it the colours (docs/design.md, "Distilling the edge for the steps it serves").
  compress edge-late distill --edge-bundle "$out/edge-distilled" --teacher cloud --feature-weight 0 \
    --prompts "shapes-train:$prompts" --train-steps "$late_distill_steps" --from-step "$switch_step"
  distilled=edge-late
fi
compress edge-quantized quantize --edge-bundle "$out/$distilled" --kernel onednn --prompts shapes-train:16
# 16 channels: wider TAESD blocks would cost as much as this small VAE's own decoder.
compress edge tiny-vae --edge-bundle "$out/edge-quantized" --width 16 --batch-size 16 \
  --prompts "shapes-train:$((prompts / 2))" --train-steps "$tiny_vae_steps"

rm -rf "$out/pair"
mkdir -p "$out/pair"
cp -r "$out/trained/cloud" "$out/trained/training.json" "$out/pair/"
cp -r "$out/edge" "$out/pair/edge"
if [ -n "$timestep_power" ]; then
  echo "{\"timestep_power\": $timestep_power}" >"$out/pair/serving.json"
fi
"$hybrid_sd" evaluate-shapes --pair "$out/pair" --sweep-out "$out/pair-eval" --eval-prompts "$eval_prompts"
