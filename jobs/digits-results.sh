#!/usr/bin/env bash
# The digits table of docs/results.md, end to end on one machine (CPU is enough; ~1 h on 2 cores).
# Every step is resumable: rerun the script and finished steps are skipped or resumed.
#   OUT=/path/to/workdir jobs/digits-results.sh
set -euo pipefail
OUT=${OUT:-d3hr-results/digits}
PY=${PY:-python}
export RAY_TRAIN_V2_ENABLED=1
RUNS="$OUT/runs"

# 1. Teacher: conv3 on the real training split (digits:train, 1,348 images), scored on digits:test (449).
[ -f "$OUT/teacher/teacher.json" ] || $PY -m d3hr_ray.train_teacher --data digits:train --test digits:test --resolution 16 \
  --epochs 60 --eval-every 5 --output "$OUT/teacher" --storage-path "$RUNS" --name teacher-digits

# 2. D3HR statistics of digits:train with the bundled model, then the distilled sets (and the noise ablation).
[ -f "$OUT/stats/stats.safetensors" ] || $PY -m d3hr_ray.distill --data digits:train --stats-only --output "$OUT/stats"
for IPC in 1 10; do
  [ -f "$OUT/d3hr-ipc$IPC/manifest.json" ] || $PY -m d3hr_ray.distill --data digits:train --from-stats "$OUT/stats/stats.safetensors" \
    --ipc $IPC --output "$OUT/d3hr-ipc$IPC"
  [ -f "$OUT/noise-ipc$IPC/manifest.json" ] || $PY -m d3hr_ray.distill --data digits:train --from-stats "$OUT/stats/stats.safetensors" \
    --ipc $IPC --latents noise --output "$OUT/noise-ipc$IPC"
done

# 3. Students: conv3, the protocol of D3HR.md stage 6, 400 epochs on the small sets; 10 repeats at IPC 1 (where the methods separate), 3 at IPC 10.
EV="$PY -m d3hr_ray.evaluate --test digits:test --teacher $OUT/teacher --student conv3 --storage-path $RUNS"
for IPC in 1 10; do
  REP=$([ $IPC = 1 ] && echo 10 || echo 3)
  $EV --baseline random-real --real digits:train --ipc $IPC --epochs 400 --repeats $REP --output "$OUT/eval/random-ipc$IPC" --name random-ipc$IPC
  $EV --distilled "$OUT/d3hr-ipc$IPC" --epochs 400 --repeats $REP --label "D3HR, IPC $IPC" --output "$OUT/eval/d3hr-ipc$IPC" --name d3hr-ipc$IPC
  $EV --distilled "$OUT/noise-ipc$IPC" --epochs 400 --repeats $REP --label "noise ablation, IPC $IPC" --output "$OUT/eval/noise-ipc$IPC" --name noise-ipc$IPC
done
# The ceiling: all of digits:train with the same protocol (40 epochs of 1,348 images: as many image
# steps as 400 epochs at IPC 10 and more than the 60-epoch teacher's half; CPU time kept in check).
$EV --baseline full --real digits:train --epochs 40 --eval-every 2 --repeats 3 --output "$OUT/eval/full" --name full
cat "$OUT"/eval/*/results.md
