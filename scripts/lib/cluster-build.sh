#!/usr/bin/env bash
# Builds, from the Go module proxy only, every binary the local Kubernetes cluster runs, and caches
# them under $MSA_CACHE_DIR/cluster/bin/<name>-<version> (keyed by version: a new version builds
# anew, an old one is never rebuilt). Called by scripts/cluster; usable alone:
#
#   bash scripts/lib/cluster-build.sh            # everything
#   bash scripts/lib/cluster-build.sh k8s etcd   # some of: k8s etcd coredns local-path pause kube-router
#
# Kubernetes is built from the published k8s.io/kubernetes module: its go.work and ./staging
# replaces only work in a git checkout, so the copy here points each replace at the published
# k8s.io/X v0.<minor>.<patch> instead (the same code, tagged from that staging tree).
set -euo pipefail

K8S_VERSION=${MSA_K8S_VERSION:-v1.34.2}
ETCD_VERSION=${MSA_ETCD_VERSION:-v3.6.4}
COREDNS_VERSION=${MSA_COREDNS_VERSION:-v1.12.1}
LOCAL_PATH_VERSION=${MSA_LOCAL_PATH_VERSION:-v0.0.30}
# The Go module proxy serves only some kube-router versions: v2.10.0 (go 1.26.0, client-go v0.36)
# is the newest it hands out whole (v2.11.x and v2.6-v2.9 are refused; v2.1.0 has known flaws).
KUBE_ROUTER_VERSION=${MSA_KUBE_ROUTER_VERSION:-v2.10.0}

MSA_CACHE_DIR=${MSA_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/msa-framework}
root=$MSA_CACHE_DIR/cluster
bin=$root/bin
work=$root/src
mkdir -p "$bin" "$work"
# Go's module and build caches live in the project cache too: a warm cache rebuilds nothing.
export GOPATH=$MSA_CACHE_DIR/go GOCACHE=$MSA_CACHE_DIR/go/build-cache GOMODCACHE=$MSA_CACHE_DIR/go/mod
export GOWORK=off GOFLAGS="-mod=mod -buildvcs=false" CGO_ENABLED=0 GOTOOLCHAIN=local

log() { printf '[cluster-build] %s\n' "$*" >&2; }

