#!/usr/bin/env bash
# Container images for the local node, built here with no registry and no Docker engine:
#   pause     Kubernetes' own build/pause/linux/pause.c, compiled static (the pod sandbox)
#   rabbitmq  one per RabbitMQ generation of versions.env: the rootfs e2e/rootfs.sh built (Debian
#             with Debian's rabbitmq-server, uid/gid 999 as in the official image), PATH on the
#             server's own scripts (Debian's wrapper would drop to a user), named
#             warren.local/rabbitmq:<version>-management
#   warren    the warren binary and the shared libraries it links (the migration Job, the operator)
#   celery    a Celery worker as teams run one: Debian's python3 (the rootfs e2e/rootfs.sh python
#             built), the Celery line CELERY_LINE pinned in tests/fixtures/celery from PyPI, and the
#             tests' app (tasks.py); runs `celery -A tasks worker` as uid 65532
# Each is written as a `docker save` archive, which `ctr images import` reads.
#
#   e2e/images.sh build           build what is missing; prints one `NAME=REF ARCHIVE` line per image
#   e2e/images.sh import SOCKET   build, then import all of them into containerd's k8s.io namespace
#
# pause and rabbitmq are cached under $WARREN_CACHE/images keyed by version; warren is rebuilt
# when the binary changed. The tier-2 tests run the same rootfs under chroot.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=e2e/versions.env
source "$here/versions.env"
cache=${WARREN_CACHE:-$HOME/.cache/warren}
images=$cache/images
warren_bin=${WARREN_BINARY:-${CARGO_TARGET_DIR:-$cache/target}/debug/warren}

component=images
# shellcheck source=e2e/lib.sh
source "$here/lib.sh"

# pack ROOTFS REF ARCHIVE CONFIG_JSON: one layer holding ROOTFS, as a `docker save` archive.
pack() {
  local rootfs=$1 ref=$2 archive=$3 config=$4 work
  work=$(mktemp -d "$images/pack.XXXXXX")
  tar --sort=name --mtime=@0 --numeric-owner --xattrs -C "$rootfs" -cf "$work/layer.tar" .
  local diff_id
  diff_id=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
  mkdir "$work/$diff_id"
  mv "$work/layer.tar" "$work/$diff_id/layer.tar"
  printf '{"architecture":"amd64","os":"linux","config":%s,"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
    "$config" "$diff_id" > "$work/config.json"
  local config_id
  config_id=$(sha256sum "$work/config.json" | cut -d' ' -f1)
  mv "$work/config.json" "$work/$config_id.json"
  printf '[{"Config":"%s.json","RepoTags":["%s"],"Layers":["%s/layer.tar"]}]' \
    "$config_id" "$ref" "$diff_id" > "$work/manifest.json"
  tar --sort=name --mtime=@0 -C "$work" -cf "$archive.tmp" manifest.json "$config_id.json" "$diff_id"
  mv "$archive.tmp" "$archive"
  rm -rf "$work"
}

