#!/usr/bin/env bash
# End-to-end on a throwaway kind cluster, on a laptop with Docker:
#
#   1. create a kind cluster (port 80 of its node on localhost:$HTTP_PORT, for the Ingress)
#   2. helm-install ingress-nginx, KubeRay and an S3 server (MinIO, Service "minio" in $NAMESPACE,
#      where examples/learnerrun-tiny.yaml expects it: http://minio:9000)
#   3. build the trainer and serve images (CPU torch) and `kind load` them
#   4. helm-install charts/selflearn (the operator runs from the trainer image)
#   5. create the S3 bucket and the credentials Secret that examples/learnerrun-tiny.yaml names
#   6. apply examples/learnerrun-tiny.yaml (embedded model, offline snapshot, CPU)
#   7. wait until round 1 is promoted (`kubectl get lr`)
#   8. POST /chat through the Ingress and print the answer and the checkpoint that gave it
#   9. delete the cluster on exit, whatever happened (--keep leaves it running)
#
# Usage: hack/kind-e2e.sh [--dry-run] [--keep] [--name CLUSTER]
#   --dry-run  print every command instead of running it (needs none of the tools)
#   --keep     leave the cluster running at the end (delete it with: kind delete cluster --name NAME)
# Needs: docker, kind, kubectl, helm, curl, python3; about 6 CPUs, 12 GiB of memory for Docker and
# 20 GB of disk. Takes 20-40 minutes, most of it building images and the first training round.
# Settings (environment): CLUSTER_NAME, HTTP_PORT, NAMESPACE, TIMEOUT_SECONDS, KIND_NODE_IMAGE,
# KUBERAY_VERSION, MINIO_CHART_VERSION, INGRESS_NGINX_VERSION, TRAINER_IMAGE, SERVE_IMAGE,
# TORCH_INDEX_URL, EXAMPLE.
set -euo pipefail

cd "$(dirname "$0")/.."

CLUSTER_NAME=${CLUSTER_NAME:-selflearn-e2e}
HTTP_PORT=${HTTP_PORT:-8088}
NAMESPACE=${NAMESPACE:-default}
TIMEOUT_SECONDS=${TIMEOUT_SECONDS:-2400}
KIND_NODE_IMAGE=${KIND_NODE_IMAGE:-kindest/node:v1.33.1}
KUBERAY_VERSION=${KUBERAY_VERSION:-1.4.2}
MINIO_CHART_VERSION=${MINIO_CHART_VERSION:-5.4.0}
INGRESS_NGINX_VERSION=${INGRESS_NGINX_VERSION:-4.12.1}
# The chart's and the CRD's default images: the operator and the example run use them unchanged.
TRAINER_IMAGE=${TRAINER_IMAGE:-ghcr.io/selflearn/trainer:0.1.0}
SERVE_IMAGE=${SERVE_IMAGE:-ghcr.io/selflearn/serve:0.1.0}
# CPU-only torch keeps the images a few GB smaller; kind has no GPU anyway.
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
EXAMPLE=${EXAMPLE:-examples/learnerrun-tiny.yaml}
MINIO_USER=selflearn
MINIO_PASSWORD=${MINIO_PASSWORD:-selflearn-e2e-$RANDOM$RANDOM}
RELEASE=selflearn

