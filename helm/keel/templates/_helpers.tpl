{{/* Chart name, overridable. */}}
{{- define "keel.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-qualified name; each target's objects append "-<target>", so keep room for it. */}}
{{- define "keel.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else if contains (include "keel.name" .) .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "keel.name" .) | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Name of one target's objects. Call with (dict "root" $ "name" "registry"). */}}
{{- define "keel.targetFullname" -}}
{{- printf "%s-%s" (include "keel.fullname" .root) .name -}}
{{- end -}}

{{- define "keel.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "keel.labels" -}}
helm.sh/chart: {{ include "keel.chart" . }}
app.kubernetes.io/name: {{ include "keel.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: keel
{{- end -}}

{{/* Selector labels of one target. Call with (dict "root" $ "name" "registry"). */}}
{{- define "keel.selectorLabels" -}}
app.kubernetes.io/name: {{ include "keel.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .name }}
{{- end -}}

{{/* All labels of one target's objects. Call with (dict "root" $ "name" "registry"). */}}
{{- define "keel.targetLabels" -}}
{{ include "keel.labels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end -}}

{{- define "keel.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "keel.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "keel.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Secret files are projected into this directory of every pod. */}}
{{- define "keel.secretsDir" -}}
/var/run/secrets/keel
{{- end -}}

{{/*
The projected sources of the secrets volume: the key ring, and the optional bootstrap admin key,
metrics token and NATS credentials, each from its existing Secret.
*/}}
{{- define "keel.secretSources" -}}
{{- $v := .Values -}}
- secret:
    name: {{ $v.secrets.existingSecret }}
    items:
      - { key: {{ $v.secrets.encryptionKeysKey | quote }}, path: encryption-keys }
{{- with $v.secrets.bootstrapAdminKey }}
{{- if .existingSecret }}
- secret:
    name: {{ .existingSecret }}
    items:
      - { key: {{ .key | quote }}, path: bootstrap-admin-key }
{{- end }}
{{- end }}
{{- with $v.secrets.metricsToken }}
{{- if .existingSecret }}
- secret:
    name: {{ .existingSecret }}
    items:
      - { key: {{ .key | quote }}, path: metrics-token }
{{- end }}
{{- end }}
{{- with $v.nats.credentials }}
{{- if .existingSecret }}
- secret:
    name: {{ .existingSecret }}
    items:
      - { key: {{ .key | quote }}, path: nats.creds }
{{- end }}
{{- end }}
{{- end -}}

{{/*
The environment of one target's container. Call with (dict "root" $ "name" "registry" "target" $t).
Secrets only by reference: the database URL from its Secret, the rest as files (the _FILE
settings). Services find each other through KEEL_<TARGET>_ENDPOINT.
*/}}
{{- define "keel.env" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $secret := required "secrets.existingSecret is required: the name of a Secret holding the database URL and the encryption keys" $v.secrets.existingSecret -}}
- name: KEEL_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ $v.secrets.databaseUrlKey }}
- name: KEEL_ENCRYPTION_KEYS_FILE
  value: {{ include "keel.secretsDir" $root }}/encryption-keys
{{- if $v.secrets.bootstrapAdminKey.existingSecret }}
- name: KEEL_BOOTSTRAP_ADMIN_KEY_FILE
  value: {{ include "keel.secretsDir" $root }}/bootstrap-admin-key
- name: KEEL_BOOTSTRAP_TENANT
  value: {{ $v.secrets.bootstrapAdminKey.tenant | quote }}
{{- end }}
{{- if $v.secrets.metricsToken.existingSecret }}
- name: KEEL_METRICS_TOKEN_FILE
  value: {{ include "keel.secretsDir" $root }}/metrics-token
{{- end }}
- name: KEEL_NATS_URL
  value: {{ $v.nats.url | quote }}
{{- if $v.nats.credentials.existingSecret }}
- name: KEEL_NATS_CREDENTIALS_FILE
  value: {{ include "keel.secretsDir" $root }}/nats.creds
{{- end }}
- name: KEEL_GRPC_LISTEN
  value: "0.0.0.0:{{ $v.service.grpcPort }}"
- name: KEEL_HTTP_LISTEN
  value: "0.0.0.0:{{ $v.service.httpPort }}"
- name: KEEL_LOG
  value: {{ $v.log.level | quote }}
- name: KEEL_LOG_FORMAT
  value: {{ $v.log.format | quote }}
- name: OTEL_SERVICE_NAME
  value: keel-{{ .name }}
{{- with $v.otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- range $other, $t := $v.targets }}
{{- if $t.enabled }}
- name: KEEL_{{ upper $other }}_ENDPOINT
  value: "http://{{ include "keel.targetFullname" (dict "root" $root "name" $other) }}:{{ $v.service.grpcPort }}"
{{- end }}
{{- end }}
{{- if eq .name "remediation" }}
- name: KEEL_RUNBOOKS_DIR
  value: /etc/keel/runbooks
{{- end }}
{{- with $v.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- with .target.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}
