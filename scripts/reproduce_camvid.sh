#!/usr/bin/env bash
# Reproduces the README's CamVid table: supervised-only, CPS and CPS + CutMix on CamVid with 1/8 of the training
# frames labelled, every variant x seed under the same recipe (scripts/configs/camvid.yaml), evaluated on the
# validation split, summarised in docs/camvid/results.json.
#
#   bash scripts/reproduce_camvid.sh [--source DIR] [--seeds 0 1 2] [--variants supervised cps cps_cutmix]
#                                    [--runs_dir runs/camvid] [--parallel 2] [--max_steps N]
#                                    [--results docs/camvid/results.json]
#
# Finished runs (an eval.json next to the model) are skipped; interrupted ones resume from their last complete
# checkpoint. With --parallel N, N runs share the machine at one thread each.
set -euo pipefail
cd "$(dirname "$0")/.."

SOURCE=../shared/datasets/camvid
SEEDS=(0 1 2)
VARIANTS=(supervised cps cps_cutmix)
RUNS_DIR=runs/camvid
PARALLEL=1
CONFIG=scripts/configs/camvid.yaml
MAX_STEPS=  # empty: the recipe's
RESULTS=docs/camvid/results.json
DOWNSCALE=4  # the frames of the recipe's `dataset_name` (data/camvid-90x120): 360x480 / 4
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python

read_list() { # read_list NAME ARGS...: the values up to the next --flag, into the array NAME
    local -n target=$1
    shift
    target=()
    while [ $# -gt 0 ] && [[ $1 != --* ]]; do target+=("$1"); shift; done
}
while [ $# -gt 0 ]; do
    case $1 in
        --source) SOURCE=$2; shift 2 ;;
        --runs_dir) RUNS_DIR=$2; shift 2 ;;
        --parallel) PARALLEL=$2; shift 2 ;;
        --config) CONFIG=$2; shift 2 ;;
        --downscale) DOWNSCALE=$2; shift 2 ;;
        --max_steps) MAX_STEPS=$2; shift 2 ;;
        --results) RESULTS=$2; shift 2 ;;
        --seeds) shift; read_list SEEDS "$@"; shift ${#SEEDS[@]} ;;
        --variants) shift; read_list VARIANTS "$@"; shift ${#VARIANTS[@]} ;;
        *) echo "Unknown argument: $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done

# The recipe's dataset folder (its `dataset_name`), made from the SegNet-layout source at the recipe's resolution.
DATA=$("$PYTHON" -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['dataset_name'])" "$CONFIG")
if [ ! -f "$DATA/dataset_dict.json" ]; then
    "$PYTHON" scripts/prepare_dataset.py camvid --source "$SOURCE" --output "$DATA" --downscale "$DOWNSCALE"
fi

variant_flags() {
    case $1 in
        supervised) echo "--supervised_only true" ;;
        cps) echo "" ;;
        cps_cutmix) echo "--cutmix true" ;;
        cps_threshold) echo "--cps_confidence_threshold 0.7" ;;
        cps_cutmix_threshold) echo "--cutmix true --cps_confidence_threshold 0.7" ;;
        cps_cutmix_warmup) echo "--cutmix true --cps_weight_warmup_steps 500" ;;
        cps_fused) echo "--fused_forward true" ;;
        cps_cutmix_fused) echo "--cutmix true --fused_forward true" ;;
        # SegNet's CamVid class balancing (median frequency) in the supervised loss (_mfb), and also in the CPS loss.
        supervised_mfb) echo "--supervised_only true --class_weighting median_frequency" ;;
        cps_mfb) echo "--class_weighting median_frequency" ;;
        cps_cutmix_mfb) echo "--cutmix true --class_weighting median_frequency" ;;
        cps_cutmix_fused_mfb) echo "--cutmix true --fused_forward true --class_weighting median_frequency" ;;
        cps_cutmix_fused_mfb_cps) echo "--cutmix true --fused_forward true --class_weighting median_frequency --cps_class_weighting true" ;;
        # Colour jitter (torchvision ColorJitter strengths) of every training image, on top of the class weights.
        supervised_mfb_jitter) echo "--supervised_only true --class_weighting median_frequency --color_jitter 0.4 0.4 0.4 0.1" ;;
        cps_cutmix_mfb_jitter) echo "--cutmix true --class_weighting median_frequency --color_jitter 0.4 0.4 0.4 0.1" ;;
        supervised_lr03) echo "--supervised_only true --learning_rate 0.03" ;;
        cps_cutmix_lr03) echo "--cutmix true --learning_rate 0.03" ;;
        cps_cutmix_fused_lambda05) echo "--cutmix true --fused_forward true --cps_weight 0.5" ;;
        # The official Cityscapes supervised loss; min_kept scaled from 50,000 of an 800x800 crop (7.8 % of its pixels)
        # to 3,400 of the 4 x 90 x 120 labelled pixels of a batch here.
        supervised_ohem) echo "--supervised_only true --supervised_loss ohem --ohem_min_kept 3400" ;;
        cps_cutmix_fused_ohem) echo "--cutmix true --fused_forward true --supervised_loss ohem --ohem_min_kept 3400" ;;
        *) echo "Unknown variant $1" >&2; return 2 ;;
    esac
}

run_one() { # run_one VARIANT SEED: train (or resume) then evaluate every branch and the ensemble
    local variant=$1 seed=$2 run_dir="$RUNS_DIR/$1-seed$2"
    if [ -f "$run_dir/eval.json" ]; then
        echo "done already: $run_dir"
        return
    fi
    local flags
    flags=$(variant_flags "$variant")
    [ -z "$MAX_STEPS" ] || flags="$flags --max_steps $MAX_STEPS"
    if [ ! -f "$run_dir/all_results.json" ]; then
        # shellcheck disable=SC2086
        OMP_NUM_THREADS=$THREADS "$PYTHON" scripts/train_cps.py "$CONFIG" --output_dir "$run_dir" --seed "$seed" \
            $flags >"$run_dir.log" 2>&1
    fi
    OMP_NUM_THREADS=$THREADS "$PYTHON" scripts/evaluate_cps.py --model "$run_dir" --dataset_name "$DATA" \
        --split validation --cpu true --output_json "$run_dir/eval.json" >>"$run_dir.log" 2>&1
    echo "finished: $run_dir"
}

mkdir -p "$RUNS_DIR"
THREADS=$(( $(nproc) / PARALLEL )); [ "$THREADS" -ge 1 ] || THREADS=1
jobs_running=0
failed=0
for seed in "${SEEDS[@]}"; do
    for variant in "${VARIANTS[@]}"; do
        run_one "$variant" "$seed" &
        jobs_running=$((jobs_running + 1))
        if [ "$jobs_running" -ge "$PARALLEL" ]; then
            wait -n || failed=$((failed + 1))
            jobs_running=$((jobs_running - 1))
        fi
    done
done
while [ "$jobs_running" -gt 0 ]; do
    wait -n || failed=$((failed + 1))
    jobs_running=$((jobs_running - 1))
done
if [ "$failed" -gt 0 ]; then
    echo "$failed run(s) failed: see the logs next to their folders in $RUNS_DIR" >&2
    exit 1
fi

"$PYTHON" scripts/camvid_results.py --runs_dir "$RUNS_DIR" --config "$CONFIG" --output "$RESULTS"