DRY_RUN=0
KEEP=0
while (($#)); do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --keep) KEEP=1 ;;
    --name) CLUSTER_NAME=${2:?--name needs a value}; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "kind-e2e: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

KCTX=kind-$CLUSTER_NAME
WORK=$(mktemp -d "${TMPDIR:-/tmp}/selflearn-e2e.XXXXXX")
exec 3>&1 # commands are echoed on fd 3, so that $(capture ...) keeps only their output

say() { printf '\n==> %s\n' "$*" >&3; }
die() { printf 'kind-e2e: error: %s\n' "$*" >&2; exit 1; }
show() {
  local word line='+'
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then line+=" $word"; else line+=" '${word//\'/\'\\\'\'}'"; fi
  done
  printf '%s\n' "$line" >&3
}
# run CMD...: echo it, then run it (unless --dry-run).
run() {
  show "$@"
  if ((DRY_RUN)); then return 0; fi
  "$@"
}
# capture DRY_VALUE CMD...: echo CMD and print its output; under --dry-run print DRY_VALUE instead.
capture() {
  local dry_value=$1
  shift
  show "$@"
  if ((DRY_RUN)); then printf '%s\n' "$dry_value"; return 0; fi
  "$@"
}
k() { run kubectl --context "$KCTX" "$@"; }
kcap() { local v=$1; shift; capture "$v" kubectl --context "$KCTX" "$@"; }

# shellcheck disable=SC2317,SC2329 # invoked by the EXIT trap
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if ((rc != 0)) && ((!DRY_RUN)); then
    say "failed (exit $rc): what the cluster looked like"
    kubectl --context "$KCTX" get lr,jobs,pods,rayservices,ingress -A -o wide 2>&1 || true
    kubectl --context "$KCTX" -n "$NAMESPACE" describe lr 2>&1 | tail -n 60 || true
    kubectl --context "$KCTX" -n "$NAMESPACE" logs "deployment/$RELEASE" --tail=80 2>&1 || true
  fi
  if ((KEEP)); then
    say "keeping cluster $CLUSTER_NAME (kind delete cluster --name $CLUSTER_NAME)"
  elif ((CREATED || DRY_RUN)); then
    say "cleaning up"
    run kind delete cluster --name "$CLUSTER_NAME" || true
  fi
  rm -rf "$WORK"
  exit "$rc"
}
CREATED=0 # only a cluster this run created is deleted
trap cleanup EXIT
trap 'exit 130' INT TERM

say "checking tools"
for tool in docker kind kubectl helm curl python3; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    if ((DRY_RUN)); then echo "(dry run: $tool is not installed here)" >&3; else die "$tool is required"; fi
  fi
done
[[ -f $EXAMPLE ]] || ((DRY_RUN)) || die "$EXAMPLE not found"

say "1. kind cluster $CLUSTER_NAME (Ingress on http://localhost:$HTTP_PORT)"
cat >"$WORK/kind.yaml" <<EOF
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
    kubeadmConfigPatches:
      - |
        kind: InitConfiguration
        nodeRegistration:
          kubeletExtraArgs:
            node-labels: "ingress-ready=true"
    extraPortMappings:
      - {containerPort: 80, hostPort: $HTTP_PORT, protocol: TCP}
EOF
if ((DRY_RUN)); then sed 's/^/    /' "$WORK/kind.yaml" >&3; fi
if ((!DRY_RUN)) && kind get clusters 2>/dev/null | grep -qx "$CLUSTER_NAME"; then
  die "a kind cluster named $CLUSTER_NAME exists already: delete it or pass --name"
fi
run kind create cluster --name "$CLUSTER_NAME" --image "$KIND_NODE_IMAGE" --config "$WORK/kind.yaml" --wait 120s
CREATED=1

say "2. ingress-nginx, KubeRay $KUBERAY_VERSION and MinIO"
run helm --kube-context "$KCTX" upgrade --install ingress-nginx ingress-nginx \
  --repo https://kubernetes.github.io/ingress-nginx --version "$INGRESS_NGINX_VERSION" \
  --namespace ingress-nginx --create-namespace \
  --set controller.hostPort.enabled=true --set controller.service.type=NodePort \
  --set-string controller.nodeSelector.ingress-ready=true \
  --set controller.ingressClassResource.default=true --set controller.watchIngressWithoutClass=true \
  --set controller.admissionWebhooks.enabled=false --wait --timeout 5m
run helm --kube-context "$KCTX" upgrade --install kuberay-operator kuberay-operator \
  --repo https://ray-project.github.io/kuberay-helm/ --version "$KUBERAY_VERSION" \
  --namespace kuberay-system --create-namespace --wait --timeout 5m
