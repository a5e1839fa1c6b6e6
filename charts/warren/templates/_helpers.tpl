{{- define "warren.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "warren.serviceAccountName" -}}
{{- default (include "warren.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "warren.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "warren.labels" -}}
{{ include "warren.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The operator's permissions: exactly what it reads, applies and reports. */}}
{{- define "warren.rules" -}}
- apiGroups: [warren.dev]
  resources: [rabbitclusters]
  verbs: [get, list, watch]
- apiGroups: [warren.dev]
  resources: [rabbitclusters/status]
  verbs: [patch]
# Children are server-side applied (create + patch) and watched; never deleted: garbage
# collection follows their owner references.
- apiGroups: [apps]
  resources: [statefulsets]
  verbs: [get, list, watch, create, patch]
- apiGroups: [""]
  resources: [services, configmaps, secrets, serviceaccounts]
  verbs: [get, list, watch, create, patch]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, patch]
# The RabbitMQ pods' NetworkPolicy: deleted when spec.networkPolicy.enabled is turned off.
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, list, watch, create, patch, delete]
# Migrations: the Job runs with the Secrets as environment variables; the operator never reads them.
- apiGroups: [warren.dev]
  resources: [rabbitmigrations]
  verbs: [get, list, watch]
- apiGroups: [warren.dev]
  resources: [rabbitmigrations/status]
  verbs: [patch]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create]
# Pods: a migration Job's termination message (the migrator's summary, read into status), a
# scale-down's view of the RabbitMQ pods (ready, stopping), and the watch that names a pod the
# scheduler cannot place. Deleted only to replace a member whose node was declared gone, where
# the RabbitCluster opts in (spec.replaceLostMembers): its kubelet will never confirm.
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch, delete]
# Scale-down runs rabbitmqctl-level commands in the RabbitMQ pods (quorum shrink, maintenance
# mode, forget_cluster_node), as `kubectl exec` does: a WebSocket upgrade of a GET, which servers
# before the WebSocket create check authorise as get; so do the recovery of a deleted Erlang
# cookie Secret (read from a running node) and of the default user (re-created on the broker).
# Never pods themselves.
- apiGroups: [""]
  resources: [pods/exec]
  verbs: [create, get]
# Claims: listed to know whether a cluster has data (a missing Secret is then recovered, never
# re-invented); patched to expand them to a larger spec.persistence.storage (their StorageClass
# decides whether it may); read to find a not-ready member's volume; deleted only by a
# scale-down's forget step, for the node the operator removed, and to replace a member whose node
# was declared gone (spec.replaceLostMembers).
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get, list, patch, delete]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end -}}


{{/* The namespaces the operator runs in when it is not cluster-wide: watchNamespaces, or the release's. */}}
{{- define "warren.watchNamespaces" -}}
{{- if .Values.watchNamespaces }}{{ join "," (uniq .Values.watchNamespaces) }}{{ else }}{{ .Release.Namespace }}{{ end -}}
{{- end -}}
