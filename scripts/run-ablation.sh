#!/usr/bin/env bash
# Reruns the paper's Table 1 (DFKD-FGVC and the eight baselines: DAFL, DFAD, ZSKT, DFQ,
# DeepInversion, ZSKD, MAD, CMI; and the student on real data, the ceiling) and its Table 3 ablation (baseline, +SFCL, +MHAD, both)
# over the same distillation seeds with one teacher and one budget, then prints each
# variant's mean with its 95% interval, the student/teacher ratio, and the paired
# differences from the full method (what docs/RESULTS.md records).
#
#   scripts/run-ablation.sh [WORKDIR] [SEEDS] [--set key=value ...]   (settings apply to every run)
#
# WORKDIR defaults to runs-ablation, SEEDS to 0-4. Each variant is a sweep folder
# WORKDIR/<variant>/ with seed-<k>/ run folders and summary.{json,md}; a killed script
# continues where it stopped (finished seeds are kept). VARIANTS=full,baseline,... runs a
# subset.
set -euo pipefail
cd "$(dirname "$0")/.."
workdir=${1:-runs-ablation}; shift || true
seeds=${1:-0-4}; shift || true
cargo build --release --bin distill >/dev/null 2>&1
bin=target/release/distill
runs=(
  "full|dfkd-fgvc|"
  "baseline|dfkd-fgvc|--set distill.mhad=false --set distill.sfcl=false"
  "sfcl|dfkd-fgvc|--set distill.mhad=false"
  "mhad|dfkd-fgvc|--set distill.sfcl=false"
  "dafl|dafl|"
  "dfad|dfad|"
  "zskt|zskt|"
  "dfq|dfq|"
  "deepinversion|deepinversion|"
  "zskd|zskd|"
  "mad|mad|"
  "cmi|cmi|"
  "real-kd|real-kd|"
)
done_dirs=()
for r in "${runs[@]}"; do
  IFS='|' read -r name method sets <<<"$r"
  if [[ -n "${VARIANTS:-}" && ",$VARIANTS," != *",$name,"* ]]; then continue; fi
  echo "== $name ($method $sets) seeds $seeds" >&2
  # shellcheck disable=SC2086
  $bin distill --workdir "$workdir" --run "$name" --method "$method" --seeds "$seeds" --resume $sets "$@" >/dev/null
  done_dirs+=("$workdir/$name")
done
$bin summarize "${done_dirs[@]}" --json "$workdir/comparison.json"
