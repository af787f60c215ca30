#!/usr/bin/env bash
# The test command: core tests, then the ComfyUI integration tests against every ComfyUI found.
#   COMFYUI_PATH      a ComfyUI checkout (integration tests run in the same pytest as the core tests)
#   COMFYUI_PATH_OLD  optional second ComfyUI (e.g. 0.3.64): integration tests run again against it
# Without COMFYUI_PATH the integration tests are skipped, and the summary says how many.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
status=0

run_pytest() {
  "$py" -m pytest -q "$@"
  local rc=$?
  if [ $rc -eq 5 ]; then echo "pytest collected no tests for: $*"; rc=1; fi   # 5 = nothing collected
  [ $rc -ne 0 ] && status=$rc
}

run_pytest tests
if [ -n "${COMFYUI_PATH_OLD:-}" ]; then
  echo "== integration tests against $COMFYUI_PATH_OLD"
  COMFYUI_PATH=$COMFYUI_PATH_OLD run_pytest tests -k "comfy" -p no:cacheprovider
fi
exit $status
