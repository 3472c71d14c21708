#!/usr/bin/env bash
# The Fashion-MNIST table of docs/results.md, end to end on one machine (CPU is enough, but slow: see
# docs/results.md for the measured times). Every step resumes or is skipped when rerun.
#   FMNIST=/path/to/fashion-mnist OUT=/path/to/workdir jobs/fashion-mnist-results.sh
# FMNIST holds train.parquet and test.parquet (Hugging Face layout: an image struct and a ClassLabel
# 'label'); they are read in place. Set STAGE to stop early: teacher, model, stats, distill, main
# (IPC 1 and 10), ablation, ipc50, full (the default, everything).
set -euo pipefail
FMNIST=${FMNIST:-../shared/data/fashion-mnist}
OUT=${OUT:-d3hr-results/fashion-mnist}
PY=${PY:-python}
STAGE=${STAGE:-full}
export RAY_TRAIN_V2_ENABLED=1
RUNS="$(mkdir -p "$OUT" && cd "$OUT" && pwd)/runs"  # Ray Train wants an absolute storage path
MODEL_RUNS=${MODEL_RUNS:-$RUNS}  # the finetune job's checkpoints (VAE run <name>-vae, DiT run <name>)
TRAIN="$FMNIST/train.parquet"
TEST="$FMNIST/test.parquet"
R=16                  # working resolution: the generator's, the teacher's and the students'
STATS_PER_CLASS=${STATS_PER_CLASS:-100}  # D3HR statistics from a seeded subset of the train split (see docs/results.md)
EPOCHS=400            # student epochs on the distilled and random-real sets (D3HR.md stage 6, CIFAR)
EVAL_EVERY=50         # test evaluations per student run: 400 / 50 = 8 (the test set is 10,000 images)
done_with() { [ "$STAGE" = "$1" ] && { cat "$OUT"/eval/*/results.md 2>/dev/null || true; exit 0; } || true; }

# 1. Teacher: conv3 on the full train split (60,000 images) at R px, scored on the test split (10,000).
[ -f "$OUT/teacher/teacher.json" ] || $PY -m d3hr_ray.train_teacher --data "$TRAIN" --test "$TEST" --arch conv3 \
  --resolution $R --epochs 6 --eval-every 2 --torch-threads 1 --output "$OUT/teacher" --storage-path "$RUNS" --name teacher-fmnist
done_with teacher

# 2. The generator: VAE 'small' (latents 4x8x8 at 16 px) and DiT 'mini' on the train split. Constant
#    learning rates: a run stopped after an epoch and rerun with that --epochs equals a run of that length,
#    and a rerun with a larger DIT_EPOCHS continues it (delete $OUT/model first: it marks the step done;
#    the statistics and distilled sets below belong to one model: delete $OUT/stats and $OUT/sets too).
[ -f "$OUT/model/model_index.json" ] || $PY -m d3hr_ray.finetune --data "$TRAIN" --train-vae --vae small --dit mini \
  --resolution $R --vae-epochs 1 --epochs ${DIT_EPOCHS:-5} --lr 3e-4 --batch-size 64 --sample-steps 25 --torch-threads 1 \
  --output "$OUT/model" --storage-path "$MODEL_RUNS" --name fmnist-mini
# Does it know its classes? The gate before distilling: label agreement >= 0.9 with the real-data teacher.
# Measured again whenever the model is newer than the last measurement.
if [ ! "$OUT/agreement.md" -nt "$OUT/model/model_index.json" ]; then
  $PY -m d3hr_ray.bench agreement --model "$OUT/model" --classifier "$OUT/teacher" --per-class 100 \
    --grid "$OUT/agreement-grid.png" > "$OUT/agreement.md.tmp"
  mv "$OUT/agreement.md.tmp" "$OUT/agreement.md"
fi
cat "$OUT/agreement.md"
AGREE=$(awk -F'|' '/^\| agreement/ {gsub(/ /, "", $(NF-1)); print $(NF-1)}' "$OUT/agreement.md")
awk -v a="$AGREE" -v m="${MIN_AGREEMENT:-0.9}" 'BEGIN { exit !(a >= m) }' || { echo "label agreement $AGREE < ${MIN_AGREEMENT:-0.9}: train the model longer (DIT_EPOCHS)" >&2; exit 1; }
done_with model

# 3. D3HR statistics (encode + invert to K = 30 of 50 DDIM steps) of a seeded subset of the train split,
#    STATS_PER_CLASS images per class, written as Parquet with the same schema and ClassLabel names.
if [ ! -f "$OUT/stats-subset.parquet" ]; then
  $PY - "$TRAIN" "$OUT/stats-subset.parquet" $STATS_PER_CLASS <<'EOF'
import sys
import numpy as np
import pyarrow.parquet as pq
src, dst, per_class = sys.argv[1], sys.argv[2], int(sys.argv[3])
table = pq.read_table(src)  # keeps the schema metadata (the ClassLabel names)
labels = table.column("label").to_numpy()  # (N,)
rng = np.random.default_rng(0)
keep = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in np.unique(labels)]))
pq.write_table(table.take(keep), dst)
print(f"{dst}: {len(keep)} of {len(labels)} rows, {per_class} per class")
EOF
fi
STATS="$OUT/stats/stats.safetensors"
[ -f "$STATS" ] || $PY -m d3hr_ray.distill --data "$OUT/stats-subset.parquet" --model "$OUT/model" --stats-only \
  --batch-size 256 --output "$OUT/stats"
done_with stats

# 4. Distilled sets from the statistics (paper defaults: K = 30, w = 4, weights 1, 1, 0.1; m = 100,000),
#    the noise ablation (z_K ~ N(0, I)) and D3HR without group selection (m = 1: one candidate group).
distill() {  # distill NAME IPC [flags...]
  local name=$1 ipc=$2; shift 2
  [ -f "$OUT/sets/$name/manifest.json" ] || $PY -m d3hr_ray.distill --data "$OUT/stats-subset.parquet" --model "$OUT/model" \
    --from-stats "$STATS" --ipc $ipc --output-size $R "$@" --output "$OUT/sets/$name"
}
for IPC in 1 10 50; do
  distill d3hr-ipc$IPC $IPC
  distill noise-ipc$IPC $IPC --latents noise
  distill onecand-ipc$IPC $IPC --candidates 1
done
done_with distill

# 5. Students: conv3, D3HR.md stage 6, 400 epochs; repeats re-seed the student (and redraw random real).
EV="$PY -m d3hr_ray.evaluate --test $TEST --teacher $OUT/teacher --student conv3 --storage-path $RUNS --torch-threads 1"
student() {  # student NAME IPC REPEATS LABEL
  $EV --distilled "$OUT/sets/$1" --epochs $EPOCHS --eval-every $EVAL_EVERY --repeats $3 --label "$4" --output "$OUT/eval/$1" --name $1
}
random_real() {  # random_real IPC REPEATS
  $EV --baseline random-real --real "$TRAIN" --ipc $1 --epochs $EPOCHS --eval-every $EVAL_EVERY --repeats $2 \
    --output "$OUT/eval/random-ipc$1" --name random-ipc$1
}
for IPC in 1 10; do
  random_real $IPC 5
  student d3hr-ipc$IPC $IPC 5 "D3HR, IPC $IPC"
  student noise-ipc$IPC $IPC 5 "noise ablation, IPC $IPC"
  student onecand-ipc$IPC $IPC 5 "D3HR without group selection (m = 1), IPC $IPC"
done
done_with main

# 6. Why (issue #12, item 4). Through the teacher's eyes first (seconds, no student): the sets' label
#    fidelity, diversity and test coverage, and where D3HR's class model loses the class (docs/results.md).
TEACHER_VIEW="$PY -m d3hr_ray.bench"
[ -f "$OUT/why-sets.md" ] || $TEACHER_VIEW sets --teacher "$OUT/teacher" --set "D3HR=$OUT/sets/d3hr-ipc10" \
  --set "noise ablation=$OUT/sets/noise-ipc10" --set "one candidate (m 1)=$OUT/sets/onecand-ipc10" \
  --real "$TRAIN" --real-ipc 10 --real-seeds 0,1,2,3,4 --test "$TEST" > "$OUT/why-sets.md"
for KW in "20 4" "30 4" "40 4" "45 4" "30 1"; do
  set -- $KW
  [ -f "$OUT/why-latents-k$1-w$2.md" ] || $TEACHER_VIEW latents --model "$OUT/model" --teacher "$OUT/teacher" \
    --data "$OUT/stats-subset.parquet" --test "$TEST" --per-class 10 --inversion-step $1 --guidance $2 > "$OUT/why-latents-k$1-w$2.md"
done
#    Then the knobs at IPC 10 (3 repeats each): a shallower inversion (K = 20 of 50: new statistics) and
#    the guidance w of the sampling (the statistics of K = 30, w = 4).
[ -f "$OUT/stats-k20/stats.safetensors" ] || $PY -m d3hr_ray.distill --data "$OUT/stats-subset.parquet" --model "$OUT/model" \
  --stats-only --inversion-step 20 --batch-size 256 --output "$OUT/stats-k20"
[ -f "$OUT/sets/k20-ipc10/manifest.json" ] || $PY -m d3hr_ray.distill --data "$OUT/stats-subset.parquet" --model "$OUT/model" \
  --from-stats "$OUT/stats-k20/stats.safetensors" --inversion-step 20 --ipc 10 --output-size $R --output "$OUT/sets/k20-ipc10"
student k20-ipc10 10 3 "D3HR K = 20, IPC 10"
for W in 1 2; do
  distill w$W-ipc10 10 --guidance $W
  student w$W-ipc10 10 3 "D3HR w = $W, IPC 10"
done
done_with ablation

# 7. IPC 50, 3 repeats.
random_real 50 3
student d3hr-ipc50 50 3 "D3HR, IPC 50"
student noise-ipc50 50 3 "noise ablation, IPC 50"
student onecand-ipc50 50 3 "D3HR without group selection (m = 1), IPC 50"
done_with ipc50

# 8. The ceiling: all 60,000 train images, the same protocol, fewer epochs (see docs/results.md).
$EV --baseline full --real "$TRAIN" --epochs ${FULL_EPOCHS:-4} --eval-every 1 --repeats 3 --output "$OUT/eval/full" --name full
cat "$OUT"/eval/*/results.md
