#!/usr/bin/env bash
# Builds, without any container registry or Docker engine, every image the local Kubernetes
# cluster runs, as OCI archives under $MSA_CACHE_DIR/cluster/images/<name>-<key>.tar, where <key>
# hashes the image's inputs (a warm cache rebuilds nothing), and imports them into containerd.
# Called by scripts/cluster; usable alone:
#
#   bash scripts/lib/cluster-images.sh build                # every image (prints each one's time)
#   bash scripts/lib/cluster-images.sh build kafka shop     # some of them (short names: see list)
#   bash scripts/lib/cluster-images.sh load /run/containerd/containerd.sock
#   bash scripts/lib/cluster-images.sh list                 # name<TAB>archive
#
# Where things come from: Debian bookworm from the apt mirror (one `debootstrap --variant=minbase`
# rootfs, cached as a tarball; the Kafka and PostgreSQL variants add their packages with apt in a
# copy of it, kept as a layer on top of the shared base layer), the Go binaries from
# scripts/lib/cluster-build.sh and (FerretDB) the same build scripts/devservices.py makes, the
# Kafka jars from Maven Central through scripts/kafka/pom.xml (the devservices' jar cache), and the
# shop image from ./Dockerfile with buildah (pip against PyPI inside the build).
#
# Layers are plain tarballs written here (sorted names, numeric owners, files made during the
# build dated SOURCE_DATE_EPOCH, packaged files keeping their package's mtime), so the same
# inputs give the same digests; the shop image is buildah's and is not bit-reproducible.
# Needs root (debootstrap, chroot, buildah's vfs storage).
set -euo pipefail

MSA_CACHE_DIR=${MSA_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/msa-framework}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1735689600}  # 2025-01-01

