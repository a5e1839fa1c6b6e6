# What the e2e scripts share (sourced, not run): logging, free ports, bounded waits, processes
# started and stopped by pid, certificates signed by the local CA, kubeconfigs.
# The sourcing script sets `component` (the log prefix) and, before starting processes, `state`
# (the directory that holds their pids/ and logs/).

log() { printf '[%s %s] %s\n' "$component" "$(date +%T)" "$*" >&2; }
die() { log "$*"; exit 1; }

free_port() {
  local port
  for _ in $(seq 50); do
    port=$((20000 + RANDOM % 20000))
    ss -Htln "sport = :$port" | grep -q . || { echo "$port"; return; }
  done
  die "no free TCP port found"
}

wait_for() { # what seconds command...
  local what=$1 seconds=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" > /dev/null 2>&1; do
    ((SECONDS < deadline)) || die "$what not ready after $seconds s; see $state/logs"
    sleep 0.2
  done
}

start_process() { # name command...: in the background, log in $state/logs/NAME.log, pid in $state/pids/NAME
  local name=$1; shift
  "$@" > "$state/logs/$name.log" 2>&1 &
  echo $! > "$state/pids/$name"
}

stop_process() { # name: SIGTERM to the recorded pid, SIGKILL after 10 s
  local pid
  [[ -f $state/pids/$1 ]] || return 0
  pid=$(cat "$state/pids/$1")
  if kill -TERM "$pid" 2>/dev/null; then
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$state/pids/$1"
}

issue_cert() { # ca-dir out-dir stem subject ext-lines: OUT/STEM.key and .crt, signed by CA/ca.crt
  local ca=$1 out=$2 stem=$3 subject=$4 ext=$5
  (
    umask 077
    openssl ecparam -name prime256v1 -genkey -noout -out "$out/$stem.key"
    openssl req -new -key "$out/$stem.key" -subj "$subject" -out "$out/$stem.csr" 2>/dev/null
    printf '%b' "$ext" > "$out/$stem.ext"
    # A random serial, not -CAcreateserial: the nodes start side by side, and their certificates
    # would race on the CA's one serial file.
    openssl x509 -req -in "$out/$stem.csr" -CA "$ca/ca.crt" -CAkey "$ca/ca.key" -set_serial "0x$(openssl rand -hex 16)" -days 30 \
      -extfile "$out/$stem.ext" -out "$out/$stem.crt" 2>/dev/null
    rm -f "$out/$stem.csr" "$out/$stem.ext"
  )
}

# The extensions of a client certificate.
client_auth="keyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n"

write_kubeconfig() { # file server ca-file user cert key
  local file=$1 server=$2 ca=$3 user=$4 cert=$5 key=$6
  cat > "$file" <<KC
apiVersion: v1
kind: Config
clusters:
- name: warren-e2e
  cluster:
    server: $server
    certificate-authority: $ca
users:
- name: $user
  user:
    client-certificate: $cert
    client-key: $key
contexts:
- name: warren-e2e
  context: {cluster: warren-e2e, user: $user}
current-context: warren-e2e
KC
  chmod 600 "$file"
}

# rabbitmq_image GENERATION: the node image of a RabbitMQ generation (`4.3`), named by the exact
# version its rootfs holds (e2e/rootfs.sh records it).
rabbitmq_image() {
  local file=${WARREN_CACHE:-$HOME/.cache/warren}/rootfs/rabbitmq-$1.version
  [[ -f $file ]] || die "no RabbitMQ $1 rootfs: run e2e/rootfs.sh $1"
  echo "warren.local/rabbitmq:$(cat "$file")-management"
}

# export_rabbitmq_images: RABBITMQ_IMAGE (the default generation, what `make up` runs) and
# RABBITMQ_IMAGE_<generation> (RABBITMQ_IMAGE_3_10, ...) for every generation of versions.env.
export_rabbitmq_images() {
  local generation
  for generation in $RABBITMQ_GENERATIONS; do
    export "RABBITMQ_IMAGE_${generation//./_}=$(rabbitmq_image "$generation")"
  done
  RABBITMQ_IMAGE=$(rabbitmq_image "$RABBITMQ_DEFAULT_GENERATION")
  export RABBITMQ_IMAGE
}
