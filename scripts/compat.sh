#!/usr/bin/env bash
# The family invariants (tiny models of every family, their real processors, the registry, the precision
# contract, gradients on every layout) against each named transformers version, each in a fresh virtual environment of its own:
#   bash scripts/compat.sh 5.24.0 5.25.0
# prints one line per version: passed/failed/skipped tests and the time. Logs stay in $COMPAT_DIR
# (default: a new temporary folder), named install-VERSION.log and tests-VERSION.log.
# A version outside pyproject's range is installed over the in-range one (pip warns of the conflict).
# What is tested is a snapshot of this checkout's files (tracked and untracked, not ignored) taken at the
# start, so edits made while it runs do not leak into a version's run.
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: bash scripts/compat.sh VERSION [VERSION ...]   (transformers versions, e.g. 5.24.0 5.25.0)"; exit 2; }
work=${COMPAT_DIR:-$(mktemp -d)}
root="$work/src"
rm -rf "$root" && mkdir -p "$root"
git ls-files -z -co --exclude-standard | tar --ignore-failed-read --null -T - -cf - 2>/dev/null | tar -xf - -C "$root"
tests="tests/test_intervene.py tests/test_fastpath.py tests/test_families.py tests/test_refusals.py tests/test_processors.py
       tests/test_cross_attention.py tests/test_precision.py tests/test_gradient.py"
status=0
for v in "$@"; do
  venv="$work/venv-$v"
  rm -rf "$venv"
  if ! { python3 -m venv "$venv" && "$venv/bin/pip" install -q torch==2.13.0 -e "$root[dev]" \
         && "$venv/bin/pip" install -q "transformers==$v"; } > "$work/install-$v.log" 2>&1; then
    echo "transformers $v: install failed (see $work/install-$v.log)"; status=1; continue
  fi
  got=$("$venv/bin/python" -c "import transformers; print(transformers.__version__)")
  start=$(date +%s)
  # shellcheck disable=SC2086
  (cd "$root" && HEADSTEER_CACHE="$work/cache-$v" "$venv/bin/python" -m pytest -q -p no:cacheprovider $tests) > "$work/tests-$v.log" 2>&1
  rc=$?
  line=$(grep -E "^[0-9]+ (passed|failed)|^=+ .*(passed|failed)" "$work/tests-$v.log" | tail -1 | tr -d '=' | sed 's/^ *//; s/ *$//')
  echo "transformers $got: ${line:-no summary (see $work/tests-$v.log)} [$(( $(date +%s) - start )) s of tests]"
  [ $rc -eq 0 ] || status=1
done
echo "logs: $work"
exit $status