run helm --kube-context "$KCTX" upgrade --install minio minio \
  --repo https://charts.min.io/ --version "$MINIO_CHART_VERSION" \
  --namespace "$NAMESPACE" --create-namespace \
  --set fullnameOverride=minio --set mode=standalone --set replicas=1 --set persistence.enabled=false \
  --set resources.requests.memory=512Mi --set rootUser="$MINIO_USER" --set rootPassword="$MINIO_PASSWORD" \
  --wait --timeout 5m
MINIO_ENDPOINT=http://minio.$NAMESPACE.svc.cluster.local:9000

say "3. images: $TRAINER_IMAGE and $SERVE_IMAGE (CPU torch), loaded into kind"
run docker build -f Dockerfile.trainer --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL" -t "$TRAINER_IMAGE" .
run docker build -f Dockerfile.serve --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL" -t "$SERVE_IMAGE" .
run kind load docker-image "$TRAINER_IMAGE" "$SERVE_IMAGE" --name "$CLUSTER_NAME"

say "4. the selflearn chart"
run helm --kube-context "$KCTX" upgrade --install "$RELEASE" charts/selflearn --namespace "$NAMESPACE" \
  --set operator.image.repository="${TRAINER_IMAGE%:*}" --set operator.image.tag="${TRAINER_IMAGE##*:}" \
  --set operator.image.pullPolicy=IfNotPresent --set operator.verbose=true --wait --timeout 5m
k -n "$NAMESPACE" rollout status "deployment/$RELEASE" --timeout 180s