build_pause() {
  local archive=$images/pause-$PAUSE_IMAGE_TAG.tar
  [[ -f $archive ]] && return 0
  log "pause $PAUSE_IMAGE_TAG from k8s.io/kubernetes@$KUBERNETES_VERSION build/pause/linux/pause.c"
  local dir src
  dir=$(GOTOOLCHAIN=local go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  src=$dir/build/pause/linux/pause.c
  [[ -f $src ]] || die "no $src"
  local rootfs=$images/pause-rootfs
  rm -rf "$rootfs" && mkdir -p "$rootfs"
  gcc -Os -Wall -Werror -static -DVERSION="$PAUSE_IMAGE_TAG-warren" -o "$rootfs/pause" "$src"
  strip "$rootfs/pause"
  pack "$rootfs" "$PAUSE_IMAGE" "$archive" '{"Entrypoint":["/pause"],"User":"65535:65535"}'
  rm -rf "$rootfs"
}

build_rabbitmq() { # GENERATION
  local generation=$1 rootfs=$cache/rootfs/rabbitmq-$1
  "$here/rootfs.sh" "$generation"
  local version image
  version=$(cat "$rootfs.version")
  image=$(rabbitmq_image "$generation")
  local archive=$images/rabbitmq-$version.tar
  [[ -f $archive ]] && return 0
  log "rabbitmq $version from $rootfs"
  local path=/usr/lib/rabbitmq/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
  pack "$rootfs" "$image" "$archive" \
    "{\"Env\":[\"PATH=$path\",\"HOME=/var/lib/rabbitmq\",\"LANG=C.UTF-8\"],\"Cmd\":[\"rabbitmq-server\"],\"User\":\"999:999\",\"ExposedPorts\":{\"5672/tcp\":{},\"15672/tcp\":{}}}"
}

build_warren() {
  [[ -x $warren_bin ]] || die "no warren binary at $warren_bin (cargo build first)"
  local sum archive
  sum=$(sha256sum "$warren_bin" | cut -c1-16)
  archive=$images/warren-$sum.tar
  if [[ ! -f $archive ]]; then
    log "warren from $warren_bin"
    rm -f "$images"/warren-*.tar
    local rootfs=$images/warren-rootfs lib
    rm -rf "$rootfs" && mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc" "$rootfs/tmp"
    install -m 0755 "$warren_bin" "$rootfs/usr/local/bin/warren"
    strip "$rootfs/usr/local/bin/warren"
    # The dynamic loader and every library the binary links, at the same paths.
    for lib in $(ldd "$warren_bin" | grep -o '/[^ ]*'); do
      mkdir -p "$rootfs$(dirname "$lib")" && cp -L "$lib" "$rootfs$lib"
    done
    # Trust roots, as distroless has them: the HTTP client loads them even for plain http.
    mkdir -p "$rootfs/etc/ssl/certs"
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/"
    printf 'root:x:0:0::/:/nonexistent\nnonroot:x:65532:65532::/:/nonexistent\n' > "$rootfs/etc/passwd"
    printf 'root:x:0:\nnonroot:x:65532:\n' > "$rootfs/etc/group"
    chmod 1777 "$rootfs/tmp"
    pack "$rootfs" "$WARREN_IMAGE" "$archive" '{"Entrypoint":["/usr/local/bin/warren"],"User":"65532:65532"}'
    rm -rf "$rootfs"
  fi
  echo "$archive" > "$images/warren.current"
}

build_celery() {
  local fixtures=$here/../tests/fixtures/celery
  local requirements=$fixtures/requirements-$CELERY_LINE.txt key archive
  "$here/rootfs.sh" python
  key=$(cat "$requirements" "$fixtures/tasks.py" | sha256sum | cut -c1-16)
  archive=$images/celery-$CELERY_LINE-$key.tar
  if [[ ! -f $archive ]]; then
    log "celery worker: Celery $CELERY_LINE from PyPI on $PYTHON_SUITE's python3"
    rm -f "$images"/celery-*.tar
    local rootfs=$images/celery-rootfs
    rm -rf "$rootfs"
    cp -a "$cache/rootfs/python-$PYTHON_SUITE" "$rootfs"
    # Pure-Python wheels (and one abi3 extension) for the same Python minor version as the rootfs's.
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --target "$rootfs/opt/celery" \
      -r "$requirements"
    mkdir -p "$rootfs/app"
    cp "$fixtures/tasks.py" "$rootfs/app/tasks.py"
    printf 'nonroot:x:65532:65532::/app:/nonexistent\n' >> "$rootfs/etc/passwd"
    printf 'nonroot:x:65532:\n' >> "$rootfs/etc/group"
    pack "$rootfs" "$CELERY_IMAGE" "$archive" \
      '{"Env":["PATH=/usr/local/bin:/usr/bin:/bin","PYTHONPATH=/opt/celery","PYTHONDONTWRITEBYTECODE=1","LANG=C.UTF-8"],"WorkingDir":"/app","Cmd":["python3","-m","celery","-A","tasks","worker","--loglevel=INFO"],"User":"65532:65532"}'
    rm -rf "$rootfs"
  fi
  echo "$archive" > "$images/celery.current"
}

build() {
  mkdir -p "$images"
  build_pause
  build_celery
  local generation
  for generation in $RABBITMQ_GENERATIONS; do build_rabbitmq "$generation"; done
  build_warren
  echo "pause=$PAUSE_IMAGE $images/pause-$PAUSE_IMAGE_TAG.tar"
  for generation in $RABBITMQ_GENERATIONS; do
    echo "rabbitmq-$generation=$(rabbitmq_image "$generation") $images/rabbitmq-$(cat "$cache/rootfs/rabbitmq-$generation.version").tar"
  done
  echo "warren=$WARREN_IMAGE $(cat "$images/warren.current")"
  echo "celery=$CELERY_IMAGE $(cat "$images/celery.current")"
}

import() {
  local socket=$1 line
  build | while read -r line; do
    log "import ${line%% *}"
    ctr --address "$socket" -n k8s.io images import --no-unpack=false "${line#* }" > /dev/null
  done
}

case ${1:-} in
  build) build ;;
  import) import "${2:?usage: $0 import SOCKET}" ;;
  *) die "usage: $0 build | import SOCKET" ;;
esac
