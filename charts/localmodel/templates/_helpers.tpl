{{/* Name of the chart, or nameOverride. */}}
{{- define "localmodel.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Prefix of every object's name: the release name, unless it already holds the chart name. */}}
{{- define "localmodel.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "localmodel.operatorName" -}}{{ include "localmodel.fullname" . }}-operator{{- end -}}
{{- define "localmodel.agentName" -}}{{ include "localmodel.fullname" . }}-agent{{- end -}}

{{- define "localmodel.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "localmodel.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "localmodel.operatorSelector" -}}
app.kubernetes.io/name: {{ include "localmodel.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "localmodel.agentSelector" -}}
app.kubernetes.io/name: {{ include "localmodel.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node-agent
{{- end -}}

{{/* registry/repository:tag; the tag defaults to the app version (and the agent's flavor). */}}
{{- define "localmodel.image" -}}
{{- $registry := .root.Values.imageRegistry -}}
{{- $tag := .image.tag | default (printf "%s%s" .root.Chart.AppVersion (.suffix | default "")) -}}
{{- if $registry -}}
{{- printf "%s/%s:%s" (trimSuffix "/" $registry) .image.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "localmodel.operatorImage" -}}
{{- include "localmodel.image" (dict "root" . "image" .Values.operator.image) -}}
{{- end -}}

{{- define "localmodel.agentImage" -}}
{{- include "localmodel.image" (dict "root" . "image" .Values.agent.image "suffix" (printf "-%s" .Values.agent.image.flavor)) -}}
{{- end -}}

{{/* The hardened container securityContext used wherever the workload allows it. */}}
{{- define "localmodel.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "localmodel.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
# Volumes are chowned only when their root is not already the group's (a large model cache
# would otherwise be walked at every start).
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Image for `node-agent chat` (helm test, NOTES): tests.image, else the agent's CPU image. */}}
{{- define "localmodel.clientImage" -}}
{{- $t := .Values.tests.image -}}
{{- include "localmodel.image" (dict "root" . "image" (dict "repository" ($t.repository | default .Values.agent.image.repository) "tag" $t.tag) "suffix" "-cpu") -}}
{{- end -}}
