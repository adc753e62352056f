{{/* Names and labels shared by every template. */}}

{{- define "clowder.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "clowder.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Usage: include "clowder.labels" (dict "ctx" $ "component" "controller") */}}
{{- define "clowder.labels" -}}
{{ include "clowder.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/part-of: clowder
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version }}
{{- end -}}

{{- define "clowder.componentSelector" -}}
{{ include "clowder.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "clowder.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "clowder.etcdEndpoints" -}}
{{- if .Values.etcd.enabled -}}
{{- $fullname := include "clowder.fullname" . -}}
{{- $endpoints := list -}}
{{- range $i := until (int .Values.etcd.replicas) -}}
{{- $endpoints = append $endpoints (printf "%s-etcd-%d.%s-etcd-headless:2379" $fullname $i $fullname) -}}
{{- end -}}
{{- join "," $endpoints -}}
{{- else -}}
{{- required "externalEtcd.endpoints is required when etcd.enabled is false" (join "," .Values.externalEtcd.endpoints) -}}
{{- end -}}
{{- end -}}

{{- define "clowder.adminTokenEnv" -}}
- name: CLOWDER_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.adminToken.existingSecret }}
      key: {{ .Values.adminToken.key }}
{{- end -}}

{{- define "clowder.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "clowder.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{- define "clowder.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{ toYaml . }}
{{- end }}
{{- end -}}