say "5. what $EXAMPLE asks for: its name, images, bucket and credentials Secret"
# A server-side dry run returns the LearnerRun as stored, CRD defaults filled in.
read_example() { kcap "$1" -n "$NAMESPACE" create --dry-run=server -f "$EXAMPLE" -o "jsonpath=$2"; }
RUN_NAME=$(read_example tiny '{.metadata.name}')
RUN_TRAINER_IMAGE=$(read_example "$TRAINER_IMAGE" '{.spec.trainer.image}')
RUN_SERVE_IMAGE=$(read_example "$SERVE_IMAGE" '{.spec.serving.image}')
STORAGE_URI=$(read_example s3://selflearn/tiny '{.spec.storage.uri}')
STORAGE_ENDPOINT=$(read_example http://minio:9000 '{.spec.storage.endpoint}')
SECRET=$(read_example s3-creds '{.spec.storage.credentialsSecret}')
CACHE_CLAIM=$(read_example selflearn-trainer-cache '{.spec.trainer.cacheVolumeClaim}')
[[ $STORAGE_URI == s3://* ]] || die "$EXAMPLE: storage.uri must be s3://bucket/prefix, got '$STORAGE_URI'"
[[ -n $SECRET ]] || die "$EXAMPLE: storage.credentialsSecret is not set"
case $STORAGE_ENDPOINT in
  http://minio:9000 | "http://minio.$NAMESPACE:9000" | "http://minio.$NAMESPACE.svc:9000" | "$MINIO_ENDPOINT") ;;
  *) die "$EXAMPLE: storage.endpoint is '$STORAGE_ENDPOINT'; this script's MinIO is $MINIO_ENDPOINT" ;;
esac
BUCKET=${STORAGE_URI#s3://}
BUCKET=${BUCKET%%/*}
# The example may name other images than the ones built: give the built ones those names too.
for pair in "$TRAINER_IMAGE=$RUN_TRAINER_IMAGE" "$SERVE_IMAGE=$RUN_SERVE_IMAGE"; do
  if [[ ${pair%%=*} != "${pair#*=}" ]]; then
    run docker tag "${pair%%=*}" "${pair#*=}"
    run kind load docker-image "${pair#*=}" --name "$CLUSTER_NAME"
  fi
done

k -n "$NAMESPACE" create secret generic "$SECRET" \
  --from-literal=AWS_ACCESS_KEY_ID="$MINIO_USER" --from-literal=AWS_SECRET_ACCESS_KEY="$MINIO_PASSWORD"
# The bucket, created with boto3 from the trainer image (already in the cluster).
k -n "$NAMESPACE" run mkbucket --rm -i --restart=Never --image="$TRAINER_IMAGE" \
  --image-pull-policy=IfNotPresent \
  --env=AWS_ACCESS_KEY_ID="$MINIO_USER" --env=AWS_SECRET_ACCESS_KEY="$MINIO_PASSWORD" --command -- \
  python -c "import boto3; boto3.client('s3', endpoint_url='$MINIO_ENDPOINT', region_name='us-east-1').create_bucket(Bucket='$BUCKET'); print('bucket $BUCKET created')"

say "6. the LearnerRun $RUN_NAME"
if [[ -n $CACHE_CLAIM ]]; then  # the trainer's cache volume (kind's local-path StorageClass provides it)
  [[ $CACHE_CLAIM == selflearn-trainer-cache ]] ||
    die "$EXAMPLE: trainer.cacheVolumeClaim is '$CACHE_CLAIM'; examples/trainer-cache-pvc.yaml makes selflearn-trainer-cache"
  k -n "$NAMESPACE" apply -f examples/trainer-cache-pvc.yaml
fi
k -n "$NAMESPACE" apply -f "$EXAMPLE"

say "7. waiting for round 1 to be promoted (up to ${TIMEOUT_SECONDS}s)"
deadline=$((SECONDS + TIMEOUT_SECONDS))
last_print=-60
while :; do
  result=$(kcap promoted -n "$NAMESPACE" get lr "$RUN_NAME" -o 'jsonpath={.status.history[?(@.round==1)].result}') ||
    result=''
  phase=$(kcap Serving -n "$NAMESPACE" get lr "$RUN_NAME" -o 'jsonpath={.status.phase}') || phase=
  if ((SECONDS - last_print >= 60)) || [[ $result == *promoted* ]]; then
    k -n "$NAMESPACE" get lr "$RUN_NAME"
    last_print=$SECONDS
  fi
  [[ $result == *promoted* ]] && break
  if [[ $result == *rejected* || $result == *empty* ]]; then
    k -n "$NAMESPACE" get lr "$RUN_NAME" -o 'jsonpath={.status.history[0].reason}{"\n"}'
    die "round 1 was not promoted ($result)"
  fi
  if [[ $phase == Failed ]]; then
    k -n "$NAMESPACE" get lr "$RUN_NAME" -o 'jsonpath={.status.message}{"\n"}'
    die "LearnerRun $RUN_NAME failed"
  fi
  ((SECONDS < deadline)) || die "round 1 was not promoted within ${TIMEOUT_SECONDS}s"
  run sleep 15
done
SERVING=$(kcap "$STORAGE_URI/$RUN_NAME/r000001" -n "$NAMESPACE" get lr "$RUN_NAME" \
  -o 'jsonpath={.status.servingCheckpoint}')
echo "round 1 promoted: $SERVING" >&3

say "8. /chat through the Ingress, once the model replicas serve $SERVING"
HOST=$(kcap "" -n "$NAMESPACE" get ingress "$RUN_NAME" -o 'jsonpath={.spec.rules[0].host}')
host_header=()
[[ -z $HOST ]] || host_header=(-H "Host: $HOST")
while :; do
  body=$(capture '{"reply": "(dry run)", "checkpoint": "'"$RUN_NAME"'/r000001"}' \
    curl -sS --max-time 120 ${host_header[@]+"${host_header[@]}"} -H 'Content-Type: application/json' \
    -d '{"message": "What is the capital of France?", "max_length": 48}' \
    "http://127.0.0.1:$HTTP_PORT/chat") || body=''
  served=$(printf '%s' "$body" | python3 -c 'import json, sys
try: print(json.load(sys.stdin).get("checkpoint") or "")
except ValueError: print("")' 2>/dev/null) || served=''
  if [[ -n $served && $SERVING == *"$served" ]] || ((DRY_RUN)); then break; fi
  ((SECONDS < deadline)) || die "/chat did not answer from $SERVING in time (last answer: ${body:-none})"
  run sleep 10
done
printf '%s' "$body" | python3 -c 'import json, sys
d = json.load(sys.stdin)
print("answer:     " + d["reply"].strip())
print("checkpoint: " + str(d["checkpoint"]))' >&3 || printf '%s\n' "$body" >&3

say "end to end: OK"
