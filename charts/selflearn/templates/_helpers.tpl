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
The operator's permissions: exactly selflearn.operator.rbac.RULES, read from files/rbac-rules.yaml, which
is generated from that list (`python hack/generate-manifests.py`; tests/test_chart.py fails when it is stale).
A grant with `onlyWith` is left out when that value under `rbac:` is false (Secrets: rbac.readSecrets).
*/}}
{{- define "selflearn.operatorRules" -}}
{{- $rules := list }}
{{- range (.Files.Get "files/rbac-rules.yaml" | fromYaml).grants }}
{{- if or (not .onlyWith) (index $.Values.rbac .onlyWith) }}
{{- $rules = append $rules .rule }}
{{- end }}
{{- end }}
{{- toYaml $rules }}
{{- end }}

{{/* Cluster-scoped reads Kopf needs in every mode (bound cluster-wide even when watching some namespaces). */}}
{{- define "selflearn.clusterRules" -}}
{{- $rules := list }}
{{- range (.Files.Get "files/rbac-rules.yaml" | fromYaml).grants }}
{{- if .clusterWide }}
{{- $rules = append $rules .rule }}
{{- end }}
{{- end }}
{{- toYaml $rules }}
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
