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

{{/* Who may reach Envoy's listener and supply X-Forwarded-For, as JSON:
"selectors" (the ingress controller's pods, or null), "ipBlocks" (the load
balancers outside the cluster, envoy.trustedCIDRs) and "xff", the ranges
Envoy trusts to supply X-Forwarded-For (xff_trusted_cidrs): the ipBlocks,
plus the pod network the selected pods take their addresses from
(networkPolicy.ingress.podCIDRs) when there are selectors. The
NetworkPolicy admits the selected pods and the ipBlocks, nothing else, and
Envoy trusts those sources and nothing else: both come from here. */}}
{{- define "meshguard.envoyIngress" -}}
{{- $in := .Values.networkPolicy.ingress -}}
{{- $sel := dict -}}
{{- with get $in "namespaceSelector" }}{{ $_ := set $sel "namespaceSelector" . }}{{ end -}}
{{- with get $in "podSelector" }}{{ $_ := set $sel "podSelector" . }}{{ end -}}
{{- $blocks := .Values.envoy.trustedCIDRs | default list -}}
{{- if and (not $sel) (not $blocks) -}}
{{- fail "networkPolicy.ingress selectors and envoy.trustedCIDRs are all empty: Envoy's listener would be open to any source, which could then choose its own X-Forwarded-For" -}}
{{- end -}}
{{- $xff := $blocks -}}
{{- if $sel -}}
{{- $pods := get $in "podCIDRs" | default list -}}
{{- if not $pods -}}
{{- fail "networkPolicy.ingress selects the ingress controller's pods but networkPolicy.ingress.podCIDRs is empty: Envoy would not trust their X-Forwarded-For, and every client would share the ingress controller's address" -}}
{{- end -}}
{{- $xff = concat $xff $pods | uniq -}}
{{- end -}}
{{- dict "selectors" (empty $sel | ternary nil $sel) "ipBlocks" $blocks "xff" $xff | toJson -}}
{{- end }}

{{/* Envoy's bootstrap: envoy/envoy.yaml with the identity provider, the
trusted X-Forwarded-For ranges and the app taken from the values. */}}
{{- define "meshguard.envoyConfig" -}}
{{- $c := .Files.Get "files/envoy.yaml" -}}
{{- $xffOld := "                cidrs:\n                - {address_prefix: 10.0.0.0, prefix_len: 8}\n                - {address_prefix: 172.16.0.0, prefix_len: 12}\n                - {address_prefix: 192.168.0.0, prefix_len: 16}\n                - {address_prefix: \"fc00::\", prefix_len: 7}\n" -}}
{{- if not (contains $xffOld $c) -}}
{{- fail "files/envoy.yaml has no xff_trusted_cidrs list the chart knows: update meshguard.envoyConfig in templates/_helpers.tpl" -}}
{{- end -}}
{{- $xffNew := "                cidrs:\n" -}}
{{- range (include "meshguard.envoyIngress" . | fromJson).xff -}}
{{- $p := splitList "/" . -}}
{{- $a := index $p 0 -}}
{{- if contains ":" $a }}{{ $a = quote $a }}{{ end -}}
{{- $xffNew = printf "%s                - {address_prefix: %s, prefix_len: %s}\n" $xffNew $a (index $p 1) -}}
{{- end -}}
{{- $c = replace $xffOld $xffNew $c -}}
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

{{/* The Secret the meshguard pods read their credentials from:
meshguard.existingSecret, or "meshguard", which the chart creates from
meshguard.secret when existingSecret is empty. */}}
{{- define "meshguard.secretName" -}}
{{- if .Values.meshguard.existingSecret -}}
{{- if ne (toJson .Values.meshguard.secret) (toJson (dict "databaseURL" "" "redisURL" "" "adminToken" "" "accountKey" "" "auditKey" "" "migrateDatabaseURL" "")) -}}
{{- fail "meshguard.secret is for the Secret the chart creates; with meshguard.existingSecret set, put those values in that Secret" -}}
{{- end -}}
{{- .Values.meshguard.existingSecret -}}
{{- else -}}
meshguard
{{- end -}}
{{- end }}

{{/* The migration Job's Secret: the schema owner's DATABASE_URL, apart from
the Deployment's, whose login may only INSERT and SELECT the audit trail. */}}
{{- define "meshguard.migrateSecretName" -}}
{{- if .Values.meshguard.existingSecret -}}
{{- if not .Values.meshguard.existingMigrateSecret -}}
{{- fail "meshguard.existingMigrateSecret is empty: with meshguard.existingSecret set, the migration Job needs a Secret of its own with the schema owner's DATABASE_URL (or set meshguard.migrate=false)" -}}
{{- end -}}
{{- .Values.meshguard.existingMigrateSecret -}}
{{- else -}}
meshguard-migrate
{{- end -}}
{{- end }}
