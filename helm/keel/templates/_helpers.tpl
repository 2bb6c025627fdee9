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

{{/* The TLS certificate, key and client CA are projected into this directory. */}}
{{- define "keel.tlsDir" -}}
/var/run/secrets/keel-tls
{{- end -}}

{{/*
Settings that contradict each other, or that would leave keel unable to start or /metrics
unscrapable, fail the render with what to change. Renders nothing.
*/}}
{{- define "keel.validate" -}}
{{- $v := .Values -}}
{{- $_ := required "secrets.existingSecret is required: the name of a Secret holding the database URL and the encryption keys" $v.secrets.existingSecret -}}
{{- if $v.tls.enabled -}}
{{- if not $v.tls.existingSecret -}}
{{- fail "tls.existingSecret is required while tls.enabled is true: the name of a Secret of type kubernetes.io/tls (tls.crt, tls.key) in the release namespace, e.g. one cert-manager issues. To serve without TLS on a network you trust, set tls.enabled=false and tls.allowPlaintext=true" -}}
{{- end -}}
{{- else -}}
{{- if not $v.tls.allowPlaintext -}}
{{- fail "tls.enabled=false would serve gRPC and HTTP in plaintext, where anyone on the network can read API keys, database credentials and the metrics token. Set tls.existingSecret and keep tls.enabled=true, or confirm with tls.allowPlaintext=true (only on a network you trust entirely)" -}}
{{- end -}}
{{- if $v.tls.clientCA.existingSecret -}}
{{- fail "tls.clientCA.existingSecret needs TLS: set tls.enabled=true and tls.existingSecret, or empty tls.clientCA.existingSecret" -}}
{{- end -}}
{{- end -}}
{{- if and $v.metrics.anonymous $v.metrics.tokenSecret.name -}}
{{- fail "metrics.anonymous=true contradicts metrics.tokenSecret.name: set only one of them" -}}
{{- end -}}
{{- if and $v.monitoring.serviceMonitor.enabled (not $v.metrics.tokenSecret.name) (not $v.metrics.anonymous) -}}
{{- fail "monitoring.serviceMonitor.enabled needs metrics.tokenSecret.name (the Secret holding the bearer token Prometheus sends): without a token keel answers 401 on /metrics. Or set metrics.anonymous=true to serve /metrics to anyone" -}}
{{- end -}}
{{- end -}}

{{/* "https" while TLS is on, else "http". */}}
{{- define "keel.scheme" -}}
{{- ternary "https" "http" .Values.tls.enabled -}}
{{- end -}}

{{/*
The projected sources of the TLS volume: certificate and key from the kubernetes.io/tls Secret,
and the optional client CA. Mounted without subPath, so renewals reach the running pods.
*/}}
{{- define "keel.tlsSources" -}}
{{- $tls := .Values.tls -}}
- secret:
    name: {{ $tls.existingSecret }}
    items:
      - { key: tls.crt, path: tls.crt }
      - { key: tls.key, path: tls.key }
{{- with $tls.clientCA }}
{{- if .existingSecret }}
- secret:
    name: {{ .existingSecret }}
    items:
      - { key: {{ .key | quote }}, path: client-ca.crt }
{{- end }}
{{- end }}
{{- end -}}

{{/* A number or size as an env value: YAML numbers arrive as floats, so print them as integers. */}}
{{- define "keel.envNumber" -}}
{{- if kindIs "string" . -}}
{{- . | quote -}}
{{- else -}}
{{- . | int64 | toString | quote -}}
{{- end -}}
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
{{- with $v.metrics.tokenSecret }}
{{- if .name }}
- secret:
    name: {{ .name }}
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
settings). KEEL_<TARGET>_ENDPOINT and KEEL_RUNBOOKS_DIR are passed ahead of keel reading them
(see README.md): services will find each other and the runbooks through them.
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
{{- if $v.tls.enabled }}
- name: KEEL_TLS_CERT_FILE
  value: {{ include "keel.tlsDir" $root }}/tls.crt
- name: KEEL_TLS_KEY_FILE
  value: {{ include "keel.tlsDir" $root }}/tls.key
{{- if $v.tls.clientCA.existingSecret }}
- name: KEEL_TLS_CLIENT_CA_FILE
  value: {{ include "keel.tlsDir" $root }}/client-ca.crt
- name: KEEL_TLS_CLIENT_AUTH
  value: {{ $v.tls.clientCA.mode | quote }}
{{- end }}
{{- else if $v.tls.allowPlaintext }}
- name: KEEL_ALLOW_PLAINTEXT
  value: "true"
{{- end }}
{{- if $v.metrics.tokenSecret.name }}
- name: KEEL_METRICS_TOKEN_FILE
  value: {{ include "keel.secretsDir" $root }}/metrics-token
{{- else if $v.metrics.anonymous }}
- name: KEEL_METRICS_ANONYMOUS
  value: "true"
{{- end }}
- name: KEEL_LIMIT_RATE
  value: {{ include "keel.envNumber" $v.limits.rate }}
- name: KEEL_LIMIT_BURST
  value: {{ include "keel.envNumber" $v.limits.burst }}
- name: KEEL_LIMIT_CONCURRENCY
  value: {{ include "keel.envNumber" $v.limits.concurrency }}
- name: KEEL_LIMIT_MESSAGE_BYTES
  value: {{ include "keel.envNumber" $v.limits.messageBytes }}
- name: KEEL_LIMIT_STREAM_DURATION
  value: {{ $v.limits.streamDuration | quote }}
- name: KEEL_NATS_URL
  value: {{ $v.nats.url | quote }}
- name: KEEL_NATS_STREAM
  value: {{ $v.nats.stream | default "KEEL" | quote }}
- name: KEEL_NATS_SUBJECT_ROOT
  value: {{ $v.nats.subjectRoot | default "keel" | quote }}
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
  value: "{{ include "keel.scheme" $root }}://{{ include "keel.targetFullname" (dict "root" $root "name" $other) }}:{{ $v.service.grpcPort }}"
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
