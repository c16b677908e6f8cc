{{/*
Names are truncated to 63 characters (the DNS label limit) and never end in "-".
*/}}
{{- define "selflearn.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "selflearn.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "selflearn.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every resource. */}}
{{- define "selflearn.labels" -}}
helm.sh/chart: {{ include "selflearn.chart" . }}
{{ include "selflearn.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "selflearn.selectorLabels" -}}
app.kubernetes.io/name: {{ include "selflearn.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "selflearn.operatorSelectorLabels" -}}
{{ include "selflearn.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "selflearn.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "selflearn.fullname" .) .Values.serviceAccount.name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "selflearn.operatorImage" -}}
{{- printf "%s:%s" .Values.operator.image.repository (default .Chart.AppVersion .Values.operator.image.tag) }}
{{- end }}

{{- define "selflearn.peeringName" -}}
{{- default (include "selflearn.fullname" .) .Values.operator.peering.name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The operator's permissions: exactly selflearn.operator.rbac.RULES (tests/test_chart.py compares the
rendered ClusterRole with that list), with Secrets behind rbac.readSecrets.
*/}}
{{- define "selflearn.operatorRules" -}}
# Its own resource (Kopf watches it and patches annotations and finalizers) and its status.
- apiGroups: ["selflearn.dev"]
  resources: ["learnerruns"]
  verbs: ["list", "watch", "patch"]
- apiGroups: ["selflearn.dev"]
  resources: ["learnerruns/status"]
  verbs: ["patch"]
# One trainer Job per round: indexed, created, read back on a name clash, old ones pruned.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "delete"]
# A finished Job's pods carry the trainer's termination message.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
# The run config ConfigMap, owned by the LearnerRun.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["create", "patch"]
# Serving: the RayService (KubeRay) and the Ingress.
- apiGroups: ["ray.io"]
  resources: ["rayservices"]
  verbs: ["list", "watch", "create", "patch", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["ingresses"]
  verbs: ["create", "patch", "delete"]
{{- if .Values.rbac.readSecrets }}
# The run's storage Secret: checked before each round (status names it when missing).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end }}
# Events on LearnerRuns.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# Kopf: discovering resources, namespaces, and peering between replicas.
{{ include "selflearn.clusterRules" . }}
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings", "kopfpeerings"]
  verbs: ["list", "watch", "patch"]
{{- end }}

{{/* Cluster-scoped reads Kopf needs in every mode (bound cluster-wide even when watching some namespaces). */}}
{{- define "selflearn.clusterRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}

{{/*
KubeRay is a prerequisite. On a live install/upgrade (the API server's own `kubernetes` Service can be looked up, which
`helm template` and `helm lint` cannot do) fail early when ray.io/v1 RayService is not served.
*/}}
{{- define "selflearn.requireKubeRay" -}}
{{- if and .Values.kuberay.requireCRD (not (index .Values "kuberay-operator" "enabled")) }}
{{- $live := lookup "v1" "Service" "default" "kubernetes" }}
{{- if and $live (not (.Capabilities.APIVersions.Has "ray.io/v1/RayService")) }}
{{- fail "KubeRay is a prerequisite: this cluster does not serve ray.io/v1 RayService. Install it first (helm install kuberay-operator kuberay/kuberay-operator, see docs/helm.md), or set kuberay.requireCRD=false to install the operator anyway." }}
{{- end }}
{{- end }}
{{- end }}
