#!/usr/bin/env bash
# The Fashion-MNIST tables of docs/results.md, end to end on one machine (CPU is enough, but slow: see
# docs/results.md for the measured times). Every step resumes or is skipped when rerun.
#   FMNIST=/path/to/fashion-mnist OUT=/path/to/workdir jobs/fashion-mnist-results.sh
# FMNIST holds train.parquet and test.parquet (Hugging Face layout: an image struct and a ClassLabel
# 'label'); they are read in place. The generator and the teacher of the tables are committed under
# jobs/models/fashion-mnist-16/ and used as they are; without them (MODELS=/elsewhere) they are trained.
# STAGE stops early: sets (models, statistics and distilled sets only), kd, hard, soft, nsweep, why, ipc50,
# full (the default: everything). ROWS (a regex, default: every row) runs only the student rows whose
# names match, so that two shells can share the rows out, e.g. ROWS='^hard-' and ROWS='^(soft|n)'.
set -euo pipefail
FMNIST=${FMNIST:-../shared/data/fashion-mnist}
OUT=${OUT:-d3hr-results/fashion-mnist}
PY=${PY:-python}
STAGE=${STAGE:-full}
ROWS=${ROWS:-.}
MODELS=${MODELS:-$(cd "$(dirname "$0")" && pwd)/models/fashion-mnist-16}
export RAY_TRAIN_V2_ENABLED=1
RUNS="$(mkdir -p "$OUT" && cd "$OUT" && pwd)/runs"  # Ray Train wants an absolute storage path
MODEL_RUNS=${MODEL_RUNS:-$RUNS}  # the finetune job's checkpoints (VAE run <name>-vae, DiT run <name>)
TRAIN="$FMNIST/train.parquet"
TEST="$FMNIST/test.parquet"
R=16                  # working resolution: the generator's, the teacher's and the students'
STATS_PER_CLASS=${STATS_PER_CLASS:-100}  # D3HR statistics from a seeded subset of each class (see docs/results.md)
EPOCHS=400            # student epochs on the distilled and baseline sets (docs/method.md stage 6, CIFAR)
EVAL_EVERY=50         # test evaluations per student run: 400 / 50 = 8 (the test set is 10,000 images)
done_with() { [ "$STAGE" = "$1" ] && { cat "$OUT"/eval/*/results.md 2>/dev/null || true; exit 0; } || true; }

# 1. Teacher: conv3 on the full train split (60,000 images) at R px, scored on the test split (10,000).
TEACHER="$MODELS/teacher"
if [ ! -f "$TEACHER/teacher.json" ]; then
  TEACHER="$OUT/teacher"
  [ -f "$TEACHER/teacher.json" ] || $PY -m d3hr_ray.train_teacher --data "$TRAIN" --test "$TEST" --arch conv3 \
    --resolution $R --epochs 6 --eval-every 2 --torch-threads 1 --output "$TEACHER" --storage-path "$RUNS" --name teacher-fmnist
fi

# 2. The generator: VAE 'small' (latents 4x8x8 at 16 px) and DiT 'mini' on the train split, then the gate:
#    label agreement >= 0.9 with the real-data teacher (train longer with DIT_EPOCHS if it fails; delete
#    $OUT/model first, and $OUT/stats* and $OUT/sets, which belong to one model).
MODEL="$MODELS/model"
if [ ! -f "$MODEL/model_index.json" ]; then
  MODEL="$OUT/model"
  [ -f "$MODEL/model_index.json" ] || $PY -m d3hr_ray.finetune --data "$TRAIN" --train-vae --vae small --dit mini \
    --resolution $R --vae-epochs 1 --epochs ${DIT_EPOCHS:-5} --lr 3e-4 --batch-size 64 --sample-steps 25 --torch-threads 1 \
    --output "$MODEL" --storage-path "$MODEL_RUNS" --name fmnist-mini
fi
if [ ! "$OUT/agreement.md" -nt "$MODEL/model_index.json" ]; then
  $PY -m d3hr_ray.diagnose agreement --model "$MODEL" --classifier "$TEACHER" --per-class 100 \
    --grid "$OUT/agreement-grid.png" > "$OUT/agreement.md.tmp"
  mv "$OUT/agreement.md.tmp" "$OUT/agreement.md"
fi
cat "$OUT/agreement.md"
AGREE=$(awk -F'|' '/^\| agreement/ {gsub(/ /, "", $(NF-1)); print $(NF-1)}' "$OUT/agreement.md")
awk -v a="$AGREE" -v m="${MIN_AGREEMENT:-0.9}" 'BEGIN { exit !(a >= m) }' || { echo "label agreement $AGREE < ${MIN_AGREEMENT:-0.9}: train the model longer (DIT_EPOCHS)" >&2; exit 1; }

# 3. D3HR statistics (encode + invert to K = 30 of 50 DDIM steps, w = 4) of seeded subsets of the train split
#    (`--stats-per-class`): the tables' (STATS_PER_CLASS a class, inverted latents kept for D3HR's selection among
#    real images), K = 20 (the knob of docs/results.md), and the sweep over how many images the statistics need.
stats() {  # stats NAME [flags...]
  local name=$1; shift
  [ -f "$OUT/$name/stats.safetensors" ] || $PY -m d3hr_ray.distill --data "$TRAIN" --model "$MODEL" --stats-only \
    --batch-size 256 "$@" --output "$OUT/$name"
}
stats stats --stats-per-class $STATS_PER_CLASS --keep-latents
stats stats-k20 --stats-per-class $STATS_PER_CLASS --inversion-step 20
stats stats-n10 --stats-per-class 10
stats stats-n1000 --stats-per-class 1000 --keep-latents
stats stats-w1 --stats-per-class $STATS_PER_CLASS --guidance 1  # the guidance knob: inverted at w = 1
[ -z "${STATS_ALL:-}" ] || stats stats-all --keep-latents  # every train image (about 2 CPU hours): STATS_ALL=1
STATS="$OUT/stats/stats.safetensors"

# 4. Distilled sets (paper defaults: K = 30, w = 4, weights 1, 1, 0.1; m = 100,000), the noise ablation
#    (z_K ~ N(0, I)), D3HR without group selection (m = 1), D3HR's selection among real images (the kept latents
#    of the same statistics, and of 1,000 a class), K = 20, and the statistics sweep.
distill() {  # distill NAME IPC STATS [flags...]
  local name=$1 ipc=$2 from=$3; shift 3
  [ -f "$OUT/sets/$name/distilled.parquet" ] || $PY -m d3hr_ray.distill --data "$TRAIN" --model "$MODEL" \
    --from-stats "$from" --ipc $ipc --output-size $R "$@" --output "$OUT/sets/$name"
}
for IPC in 1 10 50; do
  distill d3hr-ipc$IPC $IPC "$STATS"
  distill noise-ipc$IPC $IPC "$STATS" --latents noise
  distill onecand-ipc$IPC $IPC "$STATS" --candidates 1
done
for IPC in 1 10; do
  distill real-ipc$IPC $IPC "$STATS" --candidates-from real
  distill real1000-ipc$IPC $IPC "$OUT/stats-n1000/stats.safetensors" --candidates-from real
  distill k20-ipc$IPC $IPC "$OUT/stats-k20/stats.safetensors" --inversion-step 20
done
distill n10-ipc10 10 "$OUT/stats-n10/stats.safetensors"
distill n1000-ipc10 10 "$OUT/stats-n1000/stats.safetensors"
[ ! -f "$OUT/stats-all/stats.safetensors" ] || distill nall-ipc10 10 "$OUT/stats-all/stats.safetensors"
for W in 1 2; do distill w$W-ipc10 10 "$STATS" --guidance $W; done
for IPC in 1 10; do distill w1all-ipc$IPC $IPC "$OUT/stats-w1/stats.safetensors" --guidance 1; done  # w = 1 throughout
done_with sets

# 5. Students: conv3, docs/method.md stage 6's crops, flips and CutMix, 400 epochs; repeats re-seed the student (and
#    redraw random real; k-center re-seeds its first image). --labels: kd (the teacher on every batch, the
#    paper's), soft (the teacher's targets of each image, once), hard (the class labels; DC, DSA, MTT).
EV="$PY -m d3hr_ray.evaluate --test $TEST --teacher $TEACHER --student conv3 --storage-path $RUNS --torch-threads 1 --epochs $EPOCHS"
row() {  # row NAME LABELS REPEATS [the training set's flags...]
  local name=$1 labels=$2 rep=$3; shift 3
  [[ "$name" =~ $ROWS ]] || return 0
  $EV --labels $labels --eval-every $EVAL_EVERY --repeats $rep "$@" --output "$OUT/eval/$name" --name $name
}
set_row() {  # set_row NAME LABELS IPC REPEATS SET "LABEL"
  row "$1" "$2" "$4" --distilled "$OUT/sets/$5" --label "$6"
}
real_row() {  # real_row NAME LABELS IPC REPEATS BASELINE
  row "$1" "$2" "$4" --baseline "$5" --real "$TRAIN" --ipc "$3"
}
reps() { [ "$1" = 1 ] && echo 5 || echo 3; }  # 5 repeats at IPC 1, 3 at IPC 10 and 50

if [[ "$STAGE" =~ ^(kd|full)$ ]]; then  # the paper's regime
  for IPC in 1 10; do
    real_row random-ipc$IPC kd $IPC $(reps $IPC) random-real
    set_row d3hr-ipc$IPC kd $IPC $(reps $IPC) d3hr-ipc$IPC "D3HR, IPC $IPC"
    set_row noise-ipc$IPC kd $IPC $(reps $IPC) noise-ipc$IPC "noise ablation, IPC $IPC"
    set_row onecand-ipc$IPC kd $IPC $(reps $IPC) onecand-ipc$IPC "D3HR without group selection (m = 1), IPC $IPC"
  done
fi
done_with kd
if [[ "$STAGE" =~ ^(hard|full)$ ]]; then  # hard labels: where data quality shows
  for IPC in 1 10; do
    for B in random-real herding k-center; do real_row hard-$B-ipc$IPC hard $IPC $(reps $IPC) $B; done
    set_row hard-d3hr-ipc$IPC hard $IPC $(reps $IPC) d3hr-ipc$IPC "D3HR, IPC $IPC"
    set_row hard-k20-ipc$IPC hard $IPC $(reps $IPC) k20-ipc$IPC "D3HR K = 20, IPC $IPC"
    set_row hard-noise-ipc$IPC hard $IPC $(reps $IPC) noise-ipc$IPC "noise ablation, IPC $IPC"
    set_row hard-real-ipc$IPC hard $IPC $(reps $IPC) real-ipc$IPC "D3HR-selected real ($STATS_PER_CLASS a class), IPC $IPC"
    set_row hard-real1000-ipc$IPC hard $IPC $(reps $IPC) real1000-ipc$IPC "D3HR-selected real (1,000 a class), IPC $IPC"
  done
fi
done_with hard
if [[ "$STAGE" =~ ^(soft|full)$ ]]; then  # fixed soft labels
  for IPC in 1 10; do
    for B in random-real herding; do real_row soft-$B-ipc$IPC soft $IPC $(reps $IPC) $B; done
    set_row soft-d3hr-ipc$IPC soft $IPC $(reps $IPC) d3hr-ipc$IPC "D3HR, IPC $IPC"
  done
fi
done_with soft
if [[ "$STAGE" =~ ^(nsweep|full)$ ]]; then  # how many images the statistics need (hard labels, IPC 10)
  set_row n10-ipc10 hard 10 3 n10-ipc10 "D3HR, statistics of 10 a class, IPC 10"
  set_row n1000-ipc10 hard 10 3 n1000-ipc10 "D3HR, statistics of 1,000 a class, IPC 10"
  [ ! -d "$OUT/sets/nall-ipc10" ] || set_row nall-ipc10 hard 10 3 nall-ipc10 "D3HR, statistics of every image, IPC 10"
fi
done_with nsweep

# 6. Why. Through the teacher's eyes first (seconds, no student): the sets' label fidelity, diversity and test
#    coverage, and where D3HR's class model loses the class (docs/results.md); then the knobs on students.
TEACHER_VIEW="$PY -m d3hr_ray.diagnose"
if [[ "$STAGE" =~ ^(why|full)$ ]]; then
  [ -f "$OUT/why-sets.md" ] || $TEACHER_VIEW sets --teacher "$TEACHER" --set "D3HR=$OUT/sets/d3hr-ipc10" \
    --set "noise ablation=$OUT/sets/noise-ipc10" --set "one candidate (m 1)=$OUT/sets/onecand-ipc10" \
    --set "K = 20=$OUT/sets/k20-ipc10" --set "D3HR-selected real=$OUT/sets/real-ipc10" \
    --set "D3HR-selected real (1,000)=$OUT/sets/real1000-ipc10" --set "herding=$OUT/eval/hard-herding-ipc10/sets/seed-0.json" \
    --set "k-center=$OUT/eval/hard-k-center-ipc10/sets/seed-0.json" --set "statistics of 10 a class=$OUT/sets/n10-ipc10" \
    --set "statistics of 1,000 a class=$OUT/sets/n1000-ipc10" --set "w = 1 throughout=$OUT/sets/w1all-ipc10" \
    --real "$TRAIN" --real-ipc 10 --real-seeds 0,1,2,3,4 --test "$TEST" > "$OUT/why-sets.md"
  for KW in "20 4" "30 4" "40 4" "30 1"; do
    set -- $KW
    [ -f "$OUT/why-latents-k$1-w$2.md" ] || $TEACHER_VIEW latents --model "$MODEL" --teacher "$TEACHER" \
      --data "$TRAIN" --test "$TEST" --per-class 10 --inversion-step $1 --guidance $2 > "$OUT/why-latents-k$1-w$2.md"
  done
  # The knob that moves the class model most (why-latents-k30-w1.md): w = 1 for the inversion and the sampling.
  for IPC in 1 10; do
    set_row hard-w1all-ipc$IPC hard $IPC $(reps $IPC) w1all-ipc$IPC "D3HR w = 1 (inversion and sampling), IPC $IPC"
  done
fi
done_with why

# 7. IPC 50 (kd), 3 repeats.
real_row random-ipc50 kd 50 3 random-real
set_row d3hr-ipc50 kd 50 3 d3hr-ipc50 "D3HR, IPC 50"
set_row noise-ipc50 kd 50 3 noise-ipc50 "noise ablation, IPC 50"
set_row onecand-ipc50 kd 50 3 onecand-ipc50 "D3HR without group selection (m = 1), IPC 50"
done_with ipc50

# 8. The ceiling: all 60,000 train images, the same protocol, fewer epochs (see docs/results.md).
[[ full =~ $ROWS ]] && $EV --baseline full --real "$TRAIN" --epochs ${FULL_EPOCHS:-4} --eval-every 1 --repeats 3 \
  --output "$OUT/eval/full" --name full
cat "$OUT"/eval/*/results.md
