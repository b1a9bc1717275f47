#!/usr/bin/env bash
# Every figure in the README, on the embedded default model, in one go (about 10 minutes on
# 2 CPU cores). Each step's wall time is appended to $OUT/timings.txt.
#
#     bash scripts/reproduce_readme.sh [OUT]      # default OUT=runs/readme
set -euo pipefail
OUT=${1:-runs/readme}
mkdir -p "$OUT/edits"
: > "$OUT/timings.txt"
step() {
  local s=$SECONDS
  "$@"
  echo "$((SECONDS - s)) s  $*" | tee -a "$OUT/timings.txt"
}
A="$OUT/attribute"
step headsteer eval --qtype all --limit 10000 --metrics accuracy --batch-size 128 --out "$OUT/eval_full_test"
step headsteer attribute --out "$A"
step headsteer eval --mode open --qtype all --limit 500 --metrics accuracy --out "$OUT/eval_open"
step headsteer attribute --alpha 0.3 --out "$OUT/attribute_a0.3"
# the paper's yardstick: faithfulness/completeness curves and heads needed, per baseline and per ablation rate
step headsteer attribute --baseline zero --out "$OUT/attribute_zero"
step headsteer attribute --baseline blank --out "$OUT/attribute_blank"
step headsteer attribute --alpha 0.1,0.5,0.9 --out "$OUT/attribute_rates"
step python -c "
import sys
from headsteer.attribution.report import agreement
from headsteer.files import write_json
out = sys.argv[1]
res = {f'mean vs {b}': agreement(f'{out}/attribute', f'{out}/attribute_{b}') for b in ('zero', 'blank')}
res['zero vs blank'] = agreement(f'{out}/attribute_zero', f'{out}/attribute_blank')
write_json(f'{out}/baseline_agreement.json', res)
for k, v in res.items():
    print(f\"{k}: top {v['top_n']} overlap {v['overlap']} (Jaccard {v['jaccard']:.2f}), rank Spearman {v['rank_spearman']:.3f}\")
" "$OUT"
step headsteer flow --from-attribution "$A" --top-k 4 --out "$OUT/flow"
step headsteer flow --from-attribution "$A" --top-k 4 --measure logit_diff --out "$OUT/flow_logit"
step headsteer flow --window 2 --measure logit_diff --out "$OUT/flow_logit_w2"
step headsteer flow --window 4 --measure logit_diff --out "$OUT/flow_logit_w4"
step python scripts/bench_attribution.py
step python scripts/edit_experiments.py --out "$OUT/experiments"
step python scripts/edit_experiments.py --top-k 8 --alpha 0.3 --contrast contrast:0.5 --out "$OUT/experiments_k8"
step headsteer edit scale --from-attribution "$A" --top-k 4 --factor 0 --out "$OUT/edits/top4_scale0.json"
step headsteer edit attn --from-attribution "$A" --top-k 4 --alpha 1 --out "$OUT/edits/top4_attn1.json"
step headsteer edit scale --heads random:4 --seed 1 --factor 0 --out "$OUT/edits/random4_scale0.json"
step headsteer edit steer --from-attribution "$A" --top-k 4 --strength 1 --out "$OUT/edits/top4_steer.json"
step headsteer compare --edits "$OUT/edits/top4_scale0.json" "$OUT/edits/top4_attn1.json" \
  "$OUT/edits/random4_scale0.json" "$OUT/edits/top4_steer.json" --attribution "$A" --out "$OUT/compare"
# the same numbers from eval of one edit alone (compare's consistency check)
step headsteer eval --edit "$OUT/edits/top4_attn1.json" --attribution "$A" --out "$OUT/eval_top4_attn1"
