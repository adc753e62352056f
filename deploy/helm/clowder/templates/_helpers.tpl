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

{{/* The cluster's service credential, and TLS material when configured: every Clowder component gets the same
     (by environment and files from Secrets, never on a command line). */}}
{{- define "clowder.securityEnv" -}}
- name: CLOWDER_SERVICE_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.serviceToken.existingSecret }}
      key: {{ .Values.serviceToken.key }}
{{- if .Values.tls.existingSecret }}
- name: CLOWDER_TLS_CERT_FILE
  value: /etc/clowder/tls/tls.crt
- name: CLOWDER_TLS_KEY_FILE
  value: /etc/clowder/tls/tls.key
- name: CLOWDER_TLS_CA_FILE
  value: /etc/clowder/tls/ca.crt
- name: CLOWDER_TLS_CLIENT_AUTH
  value: {{ .Values.tls.clientAuth | quote }}
{{- end }}
{{- if .Values.etcdTls.existingSecret }}
- name: CLOWDER_ETCD_CA_FILE
  value: /etc/clowder/etcd-tls/ca.crt
- name: CLOWDER_ETCD_CERT_FILE
  value: /etc/clowder/etcd-tls/tls.crt
- name: CLOWDER_ETCD_KEY_FILE
  value: /etc/clowder/etcd-tls/tls.key
{{- end }}
{{- end -}}

{{- define "clowder.securityVolumeMounts" -}}
{{- if .Values.tls.existingSecret }}
- name: tls
  mountPath: /etc/clowder/tls
  readOnly: true
{{- end }}
{{- if .Values.etcdTls.existingSecret }}
- name: etcd-tls
  mountPath: /etc/clowder/etcd-tls
  readOnly: true
{{- end }}
{{- end -}}

{{/* 0444: the pods run as one non-root user without an fsGroup, so root-owned 0400 files would be unreadable. */}}
{{- define "clowder.securityVolumes" -}}
{{- if .Values.tls.existingSecret }}
- name: tls
  secret:
    secretName: {{ .Values.tls.existingSecret }}
    defaultMode: 0444
{{- end }}
{{- if .Values.etcdTls.existingSecret }}
- name: etcd-tls
  secret:
    secretName: {{ .Values.etcdTls.existingSecret }}
    defaultMode: 0444
{{- end }}
{{- end -}}

{{/* Usage: include "clowder.probe" (dict "ctx" $ "port" 3092). Kubernetes' gRPC probes speak plaintext only, so
     with TLS on a port is probed by TCP connect. */}}
{{- define "clowder.probe" -}}
{{- if .ctx.Values.tls.existingSecret }}
tcpSocket:
  port: {{ .port }}
{{- else }}
grpc:
  port: {{ .port }}
{{- end }}
{{- end -}}
