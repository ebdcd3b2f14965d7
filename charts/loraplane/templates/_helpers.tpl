{{/* Names, labels and images shared by the templates. */}}

{{- define "loraplane.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "loraplane.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The operator's objects: `<fullname>-operator`. */}}
{{- define "loraplane.operator.fullname" -}}
{{- printf "%s-operator" (include "loraplane.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "loraplane.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "loraplane.operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "loraplane.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object of the release. */}}
{{- define "loraplane.labels" -}}
helm.sh/chart: {{ include "loraplane.chart" . }}
app.kubernetes.io/part-of: loraplane
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The operator's selector labels; `app.kubernetes.io/name` is also the scrape job name. */}}
{{- define "loraplane.operator.selectorLabels" -}}
app.kubernetes.io/name: loraplane-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "loraplane.operator.labels" -}}
{{ include "loraplane.labels" . }}
{{ include "loraplane.operator.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* `repository:tag` or `repository@digest` of an image block. */}}
{{- define "loraplane.image" -}}
{{- $image := index . 0 -}}
{{- $root := index . 1 -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) -}}
{{- end -}}
{{- end -}}

{{/* A duration value (`30s`, `5m`, `500ms`, `1h`, plain seconds) in seconds, as a float. */}}
{{- define "loraplane.seconds" -}}
{{- $s := toString . -}}
{{- if hasSuffix "ms" $s -}}{{- divf (trimSuffix "ms" $s | float64) 1000 -}}
{{- else if hasSuffix "h" $s -}}{{- mulf (trimSuffix "h" $s | float64) 3600 -}}
{{- else if hasSuffix "m" $s -}}{{- mulf (trimSuffix "m" $s | float64) 60 -}}
{{- else -}}{{- trimSuffix "s" $s | float64 -}}
{{- end -}}
{{- end -}}
