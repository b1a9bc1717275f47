#!/usr/bin/env bash
# lmms-eval in the loop: does lmms-eval 0.7.3 (its llava_hf model) score a model as `headsteer eval
# --mode open` does? Exports the first N questions with `headsteer export-task`, runs lmms-eval on them
# (--log_samples) and `headsteer eval --mode open --metrics accuracy` on the same questions, and prints
# both accuracies and the per-question agreement (docs/lmms_eval.md explains the figures).
#
#   bash scripts/lmms_eval_check.sh                # the embedded default model
#   bash scripts/lmms_eval_check.sh /tmp/ckpt      # an exported checkpoint (`headsteer export`): headsteer's side
#                                                  # is then `headsteer eval --model $BASE_MODEL --edit EDIT`, the edit it
#                                                  # was exported from (EDIT=e.json; for a scale edit read from the checkpoint)
#
# Environment: EDIT (the manifest an exported checkpoint was made from), N (questions, default 300), DATA (default easy-vqa:test), QTYPE (default all),
# MAX_NEW_TOKENS (lmms-eval's generation length, default 16), BASE_MODEL (the model an exported edit was made on,
# default "default"), DEVICE (default cpu), PYTHON (the python with headsteer installed from this checkout,
# default python3), WORK (outputs, default a new temporary folder), LMMS_VENV (a virtual environment to make or
# reuse for lmms-eval, default $WORK/venv).
#
# headsteer eval --mode open generates as many tokens as the model's generation config says (the embedded model:
# 1). When MAX_NEW_TOKENS differs, lmms-eval also runs at that length, so that one comparison is like for like.
#
# lmms-eval's environment, as installed here (each step was needed on lmms-eval 0.7.3 + transformers 5.25,
# CPU torch 2.13.0; docs/lmms_eval.md):
#   - torch pinned (torch==2.13.0: an unpinned one pulls the CUDA build) and transformers pinned to headsteer's;
#   - torchvision uninstalled: pip takes the PyPI torchvision 0.28.0 (a CUDA build), and importing transformers'
#     image utilities then fails with "operator torchvision::nms does not exist"; llava_hf does not need it, and
#     without it transformers uses the same (PIL) image processor as a headsteer install without torchvision;
#   - decord: lmms-eval's llava_hf imports it and does not declare it;
#   - filelock<4: lmms-eval's evaluator imports filelock._api, which filelock 4 removed;
#   - model_args device_map=cpu: llava_hf's default device_map "" is refused by transformers 5; the device is
#     given once, by --device (model_args device=... as well is a "multiple values" error).
# lmms-eval exits 0 after an error: a run counts only if its samples file exists.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
N=${N:-300}
DATA=${DATA:-easy-vqa:test}
QTYPE=${QTYPE:-all}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-16}
BASE_MODEL=${BASE_MODEL:-default}
DEVICE=${DEVICE:-cpu}
WORK=${WORK:-$(mktemp -d -t lmms-check.XXXXXX)}
LMMS_VENV=${LMMS_VENV:-$WORK/venv}
MODEL=${1:-default}
TASK=headsteer_lmms_check
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)

"$PY" -c "import sys; sys.path.insert(0, 'scripts'); import _checkout" || exit 1
now() { date +%s; }
log() { echo "[$(date +%H:%M:%S)] $*"; }
echo "load before: $(uptime)"
t0=$(now)

# --- the model on each side ---
if [ "$MODEL" = default ]; then
  MODEL_PATH=$("$PY" -c "from headsteer import default_model_path; print(default_model_path())") || exit 1
else
  MODEL_PATH=$(cd "$MODEL" && pwd) || { echo "error: model directory not found: $MODEL"; exit 1; }
fi
HS_ARGS=(--model "$MODEL_PATH")
HS_MODEL_PATH=$MODEL_PATH
if [ -f "$MODEL_PATH/headsteer_edit.json" ]; then
  baked=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1])).get('baked'))" "$MODEL_PATH/headsteer_edit.json")
  if [ "$baked" != True ]; then
    echo "error: $MODEL_PATH holds an edit that is not in its weights (baked: $baked): lmms-eval's llava_hf loads the"
    echo "plain weights and would evaluate the unedited model; only edits baked into the weights reach lmms-eval"
    exit 1
  fi
  # the checkpoint's own manifest says baked (its weights carry the edit): on the base model it would change
  # nothing, and headsteer refuses it there. Use the manifest it was exported from (EDIT=...), or for a scale
  # edit (numbers only) an unbaked copy of the checkpoint's manifest.
  if [ -n "${EDIT:-}" ]; then
    HS_EDIT=$EDIT
  else
    HS_EDIT="$WORK/edit-from-checkpoint.json"
    "$PY" - "$MODEL_PATH/headsteer_edit.json" "$HS_EDIT" <<'EOF' || exit 1
import sys
from headsteer.edit import EditManifest
m = EditManifest.load(sys.argv[1])
if m.kind != "scale":
    sys.exit(f"error: a {m.kind} checkpoint: give the edit manifest it was exported from as EDIT=... (its tensors and "
             "adapter files live beside that manifest)")
m.baked = False
m.provenance.pop("checkpoint_files", None)
m.save(sys.argv[2])
EOF
  fi
  HS_ARGS=(--model "$BASE_MODEL" --edit "$HS_EDIT")
  if [ "$BASE_MODEL" = default ]; then
    HS_MODEL_PATH=$("$PY" -c "from headsteer import default_model_path; print(default_model_path())")
  else
    HS_MODEL_PATH=$BASE_MODEL
  fi
