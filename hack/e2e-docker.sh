#!/usr/bin/env bash
# The learning loop end to end in real containers: `make e2e-docker` (and the README's test command).
#
#   1. a Docker engine (hack/docker-engine.sh starts one where it can; else a clear skip line, exit 0)
#   2. both images (hack/images.sh; stand-in bases where no registry answers, LOCAL_BASE=auto)
#   3. tests/e2e_docker/scenario.py: moto's S3 server, the operator in the trainer image against
#      kmock's emulator, Jobs run as containers, the serve image's Ray head fed through Ray's REST API
#
# Prints one JSON object as its last line (the figures). Settings: LOCAL_BASE (auto|1|0),
# E2E_DOCKER (0: skip), TRAINER_IMAGE, SERVE_IMAGE, VENV.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
LOCAL_BASE=${LOCAL_BASE:-auto}
if [ "${E2E_DOCKER:-1}" = 0 ]; then echo "e2e-docker: skipped (E2E_DOCKER=0)"; exit 0; fi
if ! bash hack/docker-engine.sh; then
  echo "e2e-docker: SKIPPED: no Docker engine can be started on this machine"
  exit 0
fi
if [ "$LOCAL_BASE" = auto ]; then
  # A registry answers when the real base can be pulled; these machines have none.
  if timeout 30 docker pull -q python:3.11.13-slim-bookworm >/dev/null 2>&1; then LOCAL_BASE=0; else LOCAL_BASE=1; fi
fi
figures=$(mktemp)
start=$(date +%s)
image_args=()
[ "$LOCAL_BASE" = 1 ] && image_args=(--local-base)
bash hack/images.sh "${image_args[@]}" | tail -1 >"$figures"
echo "e2e-docker: images built in $(($(date +%s) - start)) s: $(cat "$figures")"
exec "$VENV/bin/python" -m tests.e2e_docker.scenario --figures "$figures"
