{{/* The objfs image (repository:tag, the tag defaulting to the chart's appVersion). */}}
{{- define "objfs.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* image and, when set, imagePullPolicy of an objfs container */}}
{{- define "objfs.imageFields" -}}
image: {{ include "objfs.image" . }}
{{- with .Values.image.pullPolicy }}
imagePullPolicy: {{ . }}
{{- end }}
{{- end }}

{{/* nodeSelector, tolerations and imagePullSecrets of a pod spec; the argument is a component's values
     (.Values.node, .controller, .webhook) under "c" and the root under "root" */}}
{{- define "objfs.scheduling" -}}
{{- with .c.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Values that cannot work together fail the rendering with what to change. */}}
{{- define "objfs.validate" -}}
{{- if and (eq .Values.node.launcher "sidecar") (not .Values.webhook.enabled) (not .Values.node.allowProcessFallback) }}
{{- fail "node.launcher=sidecar needs the webhook that adds the objfs sidecar to pods: set webhook.enabled=true, or node.allowProcessFallback=true to serve pods without it from the node plugin" }}
{{- end }}
{{- end }}
