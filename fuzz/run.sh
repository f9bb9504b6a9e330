#!/usr/bin/env bash
# Runs fuzz targets under libFuzzer, one after another, each for RUNS executions (default 10
# million) or MAX_TIME seconds if set and reached first, and prints one line per target:
# executions, seconds, exec/s, outcome. Needs
# cargo-fuzz (`cargo install cargo-fuzz`); works on the stable toolchain without a sanitizer.
#
#   fuzz/run.sh                      # every target
#   RUNS=100000 fuzz/run.sh client_frame bus_decode
#   MAX_TIME=600 SKIP_BUILD=1 fuzz/run.sh pack_mutated
#
# New inputs go to fuzz/corpus/<target>/ (seeded from fuzz/seeds/<target>/), crashes to
# fuzz/artifacts/<target>/, libFuzzer's log to fuzz/logs/<target>.log (all ignored by git).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RUNS="${RUNS:-10000000}"
MAX_TIME="${MAX_TIME:-0}"
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
    mapfile -t TARGETS < <(ls fuzz/fuzz_targets | sed 's/\.rs$//')
fi
# cargo-fuzz passes no -Z flag with `-s none`; RUSTC_BOOTSTRAP only keeps older cargo-fuzz
# versions, which always asked for one, working on stable.
export RUSTC_BOOTSTRAP=1
# SKIP_BUILD=1 runs the binaries already built (a rebuild follows every edit of the workspace).
[ -n "${SKIP_BUILD:-}" ] || cargo fuzz build -s none -a
mkdir -p fuzz/logs
for t in "${TARGETS[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    start=$(date +%s)
    outcome=ok
    fuzz/target/x86_64-unknown-linux-gnu/release/"$t" "fuzz/corpus/$t" "fuzz/seeds/$t" \
        -runs="$RUNS" -max_total_time="$MAX_TIME" -print_final_stats=1 -artifact_prefix="fuzz/artifacts/$t/" \
        >"fuzz/logs/$t.log" 2>&1 || outcome="CRASH (see fuzz/artifacts/$t/)"
    secs=$(( $(date +%s) - start ))
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "fuzz/logs/$t.log" | grep -o '[0-9]*$' || echo 0)
    printf '%s\t%s\t%ss\t%s/s\t%s\n' "$t" "$execs" "$secs" "$(( execs / (secs > 0 ? secs : 1) ))" "$outcome"
done
