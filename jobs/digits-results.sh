#!/usr/bin/env bash
# The digits tables of docs/results.md, end to end on one machine (CPU is enough; ~1 h on 2 cores for each
# label regime). Every step is resumable: rerun the script and finished steps are skipped or resumed.
#   OUT=/path/to/workdir jobs/digits-results.sh
# LABELS=kd (the paper's protocol), hard (cross-entropy on the class labels) or all (the default).
set -euo pipefail
OUT=${OUT:-d3hr-results/digits}
PY=${PY:-python}
LABELS=${LABELS:-all}
export RAY_TRAIN_V2_ENABLED=1
RUNS="$(mkdir -p "$OUT" && cd "$OUT" && pwd)/runs"  # Ray Train wants an absolute storage path

# 1. Teacher: conv3 on the real training split (digits:train, 1,348 images), scored on digits:test (449).
[ -f "$OUT/teacher/teacher.json" ] || $PY -m d3hr_ray.train_teacher --data digits:train --test digits:test --resolution 16 \
  --epochs 60 --eval-every 5 --output "$OUT/teacher" --storage-path "$RUNS" --name teacher-digits

# 2. D3HR statistics of digits:train with the bundled model (every inverted latent kept, for D3HR's selection
#    among real images), then the distilled sets, the noise ablation and D3HR-selected real images.
[ -f "$OUT/stats/stats.safetensors" ] || $PY -m d3hr_ray.distill --data digits:train --stats-only --keep-latents --output "$OUT/stats"
for IPC in 1 10; do
  [ -f "$OUT/d3hr-ipc$IPC/distilled.parquet" ] || $PY -m d3hr_ray.distill --data digits:train --from-stats "$OUT/stats/stats.safetensors" \
    --ipc $IPC --output "$OUT/d3hr-ipc$IPC"
  [ -f "$OUT/noise-ipc$IPC/distilled.parquet" ] || $PY -m d3hr_ray.distill --data digits:train --from-stats "$OUT/stats/stats.safetensors" \
    --ipc $IPC --latents noise --output "$OUT/noise-ipc$IPC"
  [ -f "$OUT/real-ipc$IPC/distilled.parquet" ] || $PY -m d3hr_ray.distill --data digits:train --from-stats "$OUT/stats/stats.safetensors" \
    --ipc $IPC --candidates-from real --output "$OUT/real-ipc$IPC"
done

# 3. Students: conv3, 400 epochs on the small sets; 10 repeats at IPC 1 (where the methods separate), 3 at IPC 10.
#    kd: the protocol of docs/method.md stage 6 (soft labels from the teacher). hard: the same crops, flips and CutMix,
#    cross-entropy on the class labels, no teacher (DC, DSA, MTT); the coreset baselines need its features.
EV="$PY -m d3hr_ray.evaluate --test digits:test --teacher $OUT/teacher --student conv3 --storage-path $RUNS"
if [ "$LABELS" = kd ] || [ "$LABELS" = all ]; then
  for IPC in 1 10; do
    REP=$([ $IPC = 1 ] && echo 10 || echo 3)
    $EV --baseline random-real --real digits:train --ipc $IPC --epochs 400 --repeats $REP --output "$OUT/eval/random-ipc$IPC" --name random-ipc$IPC
    $EV --distilled "$OUT/d3hr-ipc$IPC" --epochs 400 --repeats $REP --label "D3HR, IPC $IPC" --output "$OUT/eval/d3hr-ipc$IPC" --name d3hr-ipc$IPC
    $EV --distilled "$OUT/noise-ipc$IPC" --epochs 400 --repeats $REP --label "noise ablation, IPC $IPC" --output "$OUT/eval/noise-ipc$IPC" --name noise-ipc$IPC
  done
  # The ceiling: all of digits:train with the same protocol (40 epochs of 1,348 images: as many image
  # steps as 400 epochs at IPC 10 and more than the 60-epoch teacher's half; CPU time kept in check).
  $EV --baseline full --real digits:train --epochs 40 --eval-every 2 --repeats 3 --output "$OUT/eval/full" --name full
fi
if [ "$LABELS" = hard ] || [ "$LABELS" = all ]; then
  H="$EV --labels hard --epochs 400"
  for IPC in 1 10; do
    REP=$([ $IPC = 1 ] && echo 10 || echo 3)
    for B in random-real herding; do
      $H --baseline $B --real digits:train --ipc $IPC --repeats $REP --output "$OUT/eval/hard-$B-ipc$IPC" --name hard-$B-ipc$IPC
    done
    $H --distilled "$OUT/d3hr-ipc$IPC" --repeats $REP --label "D3HR, IPC $IPC" --output "$OUT/eval/hard-d3hr-ipc$IPC" --name hard-d3hr-ipc$IPC
    $H --distilled "$OUT/real-ipc$IPC" --repeats $REP --label "D3HR-selected real, IPC $IPC" --output "$OUT/eval/hard-real-ipc$IPC" \
      --name hard-real-ipc$IPC
  done
fi
cat "$OUT"/eval/*/results.md
