{{/* Chart name, overridable. */}}
{{- define "lvo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name; the release name alone when it already contains the chart name. */}}
{{- define "lvo.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 42 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 42 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 42 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "lvo.controller" -}}{{ include "lvo.fullname" . }}-controller{{- end }}
{{- define "lvo.agent" -}}{{ include "lvo.fullname" . }}-agent{{- end }}

{{/* Shared with the operator's code (libvirt_operator.api.meta). */}}
{{- define "lvo.nodeLabel" -}}virt.libvirt-operator.io/node{{- end }}
{{- define "lvo.leasePrefix" -}}lvo-agent-{{- end }}

{{- define "lvo.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "lvo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: libvirt-operator
{{- end }}

{{/* Selector labels of one component: include "lvo.selectorLabels" (list . "agent") */}}
{{- define "lvo.selectorLabels" -}}
{{- $ctx := index . 0 -}}
app.kubernetes.io/name: {{ include "lvo.name" $ctx }}
app.kubernetes.io/instance: {{ $ctx.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "lvo.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* A component's image: include "lvo.componentImage" (list . .Values.controller.image); the
     component's repository and tag default to the global image's. */}}
{{- define "lvo.componentImage" -}}
{{- $ctx := index . 0 -}}{{- $own := index . 1 | default dict -}}
{{ $own.repository | default $ctx.Values.image.repository }}:{{ $own.tag | default $ctx.Values.image.tag | default $ctx.Chart.AppVersion }}
{{- end }}
