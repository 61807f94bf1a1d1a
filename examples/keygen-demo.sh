#!/usr/bin/env bash
# The seed's scenario on one machine: a coordinator on a fresh data dir, queue
# `keygen` with 100 items, and a work-queue Job of 5 workq-worker "pods" (run by
# `queue-cli job run`, the local stand-in for a Kubernetes Job) generating one RSA key
# per item until the queue is drained. A live progress bar, then a summary. Everything
# it starts is stopped when it ends, or on Ctrl-C.
#
#   examples/keygen-demo.sh                    # 100 items, 5 pods, 2048-bit keys
#   BITS=4096 examples/keygen-demo.sh          # kuard's key size (~1.6 s of CPU a key)
#   ITEMS=1000 PODS=8 examples/keygen-demo.sh
#
# 2048-bit keys keep the demo well under a minute on 2 cores; the worker's default (and
# kuard's) is 4096. Builds in the debug profile: the RSA crates are optimised even there.
set -euo pipefail

ITEMS=${ITEMS:-100}
PODS=${PODS:-5}
BITS=${BITS:-2048}

cd "$(dirname "$0")/.."
echo "building workq (the first build takes a few minutes)..."
cargo build -q -p workq-coordinator -p workq-worker -p workq-cli
bin="$PWD/${CARGO_TARGET_DIR:-target}/debug"
export PATH="$bin:$PATH"

work=$(mktemp -d -t workq-demo.XXXXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

workq-coordinator --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 \
    --data-dir "$work/data" --addr-file "$work/addr.json" >"$work/coordinator.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/addr.json" ] && break; sleep 0.1; done
[ -s "$work/addr.json" ] || { echo "coordinator did not start:"; cat "$work/coordinator.log"; exit 1; }
grpc=$(sed -E 's/.*"grpc":"([^"]+)".*/\1/' "$work/addr.json")
http=$(sed -E 's/.*"http":"([^"]+)".*/\1/' "$work/addr.json")
export WORKQ_SERVER="http://$grpc"
echo "coordinator: gRPC $WORKQ_SERVER, dashboard http://$http/"

queue-cli create keygen
queue-cli enqueue keygen --count "$ITEMS" --payload 'work-item-{i}' --seal

start=$(date +%s%N)
# The work-queue Job: parallelism set, completions unset. Each pod's output goes to
# $work/logs/<pod>.log; the Job's own summary to $work/job.txt.
queue-cli job run consumers --parallelism "$PODS" --logs-dir "$work/logs" \
    -- workq-worker --queue keygen keygen --bits "$BITS" >"$work/job.txt" 2>&1 &
job=$!
pids+=("$job")
echo "$PODS pods generating $ITEMS RSA-$BITS keys..."
queue-cli watch keygen
job_code=0
wait "$job" || job_code=$?
end=$(date +%s%N)

echo
sed -n '/^NAME/,$p' "$work/job.txt"
stats=$(queue-cli stats keygen -o json)
field() { echo "$stats" | sed -nE "s/^ *\"$1\": ([0-9]+),?$/\1/p"; }
completed=$(field total_completed)
deliveries=$(field total_deliveries)
dead=$(field dead)
keys=$(cat "$work"/logs/*.log | grep -c "Item done: SHA256:" || true)
unique=$(cat "$work"/logs/*.log | grep -o "SHA256:[A-Za-z0-9+/]*" | sort -u | wc -l)
wall_ms=$(( (end - start) / 1000000 ))
echo
echo "summary"
echo "  items:       $completed of $ITEMS completed, $dead dead"
echo "  keys:        $keys generated ($unique distinct fingerprints), RSA-$BITS"
echo "  keys/s:      $(awk -v k="$completed" -v ms="$wall_ms" 'BEGIN { printf "%.1f", k * 1000 / ms }')"
echo "  deliveries:  $deliveries"
echo "  duplicates:  $(( deliveries - completed )) (deliveries beyond one per completed item)"
echo "  wall time:   $(awk -v ms="$wall_ms" 'BEGIN { printf "%.1fs", ms / 1000 }')"
echo "  job:         exit $job_code"
[ "$job_code" = 0 ] && [ "$completed" = "$ITEMS" ]
