{{- define "medai.labels" -}}
app.kubernetes.io/part-of: medai
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

