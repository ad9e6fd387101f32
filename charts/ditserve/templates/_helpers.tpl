{{/* Names and labels. */}}
{{- define "ditserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ditserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "ditserve.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "ditserve.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "ditserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ditserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "ditserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "ditserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "ditserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* Pod metadata of every ditserve pod; dict "root" $ "component" NAME. */}}
{{- define "ditserve.podMetadata" -}}
{{- $root := .root -}}
labels:
  {{- include "ditserve.selectorLabels" $root | nindent 2 }}
  app.kubernetes.io/component: {{ .component }}
  {{- with $root.Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with (merge (dict) (.annotations | default dict) $root.Values.podAnnotations) }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* nodeSelector / tolerations / affinity of a pod: the group's or stage's own keys, else
scheduling.gpu or scheduling.cpu. dict "root" $ "own" GROUP "gpus" N. */}}
{{- define "ditserve.scheduling" -}}
{{- $defaults := ternary .root.Values.scheduling.gpu .root.Values.scheduling.cpu (gt (float64 .gpus) 0.0) }}
{{- $out := dict }}
{{- range $key := list "nodeSelector" "tolerations" "affinity" }}
{{- with ternary (get $.own $key) (get $defaults $key) (hasKey $.own $key) }}{{ $_ := set $out $key . }}{{ end }}
{{- end }}
{{- if $out }}{{ toYaml $out }}{{ end }}
{{- end }}

{{/* The Ray Serve config: deploy/serve.yaml's shape, `args` = the serve values. Both modes
use it: as the RayService's serveConfigV2, and as the standalone gateway's --config. */}}
{{- define "ditserve.serveConfig" -}}
proxy_location: HeadOnly
http_options:
  host: 0.0.0.0
  port: {{ .Values.ports.http }}
grpc_options:
  port: {{ .Values.ports.grpc }}
  grpc_servicer_functions:
    - services.runtime.proto.generation_pb2_grpc.add_GenerationServicer_to_server
    - grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server
applications:
  - name: ditserve
    route_prefix: /
    import_path: services.ray_app:app_builder
    args:
      {{- toYaml .Values.serve | nindent 6 }}
{{- end }}

{{/* Ranks of one replica of a pool, one GPU each: dict "root" $ "pool" NAME. Denoiser:
(2 if cfg_parallel) x ring x ulysses x tp; encoder: its T5 tp_size; other pools: 1. */}}
{{- define "ditserve.ranks" -}}
{{- $p := get .root.Values.serve .pool | default dict }}
{{- if eq .pool "denoiser" }}
{{- mul (ternary 2 1 (eq ($p.cfg_parallel | default false) true)) ($p.ring_degree | default 1) ($p.ulysses_degree | default 1) ($p.tp_size | default 1) }}
{{- else if eq .pool "encoder" }}{{ $p.tp_size | default 1 }}
{{- else }}1
{{- end }}
{{- end }}

{{/* Standalone pod count of a stage: its own `replicas`, else the pool's (at least 1: nothing
scales a Deployment up from 0 here). dict "root" $ "pool" NAME. */}}
{{- define "ditserve.standaloneReplicas" -}}
{{- $own := get .root.Values.standalone .pool }}
{{- $pool := get .root.Values.serve .pool | default dict }}
{{- if not (kindIs "invalid" $own.replicas) }}{{ $own.replicas | int }}
{{- else if $pool.autoscaling }}{{ max 1 ($pool.autoscaling.min_replicas | int) }}
{{- else }}{{ $pool.num_replicas | default 1 | int }}
{{- end }}
{{- end }}

{{/* Standalone GPUs of a stage pod: its own `gpus`, else ceil(num_gpus) x the replica's ranks. */}}
{{- define "ditserve.standaloneGpus" -}}
{{- $own := get .root.Values.standalone .pool }}
{{- $pool := get .root.Values.serve .pool | default dict }}
{{- if not (kindIs "invalid" $own.gpus) }}{{ $own.gpus | int }}
{{- else }}
{{- $gpus := ceil (float64 ($pool.num_gpus | default 0)) | int }}
{{- mul $gpus (include "ditserve.ranks" .) }}
{{- end }}
{{- end }}

{{/* Volumes and mounts. A volume is mounted at the serve field that names its path; setting a
volume without that path is an error, as is setting both claimName and hostPath. */}}
{{- define "ditserve.volumeSpecs" -}}
{{- $d := .Values.serve.denoiser | default dict }}
{{- $specs := list }}
{{- $videoDir := "" }}{{- with .Values.serve.video_jobs_path }}{{ $videoDir = dir (toString .) }}
{{- if not (isAbs (toString .)) }}{{ fail "serve.video_jobs_path must be an absolute path (its directory is a mount point)" }}{{ end }}
{{- end }}
{{- range $key, $path := dict "model" .Values.serve.model_path "compileCache" $d.compile_cache_dir "lora" $d.lora_dir "videoJobs" $videoDir }}
{{- $v := get $.Values.volumes $key }}
{{- if and $v.claimName $v.hostPath }}
{{- fail (printf "volumes.%s: set claimName or hostPath, not both" $key) }}
{{- end }}
{{- if or $v.claimName $v.hostPath }}
{{- if not $path }}
{{- fail (printf "volumes.%s is set but its mount path is not: set %s" $key (get (dict "model" "serve.model_path" "compileCache" "serve.denoiser.compile_cache_dir" "lora" "serve.denoiser.lora_dir" "videoJobs" "serve.video_jobs_path") $key)) }}
{{- end }}
{{- $specs = append $specs (dict "key" $key "name" (kebabcase $key) "path" $path "volume" $v) }}
{{- end }}
{{- end }}
{{- toYaml (dict "specs" $specs) }}
{{- end }}

{{/* volumes: of a pod (shm + the configured ones): dict "root" $ "only" LIST-OF-KEYS-or-nil. */}}
{{- define "ditserve.podVolumes" -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .root.Values.shmSize }}
{{- range (include "ditserve.volumeSpecs" .root | fromYaml).specs }}
{{- if or (not $.only) (has .key $.only) }}
- name: {{ .name }}
  {{- if .volume.claimName }}
  persistentVolumeClaim:
    claimName: {{ .volume.claimName }}
    readOnly: {{ .volume.readOnly }}
  {{- else }}
  hostPath:
    path: {{ .volume.hostPath }}
    type: {{ ternary "Directory" "DirectoryOrCreate" .volume.readOnly }}
  {{- end }}
{{- end }}
{{- end }}
{{- end }}

{{- define "ditserve.volumeMounts" -}}
- name: dshm
  mountPath: /dev/shm
{{- range (include "ditserve.volumeSpecs" .root | fromYaml).specs }}
{{- if or (not $.only) (has .key $.only) }}
- name: {{ .name }}
  mountPath: {{ .path }}
  readOnly: {{ .volume.readOnly }}
  {{- with .volume.subPath }}
  subPath: {{ . }}
  {{- end }}
{{- end }}
{{- end }}
{{- end }}

{{- define "ditserve.env" -}}
{{- with .Values.env }}{{ toYaml (dict "env" .) }}{{ end }}
{{- end }}

{{/* Container resources with `gpus` nvidia.com/gpu in requests and limits: dict "resources" R "gpus" N. */}}
{{- define "ditserve.resources" -}}
{{- $r := deepCopy (.resources | default dict) }}
{{- if gt (int .gpus) 0 }}
{{- $_ := set $r "limits" (merge (dict "nvidia.com/gpu" (int .gpus)) ($r.limits | default dict)) }}
{{- $_ := set $r "requests" (merge (dict "nvidia.com/gpu" (int .gpus)) ($r.requests | default dict)) }}
{{- end }}
{{- toYaml $r }}
{{- end }}

{{/* `ditserve worker` arguments of a standalone stage: dict "root" $ "pool" NAME. The denoiser
options become the same flags `ditserve worker --role denoiser` documents (a test parses them
back with the CLI's own parser and compares with the serve values). */}}
{{- define "ditserve.workerArgs" -}}
{{- $s := .root.Values.serve }}
{{- $args := list "worker" "--role" .pool "--host" "0.0.0.0" "--grpc-port" (toString .root.Values.standalone.grpcPort) }}
{{- with $s.model_path }}{{ $args = concat $args (list "--model-path" (toString .)) }}{{ end }}
{{- with $s.device }}{{ $args = concat $args (list "--device" .) }}{{ end }}
{{- with $s.dtype }}{{ $args = concat $args (list "--dtype" .) }}{{ end }}
{{- with $s.backend }}{{ $args = concat $args (list "--backend" .) }}{{ end }}
{{- if eq .pool "encoder" }}
{{- with ($s.encoder | default dict).tp_size }}{{ $args = concat $args (list "--tp-size" (int . | toString)) }}{{ end }}
{{- end }}
{{- if eq .pool "vae" }}
{{- with ($s.vae | default dict).warmup_resolutions }}{{ $args = concat $args (list "--warmup-resolutions") . }}{{ end }}
{{- end }}
{{- if eq .pool "denoiser" }}
{{- $d := $s.denoiser | default dict }}
{{- range $field, $flag := dict "ulysses_degree" "--ulysses-degree" "ring_degree" "--ring-degree" "tp_size" "--tp-size" "offload_prefetch" "--offload-prefetch" "max_loras" "--max-loras" }}
{{- if and (hasKey $d $field) (not (kindIs "invalid" (get $d $field))) }}{{ $args = concat $args (list $flag (get $d $field | int | toString)) }}{{ end }}
{{- end }}
{{- range $field, $flag := dict "precision" "--dit-precision" "attention_precision" "--dit-attention-precision" "ulysses_exchange" "--ulysses-exchange" "compile_cache_dir" "--compile-cache-dir" "lora_dir" "--lora-dir" }}
{{- with get $d $field }}{{ $args = concat $args (list $flag (toString .)) }}{{ end }}
{{- end }}
{{- range $field, $flag := dict "cfg_parallel" "--cfg-parallel" "layerwise_offload" "--dit-layerwise-offload" }}
{{- if and (hasKey $d $field) (get $d $field) }}{{ $args = append $args $flag }}{{ end }}
{{- end }}
{{- if kindIs "bool" $d.compile }}{{ $args = append $args (ternary "--compile" "--no-compile" $d.compile) }}{{ end }}
{{- if kindIs "bool" $d.cuda_graphs }}{{ $args = append $args (ternary "--cuda-graphs" "--no-cuda-graphs" $d.cuda_graphs) }}{{ end }}
{{- with $d.warmup_resolutions }}{{ $args = concat $args (list "--warmup-resolutions") . }}{{ end }}
{{- end }}
{{- toYaml $args }}
{{- end }}

{{/* The stage workers a standalone install runs: the diffusers backend runs whole pipelines in
the denoiser worker alone (set serve.backend: diffusers for a model without a native family). */}}
{{- define "ditserve.standaloneStages" -}}
{{- toYaml (dict "stages" (ternary (list "denoiser") (list "encoder" "denoiser" "vae") (eq (toString .Values.serve.backend) "diffusers"))) }}
{{- end }}