SUITE=bookworm
MIRROR=${MSA_DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE_PACKAGES="python3,python3-venv,ca-certificates"
KAFKA_PACKAGES="openjdk-17-jre-headless"
POSTGRES_PACKAGES="postgresql-15 libnss-wrapper"
K8S_VERSION=${MSA_K8S_VERSION:-v1.34.2}
COREDNS_VERSION=${MSA_COREDNS_VERSION:-v1.12.1}
LOCAL_PATH_VERSION=${MSA_LOCAL_PATH_VERSION:-v0.0.30}
FERRETDB_VERSION=v1.24.0  # as scripts/devservices.py
KAFKA_VERSION=$(sed -n 's#.*<kafka.version>\(.*\)</kafka.version>.*#\1#p' "$REPO/scripts/kafka/pom.xml")
SHOP_VERSION=0.1.0

root=$MSA_CACHE_DIR/cluster
bin=$root/bin
images=$root/images
PYTHON=${PYTHON:-python3}

log() { printf '[cluster-images] %s\n' "$*" >&2; }

# Temporary directories: under one per run, in the cache (the layers are large), gone on exit.
mkdir -p "$images/rootfs"
work=$(mktemp -d "$images/.work.XXXXXX")
trap 'rm -rf "$work"' EXIT

# short name -> image name; the order is the build order.
declare -A IMAGE=(
    [pause]=registry.k8s.io/pause:3.10.1
    [coredns]=registry.k8s.io/coredns/coredns:${COREDNS_VERSION}
    [local-path]=msa.local/local-path-provisioner:${LOCAL_PATH_VERSION}
    [busybox]=msa.local/busybox:1.36.1
    [python]=msa.local/python:3.11-${SUITE}
    [shop]=msa.local/shop:${SHOP_VERSION}
    [kafka]=msa.local/kafka:${KAFKA_VERSION}
    [postgres]=msa.local/postgres:15-${SUITE}
    [ferretdb]=msa.local/ferretdb:${FERRETDB_VERSION#v}
)
ORDER="pause coredns local-path busybox python shop kafka postgres ferretdb"

# The OCI writer: deterministic layer tarballs from a directory (or from what a directory changed
# on top of a base layer), and an image archive (oci-layout) from layers and a config.
OCI_TOOL=$(cat <<'PY'
import datetime, hashlib, io, json, os, struct, sys, tarfile

EPOCH = int(os.environ["SOURCE_DATE_EPOCH"])
# Files with an mtime at or after this were made by the build (dated EPOCH); older ones come
# from packages and keep their mtime (Python's .pyc files check it).
START = int(os.environ.get("BUILD_START", "0"))


def walk(root, rel=""):
    full = os.path.join(root, rel)
    for name in sorted(os.listdir(full)):
        path = os.path.join(rel, name) if rel else name
        yield path
        if os.path.isdir(os.path.join(root, path)) and not os.path.islink(os.path.join(root, path)):
            yield from walk(root, path)


def info(tar, root, rel):
    ti = tar.gettarinfo(os.path.join(root, rel), arcname=rel)
    if ti is None:  # sockets
        return None, None
    ti.mode &= 0o7777  # as a tar header holds it
    raw = (ti.type, ti.mode, ti.uid, ti.gid, ti.size, int(ti.mtime), ti.linkname)
    ti.mtime = EPOCH if int(ti.mtime) >= START else int(ti.mtime)
    ti.uname = ti.gname = ""
    return ti, raw


def add(tar, root, ti):
    if ti.isreg():
        with open(os.path.join(root, ti.name), "rb") as f:
            tar.addfile(ti, f)
    else:
        tar.addfile(ti)


def layer(root, out):
    with tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as tar:
        for rel in walk(root):
            ti, _ = info(tar, root, rel)
            if ti is not None:
                add(tar, root, ti)


def layer_diff(base_tar, root, out):
    base = {}
    with tarfile.open(base_tar) as t:
        for m in t:
            base[m.name.rstrip("/")] = (m.type, m.mode, m.uid, m.gid, m.size, int(m.mtime), m.linkname)
    present = set(walk(root))
    entries = sorted(present | {p for p in base if p not in present and os.path.dirname(p) in present | {""}},
                     key=lambda p: p.split("/"))
    with tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as tar:
        for rel in entries:
            if rel not in present:  # deleted: a whiteout
                ti = tarfile.TarInfo(os.path.join(os.path.dirname(rel), ".wh." + os.path.basename(rel)))
                ti.mtime = EPOCH
                tar.addfile(ti)
                continue
            ti, raw = info(tar, root, rel)
            if ti is not None and base.get(rel) != raw:
                add(tar, root, ti)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def image(out, name, spec_json, *layers):
    spec = json.loads(spec_json)
    created = datetime.datetime.fromtimestamp(EPOCH, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    digests = [(sha256(p), os.path.getsize(p), p) for p in layers]
    config = {
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": spec,
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + d for d, _, _ in digests]},
        "history": [{"created": created, "created_by": "scripts/lib/cluster-images.sh " + os.path.basename(p)}
                    for _, _, p in digests],
    }
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": "sha256:" + hashlib.sha256(config_bytes).hexdigest(), "size": len(config_bytes)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": "sha256:" + d, "size": s}
                   for d, s, _ in digests],
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": manifest["mediaType"],
                       "digest": "sha256:" + hashlib.sha256(manifest_bytes).hexdigest(),
                       "size": len(manifest_bytes),
                       "annotations": {"io.containerd.image.name": name,
                                       "org.opencontainers.image.ref.name": name}}],
    }
    blobs = {"sha256:" + hashlib.sha256(b).hexdigest(): b for b in (config_bytes, manifest_bytes)}
    files = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}',
             "index.json": json.dumps(index, sort_keys=True, separators=(",", ":")).encode()}
    for digest, data in blobs.items():
        files["blobs/sha256/" + digest[7:]] = data
    paths = {"blobs/sha256/" + d: p for d, _, p in digests}
    with tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as tar:
        for dirname in ("blobs", "blobs/sha256"):
            ti = tarfile.TarInfo(dirname)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, EPOCH
            tar.addfile(ti)
        for arcname in sorted(set(files) | set(paths)):
            ti = tarfile.TarInfo(arcname)
            ti.mode, ti.mtime = 0o644, EPOCH
            if arcname in paths:
                ti.size = os.path.getsize(paths[arcname])
                with open(paths[arcname], "rb") as f:
                    tar.addfile(ti, f)
            else:
                ti.size = len(files[arcname])
                tar.addfile(ti, io.BytesIO(files[arcname]))
    print(index["manifests"][0]["digest"])


def jks_pin(path, password="changeit"):
    """Dates every entry of a JKS trust store (the JDK's cacerts) EPOCH, and signs it again."""
    data = bytearray(open(path, "rb").read())
    magic, version, count = struct.unpack_from(">III", data, 0)
    assert magic == 0xFEEDFEED and version == 2, "not a JKS v2 key store"
    pos = 12
    for _ in range(count):
        (tag,) = struct.unpack_from(">I", data, pos)
        assert tag == 2, "only trusted certificates expected"
        (alias_len,) = struct.unpack_from(">H", data, pos + 4)
        pos += 6 + alias_len
        struct.pack_into(">Q", data, pos, EPOCH * 1000)
        (type_len,) = struct.unpack_from(">H", data, pos + 8)
        pos += 10 + type_len
        (cert_len,) = struct.unpack_from(">I", data, pos)
        pos += 4 + cert_len
    assert len(data) == pos + 20
    data[pos:] = hashlib.sha1(password.encode("utf-16-be") + b"Mighty Aphrodite" + bytes(data[:pos])).digest()
    with open(path, "wb") as f:
        f.write(data)


def manifest_digest(archive):
    with tarfile.open(archive) as tar:
        index = json.load(tar.extractfile("index.json"))
    print(index["manifests"][0]["digest"])


{"layer": layer, "layer-diff": layer_diff, "image": image, "jks-pin": jks_pin,
 "manifest-digest": manifest_digest}[sys.argv[1]](*sys.argv[2:])
PY
)
oci() { "$PYTHON" -c "$OCI_TOOL" "$@"; }