fi
# headsteer eval --mode open's generation length (headsteer.eval.accuracy.predict_open's rule)
HS_TOKENS=$("$PY" - "$HS_MODEL_PATH" <<'EOF'
import sys
from transformers import GenerationConfig
from headsteer.eval.accuracy import OPEN_FALLBACK_TOKENS
try:
    gc = GenerationConfig.from_pretrained(sys.argv[1])
except OSError:
    gc = None
print(getattr(gc, "max_new_tokens", None) or OPEN_FALLBACK_TOKENS)
EOF
) || exit 1
log "lmms-eval model: $MODEL_PATH; headsteer eval: ${HS_ARGS[*]} (generates $HS_TOKENS token(s)); work: $WORK"

# --- lmms-eval's environment ---
s=$(now)
if ! "$LMMS_VENV/bin/python" -c "import lmms_eval" 2>/dev/null; then
  TF=$("$PY" -c "import transformers; print(transformers.__version__)")
  log "installing lmms-eval 0.7.3 (transformers $TF) into $LMMS_VENV (log: $WORK/install.log)"
  { python3 -m venv "$LMMS_VENV" \
    && "$LMMS_VENV/bin/pip" install "${LMMS_TORCH:-torch==2.13.0}" "transformers==$TF" lmms-eval==0.7.3 decord "filelock<4"; } \
    > "$WORK/install.log" 2>&1 || { echo "error: install failed (see $WORK/install.log)"; exit 1; }
else
  "$LMMS_VENV/bin/pip" install -q decord "filelock<4" >> "$WORK/install.log" 2>&1 \
    || { echo "error: install failed (see $WORK/install.log)"; exit 1; }
fi
if ! "$LMMS_VENV/bin/python" -c "import torchvision" >/dev/null 2>&1 && "$LMMS_VENV/bin/pip" show -q torchvision >/dev/null 2>&1; then
  log "torchvision does not import with this torch (a CUDA build): uninstalling it"
  "$LMMS_VENV/bin/pip" uninstall -y -q torchvision >> "$WORK/install.log" 2>&1
fi
log "lmms-eval environment ready ($(( $(now) - s )) s): $("$LMMS_VENV/bin/python" -c "import lmms_eval, importlib.metadata as m, \
transformers, torch; print('lmms-eval', m.version('lmms_eval'), 'transformers', transformers.__version__, 'torch', torch.__version__)")"
proc_class='import sys; from transformers import AutoProcessor; print(type(AutoProcessor.from_pretrained(sys.argv[1]).image_processor).__name__)'
ip_lmms=$("$LMMS_VENV/bin/python" -c "$proc_class" "$MODEL_PATH" 2>/dev/null)
ip_hs=$("$PY" -c "$proc_class" "$HS_MODEL_PATH" 2>/dev/null)
log "image processor: lmms-eval side $ip_lmms, headsteer side $ip_hs"
[ "$ip_lmms" = "$ip_hs" ] || echo "WARNING: the two sides preprocess images with different classes: answers may differ"

# --- the questions, as files and an lmms-eval task ---
s=$(now)
"$PY" -m headsteer -q export-task --data "$DATA" --qtype "$QTYPE" --limit "$N" --name "$TASK" \
  --max-new-tokens "$MAX_NEW_TOKENS" --out "$WORK/task" --force || exit 1
log "export-task: $(( $(now) - s )) s"

# --- headsteer eval on the same questions ---
s=$(now)
"$PY" -m headsteer -q eval "${HS_ARGS[@]}" --data "$DATA" --qtype "$QTYPE" --limit "$N" --mode open \
  --metrics accuracy --out "$WORK/headsteer-eval" --force > "$WORK/headsteer-eval.txt" 2>&1 \
  || { cat "$WORK/headsteer-eval.txt"; exit 1; }
log "headsteer eval --mode open: $(( $(now) - s )) s"

# --- lmms-eval, then the comparison ---
run_lmms() {  # $1: max_new_tokens
  local out s
  out="$WORK/lmms-mnt$1-$(date +%Y%m%d-%H%M%S)"  # a new folder per run: nothing is deleted
  s=$(now)
  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_DATASETS_CACHE="$WORK/hf_datasets" \
    "$LMMS_VENV/bin/python" -m lmms_eval --model llava_hf --model_args "pretrained=$MODEL_PATH,device_map=$DEVICE" \
    --device "$DEVICE" --batch_size 1 --include_path "$WORK/task/tasks" --tasks "$TASK" --gen_kwargs "max_new_tokens=$1" \
    --log_samples --output_path "$out" > "$out.log" 2>&1
  if ! ls "$out"/*/*_samples_"$TASK".jsonl >/dev/null 2>&1; then
    echo "error: lmms-eval wrote no samples (max_new_tokens=$1); the end of its log ($out.log):"; tail -20 "$out.log"; exit 1
  fi
  log "lmms-eval, max_new_tokens=$1: $(( $(now) - s )) s"
  "$PY" scripts/lmms_eval_compare.py --task-dir "$WORK/task" --lmms-out "$out" --eval-out "$WORK/headsteer-eval" \
    --task "$TASK" --label "lmms-eval max_new_tokens=$1 vs headsteer eval --mode open ($HS_TOKENS token(s))" \
    --json "$WORK/compare-mnt$1.json" | tee "$WORK/compare-mnt$1.md"
}
run_lmms "$MAX_NEW_TOKENS"
[ "$HS_TOKENS" = "$MAX_NEW_TOKENS" ] || run_lmms "$HS_TOKENS"

echo "total: $(( $(now) - t0 )) s; load after: $(uptime)"
echo "outputs: $WORK (task/, headsteer-eval/, lmms-mnt*/ and their logs, compare-mnt*.json/.md, install.log)"
