{{/* Names, labels and computed values shared by the templates. */}}

{{- define "troupe.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's prefix for namespaced objects: the release name, plus "troupe" unless it says so. */}}
{{- define "troupe.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "troupe.operatorName" -}}
{{- printf "%s-operator" (include "troupe.fullname" .) -}}
{{- end -}}

{{- define "troupe.leaseName" -}}
{{- default (include "troupe.operatorName" .) .Values.operator.leaderElection.leaseName -}}
{{- end -}}

{{- define "troupe.gatewayName" -}}
{{- printf "%s-gateway" (include "troupe.fullname" .) -}}
{{- end -}}

{{- define "troupe.natsName" -}}
{{- printf "%s-nats" (include "troupe.fullname" .) -}}
{{- end -}}

{{- define "troupe.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/part-of: troupe
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "troupe.operatorSelectorLabels" -}}
app.kubernetes.io/name: troupe-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "troupe.gatewaySelectorLabels" -}}
app.kubernetes.io/name: troupe-gateway
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "troupe.natsSelectorLabels" -}}
app.kubernetes.io/name: troupe-nats
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "troupe.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "troupe.operatorName" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "troupe.operatorImage" -}}
{{- printf "%s:%s" .Values.operator.image.repository (default .Chart.AppVersion .Values.operator.image.tag) -}}
{{- end -}}

{{- define "troupe.runtimeImage" -}}
{{- printf "%s:%s" .Values.runtime.image.repository (default .Chart.AppVersion .Values.runtime.image.tag) -}}
{{- end -}}

{{/* The NATS URL agents get by default: the value, else the bundled NATS, else nats://nats:4222. */}}
{{- define "troupe.natsUrl" -}}
{{- if .Values.nats.url -}}
{{- .Values.nats.url -}}
{{- else if .Values.nats.install.enabled -}}
{{- printf "nats://%s.%s.svc:4222" (include "troupe.natsName" .) .Release.Namespace -}}
{{- else -}}
nats://nats:4222
{{- end -}}
{{- end -}}

{{/* Cluster-scoped names carry the release namespace too: two releases never share one. */}}
{{- define "troupe.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace (include "troupe.fullname" .) | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{/*
What the operator does in each namespace it watches, and nothing more (no wildcards): kopf
watches and patches (finalizers, progress annotations) Agents and Workflows; it creates the
Approvals it mirrors from the approvals buckets and writes their status; the reconciler
reads them, writes their status, server-side applies each agent's and engine's ConfigMap,
ServiceAccount and Deployment (an apply that creates the object needs `create` too), deletes engines' ConfigMaps and Deployments, watches
Deployments for readiness, lists pods to see an engine stopped (and deletes them: the pod
kills of ChaosExperiments), reads the NATS credentials
Secrets Agents name, and kopf posts Events.
*/}}
{{- define "troupe.namespacedRules" -}}
- apiGroups: ["troupe.dev"]
  resources: ["agents", "workflows", "modelproviders", "budgets", "triggers", "chaosexperiments"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["troupe.dev"]
  resources: ["approvals"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["troupe.dev"]
  resources:
    - "agents/status"
    - "workflows/status"
    - "modelproviders/status"
    - "budgets/status"
    - "triggers/status"
    - "approvals/status"
    - "chaosexperiments/status"
  verbs: ["patch"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["get", "create", "patch"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "delete"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# Autoscaling: whether an HPA scales an agent (then the operator never writes its replicas),
# and the ScaledObjects of Agents with autoscale.engine keda.
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["list"]
- apiGroups: ["keda.sh"]
  resources: ["scaledobjects"]
  verbs: ["get", "create", "patch", "delete"]
{{- end -}}

{{- define "troupe.operatorLabels" -}}
{{ include "troupe.labels" . }}
app.kubernetes.io/name: troupe-operator
app.kubernetes.io/component: operator
{{- end -}}

{{- define "troupe.gatewayLabels" -}}
{{ include "troupe.labels" . }}
app.kubernetes.io/name: troupe-gateway
app.kubernetes.io/component: gateway
{{- end -}}

{{- define "troupe.natsLabels" -}}
{{ include "troupe.labels" . }}
app.kubernetes.io/name: troupe-nats
app.kubernetes.io/component: messaging
{{- end -}}