hash_of() { sha256sum | cut -c1-16; }
# Keys include the code that makes the thing (bash prints a function's body), not the whole
# script: editing one recipe rebuilds only what it makes.
code_of() { { echo "$OCI_TOOL"; declare -f "$@"; } | hash_of; }

# The cache key of an image (of its inputs, once prepare_inputs made them).
key_of() {
    local short=$1
    case $short in
        pause) sha256sum < "$bin/pause-$K8S_VERSION" ;;
        coredns) sha256sum < "$bin/coredns-$COREDNS_VERSION" ;;
        local-path) sha256sum < "$bin/local-path-provisioner-$LOCAL_PATH_VERSION" ;;
        busybox) code_of build_busybox_layer ;;
        python) base_key; echo "$PYTHON_SPEC" ;;
        kafka) basename "$(variant_path kafka)"; echo "$KAFKA_VERSION"; sha256sum < "$REPO/scripts/kafka/pom.xml"
               code_of kafka_libs write_kafka_scripts ;;
        postgres) basename "$(variant_path postgres)"; code_of write_postgres_entrypoint ;;
        ferretdb) sha256sum < "$MSA_CACHE_DIR/bin/ferretdb-$FERRETDB_VERSION"; code_of build_busybox_layer ferretdb_binary ;;
        shop) base_key; echo "$PYTHON_SPEC"
              (cd "$REPO" && find Dockerfile .dockerignore pyproject.toml README.md framework example_shop \
                  -type f -not -path '*/__pycache__/*' -not -name '*.py[cod]' -not -path '*.egg-info/*' \
                  -print0 | sort -z | xargs -0 sha256sum) ;;
    esac 2>&1 | { cat; code_of "image_${short//-/_}" write_image files_layer; } | hash_of
}

