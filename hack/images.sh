#!/usr/bin/env bash
# Build both images from the project's Dockerfiles (`make images`).
#
#   hack/images.sh                 real bases (python:3.11-slim, rayproject/ray), pulled from a registry
#   hack/images.sh --local-base    stand-in bases made here (no registry): see below
#   hack/images.sh --bases-only    only make the stand-in bases
#
# Stand-in bases (--local-base, `make images LOCAL_BASE=1`): a Debian bookworm root made by
# debootstrap becomes `selflearn-standin/python:3.11-bookworm`, and on it
# `selflearn-standin/ray:2.60.0-py311` mimics the Ray image (user ray 1000:100, a writable Python
# env on PATH, ray[serve]==2.60.0). The CPU torch wheel the host's pip finds is served to the
# build's TORCH_INDEX_URL from a small index on 127.0.0.1. What only this environment needs (its CA
# bundle for outgoing TLS) goes into the stand-in base, never into the project's images.
#
# Prints one JSON object as its last line: build seconds and image sizes.
# Settings (environment): TRAINER_IMAGE, SERVE_IMAGE, TORCH_INDEX_URL, TORCH_INDEX_PORT, DEBIAN_MIRROR,
# IMAGES_CACHE.
set -euo pipefail
cd "$(dirname "$0")/.."

TRAINER_IMAGE=${TRAINER_IMAGE:-ghcr.io/selflearn/trainer:0.1.0}
SERVE_IMAGE=${SERVE_IMAGE:-ghcr.io/selflearn/serve:0.1.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
IMAGES_CACHE=${IMAGES_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/selflearn/images}
PY_STANDIN=selflearn-standin/python:3.11-bookworm
RAY_STANDIN=selflearn-standin/ray:2.60.0-py311
RAY_VERSION=2.60.0
PIP_PY=${VENV:-.venv}/bin/python
[ -x "$PIP_PY" ] || PIP_PY=python3

LOCAL_BASE=0
BASES_ONLY=0
while (($#)); do
  case $1 in
    --local-base) LOCAL_BASE=1 ;;
    --bases-only) LOCAL_BASE=1 BASES_ONLY=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "images: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

die() { printf 'images: error: %s\n' "$*" >&2; exit 1; }
say() { printf '==> %s\n' "$*" >&2; }
now() { date +%s.%N; }
since() { python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))" "$1" "$(now)"; }

command -v docker >/dev/null || die "no docker command (install Docker, or docker.io on Debian)"
docker info >/dev/null 2>&1 || die "no Docker engine answers (start dockerd, or see hack/docker-engine.sh)"

