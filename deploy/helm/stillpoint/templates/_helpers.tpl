{{/*
Labels every object carries (app.kubernetes.io/* and helm.sh/chart).
managedBy: the plain manifests in deploy/ are rendered with "kubectl".
*/}}
{{- define "stillpoint.commonLabels" -}}
app.kubernetes.io/part-of: stillpoint
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Values.managedBy | default .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{- define "stillpoint.labels" -}}
app.kubernetes.io/name: stillpoint
{{ include "stillpoint.commonLabels" . }}
{{- end }}

{{/*
The controller's objects. Its pods are selected by app.kubernetes.io/name
alone: the agents' NetworkPolicy in other namespaces selects them so.
*/}}
{{- define "stillpoint.controllerLabels" -}}
app.kubernetes.io/name: stillpoint-controller
app.kubernetes.io/component: controller
{{ include "stillpoint.commonLabels" . }}
{{- end }}

{{- define "stillpoint.controllerSelector" -}}
app.kubernetes.io/name: stillpoint-controller
{{- end }}

{{- define "stillpoint.controllerImage" -}}
{{ .Values.image.controller.repository }}:{{ .Values.image.controller.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "stillpoint.agentImage" -}}
{{ .Values.image.agent.repository }}:{{ .Values.image.agent.tag | default .Chart.AppVersion }}
{{- end }}

{{/* The namespace the monitoring objects go to. */}}
{{- define "stillpoint.monitoringNamespace" -}}
{{ .Values.monitoring.namespace | default .Release.Namespace }}
{{- end }}