# Copies a module's source out of the read-only module cache into a writable folder.
module_src() { # module version dest
    local dir
    dir=$(cd "$work" && go mod download -json "$1@$2" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
    rm -rf "$3"
    cp -r "$dir" "$3"
    chmod -R u+w "$3"
}

build_k8s() {
    local v=$K8S_VERSION names="kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl"
    local missing="" n
    for n in $names; do [ -x "$bin/$n-$v" ] || missing="$missing $n"; done
    [ -n "$missing" ] || return 0
    log "kubernetes $v:$missing"
    local src=$work/kubernetes-$v staging=v0.${v#v1.}
    if [ ! -f "$src/.msa-prepared" ]; then
        module_src k8s.io/kubernetes "$v" "$src"
        rm -rf "$src/go.work" "$src/go.work.sum" "$src/vendor"
        # replace k8s.io/api => ./staging/src/k8s.io/api   ->   replace k8s.io/api => k8s.io/api v0.34.2
        sed -i -E "s#^(\s*)(k8s\.io/[a-z0-9-]+) => \./staging/src/k8s\.io/[a-z0-9-]+\$#\1\2 => \2 $staging#" "$src/go.mod"
        grep -q '=> ./staging' "$src/go.mod" && { log "go.mod still names ./staging"; exit 1; }
        (cd "$src" && go mod download)
        touch "$src/.msa-prepared"
    fi
    local major=${v#v}; major=${major%%.*}
    local minor=${v#v*.}; minor=${minor%%.*}
    local ld="-s -w"
    local pkg
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ld="$ld -X $pkg.gitVersion=$v -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
        ld="$ld -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
    done
    local out=$src/_out
    mkdir -p "$out"
    local targets=""
    for n in $missing; do targets="$targets ./cmd/$n"; done
    # One go build for all of them: the shared packages compile once.
    # shellcheck disable=SC2086
    (cd "$src" && go build -trimpath -ldflags "$ld" -o "$out/" $targets)
    for n in $missing; do mv "$out/$n" "$bin/$n-$v"; done
}

build_etcd() {
    local v=$ETCD_VERSION
    [ -x "$bin/etcd-$v" ] && return 0
    log "etcd $v"
    local src=$work/etcd-$v
    mkdir -p "$src"
    cat > "$src/go.mod" <<EOF
module msa/etcd

go 1.24.0

require go.etcd.io/etcd/server/v3 $v
EOF
    cat > "$src/main.go" <<'EOF'
// etcd's own server main, built from the published go.etcd.io/etcd/server/v3 module.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF
    (cd "$src" && go mod tidy && go build -trimpath -ldflags "-s -w" -o "$bin/etcd-$v" .)
}

build_coredns() {
    local v=$COREDNS_VERSION
    [ -x "$bin/coredns-$v" ] && return 0
    log "coredns $v"
    local src=$work/coredns-$v
    module_src github.com/coredns/coredns "$v" "$src"
    (cd "$src" && go build -trimpath -ldflags "-s -w" -o "$bin/coredns-$v" .)
}

build_local_path() {
    local v=$LOCAL_PATH_VERSION
    [ -x "$bin/local-path-provisioner-$v" ] && return 0
    log "local-path-provisioner $v"
    local src=$work/local-path-$v
    module_src github.com/rancher/local-path-provisioner "$v" "$src"
    rm -rf "$src/vendor"
    (cd "$src" && go build -trimpath -ldflags "-s -w -X main.VERSION=$v" -o "$bin/local-path-provisioner-$v" .)
}

# kube-router, run as a NetworkPolicy controller only (iptables + ipset) next to the bridge CNI.
build_kube_router() {
    local v=$KUBE_ROUTER_VERSION
    [ -x "$bin/kube-router-$v" ] && return 0
    log "kube-router $v"
    local src=$work/kube-router-$v
    module_src github.com/cloudnativelabs/kube-router/v2 "$v" "$src"
    # v2.10.0 pins a netlink pseudo-version the proxy refuses; the last release (v1.3.1) builds.
    if grep -q 'github.com/vishvananda/netlink v1.3.2-0\.' "$src/go.mod"; then
        (cd "$src" && go mod edit -replace github.com/vishvananda/netlink=github.com/vishvananda/netlink@v1.3.1)
    fi
    local ld="-s -w -X github.com/cloudnativelabs/kube-router/v2/pkg/version.Version=$v"
    (cd "$src" && go build -trimpath -ldflags "$ld" -o "$bin/kube-router-$v" ./cmd/kube-router)
}

# The sandbox ("pause") image's one program, from the Kubernetes source, linked statically.
build_pause() {
    local v=$K8S_VERSION
    [ -x "$bin/pause-$v" ] && return 0
    log "pause ($v source)"
    local dir
    dir=$(cd "$work" && go mod download -json "k8s.io/kubernetes@$v" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
    gcc -Os -static -Wall -Werror -DVERSION="$v" -o "$bin/pause-$v" "$dir/build/pause/linux/pause.c"
    strip "$bin/pause-$v"
}

what=${*:-k8s etcd coredns local-path pause kube-router}
for w in $what; do
    began=$SECONDS
    case $w in
        k8s) build_k8s ;;
        etcd) build_etcd ;;
        coredns) build_coredns ;;
        local-path) build_local_path ;;
        pause) build_pause ;;
        kube-router) build_kube_router ;;
        *) log "unknown: $w"; exit 2 ;;
    esac
    log "$w ready ($((SECONDS - began))s)"
done
