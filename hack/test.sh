#!/usr/bin/env bash
# The test tiers (docs/testing.md): `make test` runs `fast`, `make test-all` (CI: .ci/run) runs `all`.
#
#   fast  the tools the suite drives (hack/test-deps.sh), then pytest -m "not full": every unit and
#         integration test, on the real embedded model where behaviour depends on it (< 15 min)
#   full  pytest -m full: multi-round learning and the gate's bad rounds on the real model, feedback rounds
#   all   fast, full, then the loop in real containers (hack/e2e-docker.sh, image builds included) (< 60 min)
#
# Every tier runs even when an earlier one failed (one CI run shows every failure); the exit status
# is non-zero when any did. A table of the tiers' wall times, and the disk left after each (CI's disk is
# shared: a tier once failed on "No space left on device"), ends the output.
# Settings: VENV, PYTEST_ARGS (added to each pytest run), E2E_DOCKER=0 (leave the containers out).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
VENV=${VENV:-.venv}
what=${1:-fast}
case "$what" in fast | full | all) ;; *) echo "usage: hack/test.sh fast|full|all" >&2; exit 2 ;; esac

rows=()
failed=0
free_gb() { df -Pk "${TMPDIR:-/tmp}" | awk 'NR == 2 { printf "%.1f GB free", $4 / 1048576 }'; }
echo "== disk at start: $(free_gb) under ${TMPDIR:-/tmp}"
tier() {  # tier NAME COMMAND...: run it, time it, remember how it ended
  local name=$1 start rc
  shift
  echo "== tier $name: $*"
  start=$(date +%s)
  "$@"
  rc=$?
  rows+=("$(printf '%-6s %6d s  %-16s %s' "$name" $(($(date +%s) - start)) "$([ $rc = 0 ] && echo passed || echo "FAILED (exit $rc)")" "$(free_gb)")")
  [ $rc = 0 ] || failed=1
}

begin=$(date +%s)
tier deps bash hack/test-deps.sh
# shellcheck disable=SC2086  # PYTEST_ARGS is a list of flags
[ "$what" = full ] || tier fast "$VENV/bin/python" -m pytest -m "not full" ${PYTEST_ARGS:-}
# shellcheck disable=SC2086
[ "$what" = fast ] || tier full "$VENV/bin/python" -m pytest -m full ${PYTEST_ARGS:-}
[ "$what" = all ] && tier e2e bash hack/e2e-docker.sh

echo "== tier times"
printf '%s\n' "${rows[@]}"
printf '%-6s %6d s\n' total $(($(date +%s) - begin))
exit $failed