archive_of() { # short -> path of its archive for the current inputs
    local name=${IMAGE[$1]}
    name=${name##*/}
    echo "$images/${name/:/-}-$(key_of "$1").tar"
}

# --- the Debian rootfs ------------------------------------------------------------------------

# Removes what would make the tree differ between two runs, or is of no use in an image.
scrub_rootfs() { # dir
    local d=$1
    rm -rf "$d"/var/cache/apt/archives/*.deb "$d"/var/cache/apt/*.bin "$d"/var/lib/apt/lists/* \
        "$d"/var/log/* "$d"/var/cache/ldconfig/aux-cache "$d"/var/cache/debconf/*-old \
        "$d"/var/lib/dpkg/*-old "$d"/tmp/* "$d"/var/tmp/* "$d"/root/.cache "$d"/usr/sbin/policy-rc.d \
        "$d"/etc/ssh/ssh_host_* "$d"/etc/ssl/private/ssl-cert-snakeoil.key "$d"/etc/ssl/certs/ssl-cert-snakeoil.pem
    find "$d/dev" -mindepth 1 -delete
    rm -f "$d/etc/shadow-" "$d/etc/passwd-" "$d/etc/group-" "$d/etc/gshadow-"
    # The host's (debootstrap copies them): the container runtime mounts its own over them.
    local f
    for f in resolv.conf hostname machine-id; do
        [ ! -s "$d/etc/$f" ] || : > "$d/etc/$f"
    done
    # shadow's "last change" fields count days since 1970: pin them.
    sed -i -E 's/^([^:]*:[^:]*:)[0-9]+:/\1'$((SOURCE_DATE_EPOCH / 86400))':/' "$d/etc/shadow"
}

# Runs a command chrooted into dir, with /proc, the host's /dev and its resolv.conf mounted in a
# private mount namespace (gone when it exits, leaving the tree as it was).
in_chroot() { # dir command...
    local d=$1; shift
    unshare --mount --propagation private -- sh -c \
        'mount -t proc proc "$0/proc" && mount --rbind /dev "$0/dev" && mount --bind /etc/resolv.conf "$0/etc/resolv.conf" && exec chroot "$0" "$@"' \
        "$d" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 \
        SOURCE_DATE_EPOCH="$SOURCE_DATE_EPOCH" "$@"
}

# The base layer: debootstrap minbase + python3, python3-venv, ca-certificates, and `python`
# where the official python image has it. Cached as the layer tarball itself.
base_key() { { echo "$SUITE $MIRROR $BASE_PACKAGES"; code_of build_base scrub_rootfs; } | hash_of; }
BASE_TAR=""
build_base() {
    BASE_TAR=$images/rootfs/$SUITE-base-$(base_key).tar
    [ -f "$BASE_TAR" ] && return 0
    log "debootstrap $SUITE (+ $BASE_PACKAGES)"
    local tmp start
    tmp=$(mktemp -d "$work/XXXXXX")
    start=$(date +%s)
    debootstrap --variant=minbase --include="$BASE_PACKAGES" --components=main \
        "$SUITE" "$tmp/root" "$MIRROR" > "$tmp/debootstrap.log" 2>&1 \
        || { tail -20 "$tmp/debootstrap.log" >&2; exit 1; }
    local r=$tmp/root
    printf '#!/bin/sh\nexit 101\n' > "$r/usr/sbin/policy-rc.d"  # no daemons start in later chroots
    chmod 755 "$r/usr/sbin/policy-rc.d"
    # No recommends, no docs or man pages in variants either.
    printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' > "$r/etc/apt/apt.conf.d/90msa-no-recommends"
    printf 'path-exclude /usr/share/doc/*\npath-include /usr/share/doc/*/copyright\npath-exclude /usr/share/man/*\npath-exclude /usr/share/locale/*\npath-exclude /usr/share/info/*\n' \
        > "$r/etc/dpkg/dpkg.cfg.d/90msa-nodoc"
    rm -rf "$r"/usr/share/man/* "$r"/usr/share/info/* "$r"/usr/share/locale/*
    find "$r/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    ln -s /usr/bin/python3 "$r/usr/local/bin/python"
    ln -s /usr/bin/python3 "$r/usr/local/bin/python3"
    ln -s /usr/bin/python3.11 "$r/usr/local/bin/python3.11"
    scrub_rootfs "$r"
    BUILD_START=$start oci layer "$r" "$tmp/base.tar"
    mv "$tmp/base.tar" "$BASE_TAR"
    rm -rf "$tmp"
}

# The layers on top of the base: packages, then a shell snippet run in the chroot.
declare -A VARIANT_PACKAGES=([kafka]=$KAFKA_PACKAGES [postgres]=$POSTGRES_PACKAGES)
declare -A VARIANT_SETUP=(
    [kafka]="groupadd --system --gid 10001 kafka && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin kafka"
    # The package's own cluster (/etc/postgresql, /var/lib/postgresql/15) is not used here.
    [postgres]="rm -rf /etc/postgresql/15 /var/lib/postgresql/15 && mkdir -p /var/run/postgresql && chmod 3777 /var/run/postgresql && mkdir -p /var/lib/postgresql/data && chmod 1777 /var/lib/postgresql/data"
)
variant_path() { # name
    local key
    key=$({ base_key; echo "${VARIANT_PACKAGES[$1]} ${VARIANT_SETUP[$1]}"; code_of variant_layer in_chroot; } | hash_of)
    echo "$images/rootfs/$SUITE-$1-$key.tar"
}

variant_layer() { # name -> prints the layer path
    local name=$1 packages=${VARIANT_PACKAGES[$1]} script=${VARIANT_SETUP[$1]} out
    out=$(variant_path "$name")
    if [ ! -f "$out" ]; then
        log "$name layer: apt-get install $packages"
        local tmp start
        tmp=$(mktemp -d "$work/XXXXXX")
        mkdir "$tmp/root"
        tar -C "$tmp/root" --numeric-owner -xpf "$BASE_TAR"
        start=$(date +%s)
        printf '#!/bin/sh\nexit 101\n' > "$tmp/root/usr/sbin/policy-rc.d"
        chmod 755 "$tmp/root/usr/sbin/policy-rc.d"
        mkdir -p "$tmp/root/usr/share/man/man1"  # update-alternatives links man pages (dpkg leaves them out)
        # shellcheck disable=SC2086
        in_chroot "$tmp/root" sh -c "apt-get update -qq && apt-get install -y -qq $packages && apt-get clean && $script" \
            > "$tmp/apt.log" 2>&1 || { tail -30 "$tmp/apt.log" >&2; exit 1; }
        scrub_rootfs "$tmp/root"
        # The JDK's trust store dates its entries: pinned, so that two builds give one layer.
        [ ! -f "$tmp/root/etc/ssl/certs/java/cacerts" ] || oci jks-pin "$tmp/root/etc/ssl/certs/java/cacerts"
        BUILD_START=$start oci layer-diff "$BASE_TAR" "$tmp/root" "$tmp/layer.tar"
        mv "$tmp/layer.tar" "$out"
        rm -rf "$tmp"
    fi
    echo "$out"
}

# --- small layers -----------------------------------------------------------------------------

# busybox-static from the mirror, with its applet links, an /etc/passwd and a /tmp.
busybox_path() {
    echo "$images/rootfs/$SUITE-busybox-$({ echo "$SUITE $MIRROR busybox-static"; code_of build_busybox_layer; } | hash_of).tar"
}
BUSYBOX_TAR=""
build_busybox_layer() {
    BUSYBOX_TAR=$(busybox_path)
    [ -f "$BUSYBOX_TAR" ] && return 0
    log "busybox layer"
    local tmp
    tmp=$(mktemp -d "$work/XXXXXX")
    mkdir -p "$tmp/root"
    # apt in a throwaway directory tree (no chroot needed): just download the package.
    mkdir -p "$tmp/apt/lists/partial" "$tmp/apt/archives/partial"
    local aptopts=(-o "Dir::State::Lists=$tmp/apt/lists" -o "Dir::Cache::Archives=$tmp/apt/archives"
        -o "Dir::Cache=$tmp/apt" -o "Dir::Etc::SourceList=$tmp/apt/sources.list" -o "Dir::Etc::SourceParts=-"
        -o "Dir::State::Status=/dev/null" -o "Debug::NoLocking=1")
    echo "deb $MIRROR $SUITE main" > "$tmp/apt/sources.list"
    apt-get "${aptopts[@]}" update -qq > "$tmp/apt.log" 2>&1 || { cat "$tmp/apt.log" >&2; exit 1; }
    (cd "$tmp" && apt-get "${aptopts[@]}" download busybox-static >> "$tmp/apt.log" 2>&1) || { cat "$tmp/apt.log" >&2; exit 1; }
    dpkg-deb -x "$tmp"/busybox-static_*.deb "$tmp/deb"
    local r=$tmp/root
    mkdir -p "$r/bin" "$r/etc" "$r/tmp" "$r/root" "$r/var" "$r/usr/bin" "$r/usr/sbin" "$r/sbin"
    chmod 1777 "$r/tmp"
    cp "$tmp/deb/bin/busybox" "$r/bin/busybox"
    local applet
    for applet in $("$r/bin/busybox" --list-full); do
        [ "$applet" = bin/busybox ] || ln -sf /bin/busybox "$r/$applet"
    done
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$r/etc/passwd"
    printf 'root:x:0:\nnobody:x:65534:\n' > "$r/etc/group"
    find "$r" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
    BUILD_START=0 oci layer "$r" "$tmp/busybox.tar"
    mv "$tmp/busybox.tar" "$BUSYBOX_TAR"
    rm -rf "$tmp"
}

# A layer holding given files: dest=source pairs (dest relative to /, mode from the source).
files_layer() { # out dest=src...
    local out=$1; shift
    local tmp pair
    tmp=$(mktemp -d "$work/XXXXXX")
    for pair in "$@"; do
        mkdir -p "$tmp/root/$(dirname "${pair%%=*}")"
        cp -a "${pair#*=}" "$tmp/root/${pair%%=*}"
    done
    chown -R 0:0 "$tmp/root"
    BUILD_START=0 oci layer "$tmp/root" "$out"
    rm -rf "$tmp"
}

# --- the images -------------------------------------------------------------------------------

need_bin() { # file what-builds-it
    [ -x "$1" ] || bash "$REPO/scripts/lib/cluster-build.sh" "$2"
}

# image out name spec layers...: writes the archive atomically.
write_image() {
    local out=$1 name=$2 spec=$3; shift 3
    oci image "$out.partial" "$name" "$spec" "$@" > /dev/null
    mv "$out.partial" "$out"
}

image_pause() {
    local f=$bin/pause-$K8S_VERSION tmp
    need_bin "$f" pause
    tmp=$(mktemp -d "$work/XXXXXX"); files_layer "$tmp/l.tar" "pause=$f"
    write_image "$1" "${IMAGE[pause]}" '{"Entrypoint":["/pause"],"User":"65535:65535"}' "$tmp/l.tar"
    rm -rf "$tmp"
}

image_coredns() {
    local f=$bin/coredns-$COREDNS_VERSION tmp
    need_bin "$f" coredns
    tmp=$(mktemp -d "$work/XXXXXX"); files_layer "$tmp/l.tar" "coredns=$f"
    write_image "$1" "${IMAGE[coredns]}" '{"Entrypoint":["/coredns"],"ExposedPorts":{"53/tcp":{},"53/udp":{}}}' "$tmp/l.tar"
    rm -rf "$tmp"
}

image_local_path() {
    local f=$bin/local-path-provisioner-$LOCAL_PATH_VERSION tmp
    need_bin "$f" local-path
    tmp=$(mktemp -d "$work/XXXXXX"); files_layer "$tmp/l.tar" "usr/bin/local-path-provisioner=$f"
    write_image "$1" "${IMAGE[local-path]}" '{"Entrypoint":["/usr/bin/local-path-provisioner"]}' "$tmp/l.tar"
    rm -rf "$tmp"
}

image_busybox() {
    build_busybox_layer
    write_image "$1" "${IMAGE[busybox]}" '{"Cmd":["sh"],"Env":["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]}' "$BUSYBOX_TAR"
}

PYTHON_SPEC='{"Cmd":["python3"],"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin","LANG=C.UTF-8"]}'
image_python() {
    build_base
    write_image "$1" "${IMAGE[python]}" "$PYTHON_SPEC" "$BASE_TAR"
}

# The repo's Dockerfile with buildah (chroot isolation, vfs storage in the cache), on the python image.
image_shop() {
    local base
    base=$(archive_of python)
    [ -f "$base" ] || build_one python
    local store=$images/buildah tmp
    tmp=$(mktemp -d "$work/XXXXXX")
    local b=(buildah --root "$store/root" --runroot "$tmp/run" --storage-driver vfs)
    "${b[@]}" pull -q "oci-archive:$base" > /dev/null  # named by the archive's ref.name
    # pip inside the build verifies PyPI with the host's CA bundle (which may hold a proxy's CA).
    local ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
    "${b[@]}" bud --isolation chroot --pull=never --layers=false \
        --build-arg "BASE=${IMAGE[python]}" \
        --volume "$ca:/etc/ssl/certs/ca-certificates.crt:ro" \
        -t "${IMAGE[shop]}" -f "$REPO/Dockerfile" "$REPO" > "$tmp/bud.log" 2>&1 \
        || { tail -40 "$tmp/bud.log" >&2; exit 1; }
    rm -f "$1.partial"
    "${b[@]}" push -q --disable-compression "${IMAGE[shop]}" "oci-archive:$1.partial:${IMAGE[shop]}" > /dev/null
    "${b[@]}" rmi -a -f > /dev/null 2>&1 || true
    mv "$1.partial" "$1"
    rm -rf "$tmp"
}

# apache/kafka's layout where the manifests use it: /opt/kafka/bin/*.sh and /opt/kafka/libs.
kafka_libs() {
    local libs=$MSA_CACHE_DIR/kafka/$KAFKA_VERSION/libs  # shared with scripts/devservices.py
    if [ ! -f "$libs/.complete" ]; then
        log "kafka $KAFKA_VERSION jars from Maven Central"
        rm -rf "$libs.partial"
        mvn -q -B -f "$REPO/scripts/kafka/pom.xml" dependency:copy-dependencies -DincludeScope=runtime \
            "-DoutputDirectory=$libs.partial"
        echo "$KAFKA_VERSION" > "$libs.partial/.complete"
        rm -rf "$libs"; mv "$libs.partial" "$libs"
    fi
    # kafka-topics.sh's TopicCommand: kafka-tools alone, without its Kafka Connect dependencies.
    local tools=$MSA_CACHE_DIR/kafka/$KAFKA_VERSION/tools
    if [ ! -f "$tools/.complete" ]; then
        rm -rf "$tools.partial"
        mvn -q -B dependency:copy "-Dartifact=org.apache.kafka:kafka-tools:$KAFKA_VERSION" "-DoutputDirectory=$tools.partial"
        echo "$KAFKA_VERSION" > "$tools.partial/.complete"
        rm -rf "$tools"; mv "$tools.partial" "$tools"
    fi
}

write_kafka_scripts() { # dir
    local d=$1
    mkdir -p "$d"
    cat > "$d/kafka-run-class.sh" <<'SH'
#!/bin/bash
# kafka-run-class.sh [-name NAME] [-daemon] [-loggc] CLASS [ARGS]: CLASS on Kafka's classpath, in
# the foreground, logging to stdout (slf4j-simple; KAFKA_LOG4J_OPTS is passed on but unused).
while [ $# -gt 0 ]; do
    case $1 in
        -name) shift 2 ;;
        -daemon | -loggc) shift ;;
        *) break ;;
    esac
done
base=${KAFKA_HOME:-/opt/kafka}
# The broker logs at INFO; command-line tools (kafka-topics.sh...) only warnings, as Kafka's own.
level=warn
[ "${1:-}" = kafka.Kafka ] && level=info
# shellcheck disable=SC2086
exec java ${KAFKA_HEAP_OPTS:--Xmx256M} ${KAFKA_JVM_PERFORMANCE_OPTS:--XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExplicitGCInvokesConcurrent} \
    -Djava.awt.headless=true -Dorg.slf4j.simpleLogger.logFile=System.out -Dorg.slf4j.simpleLogger.showDateTime=true \
    -Dorg.slf4j.simpleLogger.defaultLogLevel=$level \
    ${KAFKA_LOG4J_OPTS:-} ${KAFKA_OPTS:-} -cp "${CLASSPATH:+$CLASSPATH:}$base/libs/*" "$@"
SH
    local script class
    for script in kafka-storage.sh=kafka.tools.StorageTool kafka-topics.sh=org.apache.kafka.tools.TopicCommand \
        kafka-server-start.sh=kafka.Kafka; do
        class=${script#*=}
        printf '#!/bin/bash\n# Runs %s (see kafka-run-class.sh).\nexec "$(dirname "$0")/kafka-run-class.sh" %s "$@"\n' \
            "$class" "$class" > "$d/${script%%=*}"
    done
    chmod 755 "$d"/*.sh
}

image_kafka() {
    build_base
    kafka_libs
    local debs tmp
    debs=$(variant_layer kafka)
    tmp=$(mktemp -d "$work/XXXXXX")
    mkdir -p "$tmp/root/opt/kafka/libs" "$tmp/root/var/lib/kafka/data"
    cp "$MSA_CACHE_DIR/kafka/$KAFKA_VERSION"/libs/*.jar "$MSA_CACHE_DIR/kafka/$KAFKA_VERSION/tools/kafka-tools-$KAFKA_VERSION.jar" "$tmp/root/opt/kafka/libs/"
    write_kafka_scripts "$tmp/root/opt/kafka/bin"
    chown -R 0:0 "$tmp/root"
    chown 10001:10001 "$tmp/root/var/lib/kafka/data"
    BUILD_START=0 oci layer "$tmp/root" "$tmp/kafka.tar"
    write_image "$1" "${IMAGE[kafka]}" \
        '{"User":"10001:10001","WorkingDir":"/opt/kafka","Env":["PATH=/opt/kafka/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin","LANG=C.UTF-8","KAFKA_HOME=/opt/kafka"],"ExposedPorts":{"9092/tcp":{}},"Cmd":["/bin/bash"]}' \
        "$BASE_TAR" "$debs" "$tmp/kafka.tar"
    rm -rf "$tmp"
}

write_postgres_entrypoint() { # file
    cat > "$1" <<'SH'
#!/bin/bash
# The official postgres image's entrypoint, for what this project uses: on an empty $PGDATA it
# runs initdb (superuser $POSTGRES_USER, default postgres, password $POSTGRES_PASSWORD), then
# /docker-entrypoint-initdb.d/*.sh and *.sql against a temporary server on the Unix socket only;
# then it execs postgres on all addresses with scram-sha-256 for host connections. Any UID: one
# without a passwd entry gets one through nss_wrapper; root hands over to the postgres user.
set -Eeuo pipefail

if [ $# -eq 0 ] || [ "${1:0:1}" = - ]; then
    set -- postgres "$@"
fi
[ "$1" = postgres ] || exec "$@"

export PGDATA=${PGDATA:-/var/lib/postgresql/data}
export POSTGRES_USER=${POSTGRES_USER:-postgres}
POSTGRES_DB=${POSTGRES_DB:-$POSTGRES_USER}

if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA"
    chown -R postgres:postgres "$PGDATA"
    exec setpriv --reuid postgres --regid postgres --init-groups "$0" "$@"
fi

if ! getent passwd "$(id -u)" > /dev/null; then
    wrapper=$(mktemp -d /tmp/nss_wrapper.XXXXXX)
    { cat /etc/passwd; echo "postgres:x:$(id -u):$(id -g):PostgreSQL:$PGDATA:/bin/false"; } > "$wrapper/passwd"
    { cat /etc/group; getent group "$(id -g)" > /dev/null || echo "postgres:x:$(id -g):"; } > "$wrapper/group"
    export LD_PRELOAD=libnss_wrapper.so NSS_WRAPPER_PASSWD=$wrapper/passwd NSS_WRAPPER_GROUP=$wrapper/group
fi

mkdir -p "$PGDATA"
chmod 700 "$PGDATA" 2> /dev/null || true

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    : "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD must be set to initialise the database}"
    initdb --username="$POSTGRES_USER" --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD") \
        --auth-local=trust --auth-host=scram-sha-256 ${POSTGRES_INITDB_ARGS:-}
    echo "listen_addresses = '*'" >> "$PGDATA/postgresql.conf"
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"

    pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start
    if [ "$POSTGRES_DB" != postgres ]; then
        psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres -c "create database \"$POSTGRES_DB\""
    fi
    for f in /docker-entrypoint-initdb.d/*; do
        case $f in
            *.sh)
                if [ -x "$f" ]; then
                    echo "$0: running $f"; "$f"
                else
                    echo "$0: sourcing $f"; . "$f"
                fi ;;
            *.sql) echo "$0: running $f"; psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" -f "$f" ;;
            *) [ -e "$f" ] && echo "$0: ignoring $f" ;;
        esac
    done
    pg_ctl -D "$PGDATA" -m fast -w stop
    echo "$0: PostgreSQL init process complete; ready for start up."
fi

exec "$@"
SH
    chmod 755 "$1"
}

image_postgres() {
    build_base
    local debs tmp
    debs=$(variant_layer postgres)
    tmp=$(mktemp -d "$work/XXXXXX")
    mkdir -p "$tmp/root/usr/local/bin" "$tmp/root/docker-entrypoint-initdb.d"
    write_postgres_entrypoint "$tmp/root/usr/local/bin/docker-entrypoint.sh"
    chown -R 0:0 "$tmp/root"
    BUILD_START=0 oci layer "$tmp/root" "$tmp/entry.tar"
    write_image "$1" "${IMAGE[postgres]}" \
        '{"Entrypoint":["docker-entrypoint.sh"],"Cmd":["postgres"],"Env":["PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin","LANG=C.UTF-8","PGDATA=/var/lib/postgresql/data"],"ExposedPorts":{"5432/tcp":{}},"StopSignal":"SIGINT"}' \
        "$BASE_TAR" "$debs" "$tmp/entry.tar"
    rm -rf "$tmp"
}

# FerretDB as scripts/devservices.py builds it (same binary, same place, so each reuses the other's).
ferretdb_binary() {
    local out=$MSA_CACHE_DIR/bin/ferretdb-$FERRETDB_VERSION
    if [ ! -x "$out" ]; then
        log "FerretDB $FERRETDB_VERSION with Go"
        local src tmp
        tmp=$(mktemp -d "$work/XXXXXX")
        # Go's caches as scripts/lib/cluster-build.sh keeps them, in the project cache.
        export GOPATH=$MSA_CACHE_DIR/go GOCACHE=$MSA_CACHE_DIR/go/build-cache GOMODCACHE=$MSA_CACHE_DIR/go/mod GOTOOLCHAIN=local
        src=$(cd "$tmp" && GOFLAGS=-mod=mod go mod download -json "github.com/FerretDB/FerretDB@$FERRETDB_VERSION" \
            | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
        cp -r "$src" "$tmp/src"
        chmod -R u+w "$tmp/src"
        # The module lacks the version file FerretDB's release process writes (see devservices.py).
        echo "$FERRETDB_VERSION" > "$tmp/src/build/version/version.txt"
        (cd "$tmp/src" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -o "$tmp/ferretdb" ./cmd/ferretdb)
        mkdir -p "$(dirname "$out")"
        mv "$tmp/ferretdb" "$out"
        rm -rf "$tmp"
    fi
    echo "$out"
}

image_ferretdb() {
    build_busybox_layer
    local f tmp
    f=$(ferretdb_binary)
    tmp=$(mktemp -d "$work/XXXXXX")
    mkdir -p "$tmp/root/state"
    cp "$f" "$tmp/root/ferretdb"
    chmod 755 "$tmp/root/ferretdb"
    chmod 1777 "$tmp/root/state"
    chown -R 0:0 "$tmp/root"
    BUILD_START=0 oci layer "$tmp/root" "$tmp/ferretdb.tar"
    write_image "$1" "${IMAGE[ferretdb]}" \
        '{"Entrypoint":["/ferretdb"],"WorkingDir":"/","Env":["PATH=/usr/sbin:/usr/bin:/sbin:/bin","FERRETDB_LISTEN_ADDR=:27017","FERRETDB_HANDLER=sqlite","FERRETDB_STATE_DIR=/state","FERRETDB_SQLITE_URL=file:/state/"],"ExposedPorts":{"27017/tcp":{}}}' \
        "$BUSYBOX_TAR" "$tmp/ferretdb.tar"
    rm -rf "$tmp"
}

# --- subcommands ------------------------------------------------------------------------------

# Inputs made by other tools come first: the keys hash them.
prepare_inputs() { # short
    case $1 in
        pause) need_bin "$bin/pause-$K8S_VERSION" pause ;;
        coredns) need_bin "$bin/coredns-$COREDNS_VERSION" coredns ;;
        local-path) need_bin "$bin/local-path-provisioner-$LOCAL_PATH_VERSION" local-path ;;
        kafka) kafka_libs ;;
        ferretdb) ferretdb_binary > /dev/null ;;
    esac
}

build_one() {
    local short=$1 began=$SECONDS out
    prepare_inputs "$short"
    out=$(archive_of "$short")
    if [ ! -f "$out" ]; then
        "image_${short//-/_}" "$images/partial-$short.tar"
        mv "$images/partial-$short.tar" "$out"
    fi
    log "$(printf '%-45s %4ss  %s' "${IMAGE[$short]}" $((SECONDS - began)) "$out")"
}

cmd_build() {
    local what=${*:-$ORDER} short
    for short in $what; do
        [ -n "${IMAGE[$short]:-}" ] || { log "unknown image: $short (one of: $ORDER)"; exit 2; }
        build_one "$short"
    done
    # Archives and layers of older inputs are dropped.
    local keep=() f
    for short in $ORDER; do keep+=("$(archive_of "$short")"); done
    keep+=("$images/rootfs/$SUITE-base-$(base_key).tar" "$(busybox_path)" "$(variant_path kafka)" "$(variant_path postgres)")
    for f in "$images"/*-????????????????.tar "$images"/rootfs/*-????????????????.tar; do
        [ -e "$f" ] || continue
        [[ " ${keep[*]} " == *" $f "* ]] || rm -f "$f"
    done
}

cmd_list() {
    local short
    for short in $ORDER; do printf '%s\t%s\n' "${IMAGE[$short]}" "$(archive_of "$short")"; done
}

cmd_load() {
    local address=${1:?usage: cluster-images.sh load <containerd-address>}
    local ctr=(ctr -a "$address" -n k8s.io) short archive digest present missing=0
    present=$("${ctr[@]}" images ls 2> /dev/null | awk 'NR > 1 {print $1, $3}')
    for short in $ORDER; do
        archive=$(archive_of "$short")
        if [ ! -f "$archive" ]; then
            log "not built: ${IMAGE[$short]} (run: $0 build)"
            missing=1
            continue
        fi
        digest=$(oci manifest-digest "$archive")
        if grep -qxF "${IMAGE[$short]} $digest" <<< "$present"; then
            log "${IMAGE[$short]}: present"
            continue
        fi
        local began=$SECONDS
        "${ctr[@]}" images import --snapshotter overlayfs "$archive" > /dev/null
        log "${IMAGE[$short]}: imported ($((SECONDS - began))s)"
    done
    return $missing
}

case ${1:-} in
    build) shift; cmd_build "$@" ;;
    load) shift; cmd_load "$@" ;;
    list) cmd_list ;;
    *) sed -n '2,10p' "${BASH_SOURCE[0]}" >&2; exit 2 ;;
esac
