#!/usr/bin/env bash
# Reruns the paper's Table 3 ablation (baseline, +SFCL, +MHAD, both) and the DAFL and
# DFAD baselines with one teacher and one budget, and prints a markdown table of the
# students' test accuracy (what docs/RESULTS.md records).
#
#   scripts/run-ablation.sh [WORKDIR] [--set key=value ...]   (extra settings apply to every run)
set -euo pipefail
cd "$(dirname "$0")/.."
workdir=${1:-runs}; shift || true
cargo build --release --bin distill >/dev/null 2>&1
bin=target/release/distill
runs=(
  "baseline|dfkd-fgvc|--set distill.mhad=false --set distill.sfcl=false"
  "+SFCL|dfkd-fgvc|--set distill.mhad=false"
  "+MHAD|dfkd-fgvc|--set distill.sfcl=false"
  "DFKD-FGVC (both)|dfkd-fgvc|"
  "DAFL|dafl|"
  "DFAD|dfad|"
)
echo "| run | student top-1 % | top-5 % | agreement % | seconds |"
echo "|---|---|---|---|---|"
for r in "${runs[@]}"; do
  IFS='|' read -r label method sets <<<"$r"
  name="ablation-$(echo "$label" | tr -cd 'A-Za-z0-9+-' | tr '+' 'p')"
  # --overwrite: a rerun replaces the earlier run of the same name (a new run refuses to)
  # shellcheck disable=SC2086
  $bin distill --workdir "$workdir" --run "$name" --overwrite --method "$method" $sets "$@" >/dev/null 2>&1
  final=$(grep '"phase":"final"' "$workdir/$name/metrics.jsonl" | tail -1)
  get() { echo "$final" | grep -o "\"$1\":[0-9.]*" | head -1 | cut -d: -f2; }
  printf "| %s | %.2f | %.2f | %.2f | %.0f |\n" "$label" "$(get student_top1)" "$(get student_top5)" "$(get agreement)" "$(get seconds)"
done
teacher=$(grep -o '"teacher_top1":[0-9.]*' "$workdir/$name/metrics.jsonl" | tail -1 | cut -d: -f2)
echo
echo "teacher top-1: $teacher %"
