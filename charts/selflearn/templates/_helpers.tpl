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
# Its own resource and status.
- apiGroups: ["selflearn.dev"]
  resources: ["learnerruns"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["selflearn.dev"]
  resources: ["learnerruns/status"]
  verbs: ["get", "patch", "update"]
# One trainer Job per round; the pod is read for its termination message.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
# The round's run config travels in a ConfigMap owned by the LearnerRun.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "create", "patch", "delete"]
# Serving: the RayService (KubeRay), its ingress Service and the Ingress.
- apiGroups: ["ray.io"]
  resources: ["rayservices"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "create", "patch", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["ingresses"]
  verbs: ["get", "list", "create", "patch", "delete"]
{{- if .Values.rbac.readSecrets }}
# Only to check that a LearnerRun's storage.credentialsSecret exists (status names it when it does not).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end }}
# Events on LearnerRuns.
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
# Kopf: discovering resources, namespaces, and peering between replicas.
{{ include "selflearn.clusterRules" . }}
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings", "kopfpeerings"]
  verbs: ["get", "list", "watch", "patch", "create"]
{{- end }}

{{/* Cluster-scoped reads Kopf needs in every mode (bound cluster-wide even when watching some namespaces). */}}
{{- define "selflearn.clusterRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["get", "list", "watch"]
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
