{{/* Labels every object carries. */}}
{{- define "meshguard.labels" -}}
app.kubernetes.io/part-of: meshguard
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{/* An image reference: repository:tag, and @digest when set. */}}
{{- define "meshguard.image" -}}
{{- if .digest -}}
{{ printf "%s:%s@%s" .repository .tag .digest }}
{{- else -}}
{{ printf "%s:%s" .repository .tag }}
{{- end -}}
{{- end }}

{{/* meshguard's config file. */}}
{{- define "meshguard.config" -}}
{{- if .Values.meshguard.config -}}
{{ .Values.meshguard.config }}
{{- else -}}
{{ .Files.Get "files/meshguard.yaml" }}
{{- end -}}
{{- end }}

{{/* Envoy's bootstrap: envoy/envoy.yaml with the identity provider and the
app taken from the values. */}}
{{- define "meshguard.envoyConfig" -}}
{{- $c := .Files.Get "files/envoy.yaml" -}}
{{- $idp := .Values.envoy.idp -}}
{{- $c = replace "https://idp.example.com/.well-known/jwks.json" $idp.jwksURI $c -}}
{{- if ne $idp.issuer "https://idp.example.com/" }}
{{- $c = replace "issuer: https://idp.example.com/" (printf "issuer: %s" ($idp.issuer | quote)) $c -}}
{{- end }}
{{- if ne (toJson $idp.audiences) "[\"app\"]" }}
{{- $c = replace "audiences: [app]" (printf "audiences: %s" (toJson $idp.audiences)) $c -}}
{{- end }}
{{- $c = replace "idp.example.com" $idp.host $c -}}
{{- $c = replace "{address: app, port_value: 3000}" (printf "{address: %s, port_value: %d}" .Values.app.host (int .Values.app.port)) $c -}}
{{ $c }}
{{- end }}

{{/* The pod security context both workloads use. */}}
{{- define "meshguard.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
privileged: false
capabilities:
  drop: ["ALL"]
{{- end }}