# The Debian mirror apt already uses here, for debootstrap.
debian_mirror() {
  if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
  local uri
  uri=$(grep -hoE '^URIs: *\S+' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' \
        | grep -v security | head -1 || true)
  [ -n "$uri" ] || uri=$(grep -hoE '^deb +\S+' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | head -1 || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

python_standin() {
  docker image inspect "$PY_STANDIN" >/dev/null 2>&1 && return 0
  command -v debootstrap >/dev/null || die "--local-base needs debootstrap (apt-get install debootstrap)"
  local root tarball="$IMAGES_CACHE/bookworm-python.tar"
  mkdir -p "$IMAGES_CACHE"
  if [ ! -s "$tarball" ]; then
    root=$(mktemp -d "${TMPDIR:-/tmp}/standin-root.XXXXXX")
    say "stand-in python base: debootstrap bookworm from $(debian_mirror)"
    # python3-dev: the headers python:3.11-slim carries, which torch's compiler needs.
    debootstrap --variant=minbase \
      --include=python3,python3-pip,python3-venv,python3-dev,python-is-python3,ca-certificates \
      bookworm "$root" "$(debian_mirror)" >&2
    # This environment's TLS goes through its own CA: the stand-in trusts what the host trusts.
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$root/etc/pip.conf"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    rm -rf "$root"
  fi
  docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' "$tarball" "$PY_STANDIN" >/dev/null
}

ray_standin() {
  docker image inspect "$RAY_STANDIN" >/dev/null 2>&1 && return 0
  say "stand-in ray base: ray[serve]==$RAY_VERSION for user ray (1000:100)"
  docker build --network host -q -t "$RAY_STANDIN" --build-arg "BASE=$PY_STANDIN" \
    --build-arg "RAY_VERSION=$RAY_VERSION" -f hack/standin/ray.Dockerfile hack/standin >/dev/null
}

# A PEP 503 index on 127.0.0.1 with the torch wheel the host's pip resolves and its dependencies.
INDEX_PID=
serve_torch_index() {
  local dir="$IMAGES_CACHE/torch-index" wheels="$IMAGES_CACHE/torch-wheels" port
  if [ ! -f "$dir/.done" ]; then
    say "torch index: pip download torch==2.13.0 (the host's wheel) and its dependencies"
    rm -rf "$dir" "$wheels" && mkdir -p "$wheels"
    # The host's pip, with the host's own index settings (that is where the wheel is found).
    "$PIP_PY" -m pip download -q --only-binary=:all: --dest "$wheels" torch==2.13.0 >&2
    python3 - "$wheels" "$dir" <<'EOF'
import re, sys
from pathlib import Path
wheels, index = Path(sys.argv[1]), Path(sys.argv[2])
for w in sorted(wheels.glob("*.whl")):
    project = re.sub(r"[-_.]+", "-", w.name.split("-")[0]).lower()
    d = index / project
    d.mkdir(parents=True, exist_ok=True)
    (d / w.name).symlink_to(w.resolve())
for d in index.iterdir():
    links = "".join(f'<a href="{f.name}">{f.name}</a>\n' for f in sorted(d.glob("*.whl")))
    (d / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")
(index / ".done").write_text("ok\n")
EOF
  fi
  # A fixed port: the URL is a build arg, and a new value each time would void Docker's layer cache.
  port=${TORCH_INDEX_PORT:-38917}
  if (: <"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then die "port $port is in use (set TORCH_INDEX_PORT)"; fi
  python3 -m http.server --bind 127.0.0.1 --directory "$dir" "$port" >/dev/null 2>&1 &
  INDEX_PID=$!
  for _ in $(seq 50); do curl -fs "http://127.0.0.1:$port/torch/" >/dev/null && break; sleep 0.1; done
  TORCH_INDEX_URL="http://127.0.0.1:$port/"
}
trap '[ -z "$INDEX_PID" ] || kill "$INDEX_PID" 2>/dev/null || true' EXIT

start=$(now)
base_args=()
if ((LOCAL_BASE)); then
  python_standin
  ray_standin
  serve_torch_index
  base_args=(--build-arg "PYTHON_IMAGE=$PY_STANDIN" --build-arg "RAY_IMAGE=$RAY_STANDIN")
fi
bases_s=$(since "$start")
if ((BASES_ONLY)); then printf '{"bases_s": %s}\n' "$bases_s"; exit 0; fi

build() { # NAME DOCKERFILE IMAGE
  local t0
  t0=$(now)
  say "$1 image: $3"
  # BuildKit is not in Debian's engine here; the classic builder needs the host network for 127.0.0.1.
  DOCKER_BUILDKIT=0 docker build --network host -q "${base_args[@]}" \
    --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL" -f "$2" -t "$3" . >&2
  since "$t0"
}
trainer_s=$(build trainer Dockerfile.trainer "$TRAINER_IMAGE")
serve_s=$(build serve Dockerfile.serve "$SERVE_IMAGE")

mb() { docker image inspect -f '{{.Size}}' "$1" | awk '{printf "%d", $1 / 1e6}'; }
printf '{"local_base": %s, "bases_s": %s, "trainer_build_s": %s, "serve_build_s": %s, "trainer_image": "%s", "serve_image": "%s", "trainer_image_mb": %s, "serve_image_mb": %s}\n' \
  "$([ "$LOCAL_BASE" = 1 ] && echo true || echo false)" "$bases_s" "$trainer_s" "$serve_s" \
  "$TRAINER_IMAGE" "$SERVE_IMAGE" "$(mb "$TRAINER_IMAGE")" "$(mb "$SERVE_IMAGE")"
