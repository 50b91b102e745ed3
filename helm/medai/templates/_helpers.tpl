{{/* The chart's name, overridable. */}}
{{- define "medai.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Release-scoped prefix of every object: the release name when it already holds the chart's name
(release "medai" → medai-gateway, medai-audit, …), otherwise <release>-medai. Two releases in one
namespace never collide.
*/}}
{{- define "medai.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "medai.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "medai.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Standard labels on every object (root context). */}}
{{- define "medai.labels" -}}
helm.sh/chart: {{ include "medai.chart" . }}
app.kubernetes.io/name: {{ include "medai.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: medai
{{- end -}}

{{/* Selector of one service's pods: dict "root" $ "component" "<service>". */}}
{{- define "medai.selectorLabels" -}}
app.kubernetes.io/name: {{ include "medai.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "medai.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "medai.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* A Secret name that must be set: dict "value" <name> "what" <description>. */}}
{{- define "medai.requiredSecret" -}}
{{- required (printf "%s: a Secret name is required (see k8s/README.md)" .what) .value -}}
{{- end -}}
