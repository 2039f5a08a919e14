#!/usr/bin/env bash
# Shrink a model in CI: run the whole prunekit job from a config file and fail the build when the
# slimmed model lost too much accuracy.
#
#   examples/ci.sh [CONFIG] [OUT_DIR] [MAX_ACCURACY_DROP]
#
# Environment: PRUNEKIT (the command, default `prunekit`), EXTRA_ARGS (more flags for `prunekit run`,
# e.g. "--epochs 1"). The run directory keeps every output (checkpoints, model.onnx, plan.json,
# report.json) and result.json, the JSON document `prunekit run --json` printed; upload it as an artifact.
#
# Exit codes (those of `prunekit run`): 0 passed, 3 accuracy gate failed, 2 bad input (config, data,
# weights, paths), 1 a bug in prunekit, 130 interrupted.
set -euo pipefail

config="${1:-examples/run.toml}"
out_dir="${2:-runs/ci}"
max_drop="${3:-5}"
prunekit="${PRUNEKIT:-prunekit}"
read -r -a extra <<< "${EXTRA_ARGS:-}"

mkdir -p "$out_dir"
"$prunekit" --version >&2

status=0
"$prunekit" run "$config" --out-dir "$out_dir" --max-accuracy-drop "$max_drop" --json "${extra[@]}" \
    > "$out_dir/result.json" || status=$?

case "$status" in
    0)
        echo "prunekit: passed (accuracy drop within $max_drop points); outputs in $out_dir" >&2
        ;;
    3)
        echo "prunekit: ACCURACY GATE FAILED: the slimmed model lost more than $max_drop accuracy points;" \
            "see $out_dir/report.json (summary.accuracy_drop_points)" >&2
        ;;
    2)
        echo "prunekit: BAD INPUT: check $config, the data path and the weights (the error line above says" \
            "which); nothing was judged" >&2
        ;;
    130)
        echo "prunekit: interrupted" >&2
        ;;
    *)
        echo "prunekit: FAILED with exit code $status (a bug in prunekit: please report the traceback above)" >&2
        ;;
esac
exit "$status"
