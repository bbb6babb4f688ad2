# Sourced by scripts/devservices, scripts/shop, scripts/test and scripts/validate-k8s: makes sure the
# project venv exists and holds the framework (`.[all,dev]`) and the example shop (`./example_shop`,
# its own distribution), both editable, and installs the other tools the suite uses (chromium, the
# Kubernetes validators). Everything downloaded is cached outside the clone (CI clones afresh every
# run), and every tool is installed here, before any test runs: a test never downloads.
#
#   MSA_CACHE_DIR  cache for tools, jars and binaries   (default: ~/.cache/msa-framework)
#   MSA_VENV       the project's virtualenv              (default: <repo>/.venv)
#   MSA_PYTHON     the interpreter that seeds the venv   (default: python3)

MSA_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export MSA_CACHE_DIR=${MSA_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/msa-framework}
MSA_VENV=${MSA_VENV:-$MSA_REPO/.venv}
MSA_PYTHON=${MSA_PYTHON:-python3}
mkdir -p "$MSA_CACHE_DIR"

msa_log() { printf '[msa] %s\n' "$*" >&2; }

# uv resolves and installs in seconds instead of minutes; it lives in a tools venv in the cache.
msa_uv() {
    local tools=$MSA_CACHE_DIR/tools
    if [ ! -x "$tools/bin/uv" ]; then
        msa_log "installing uv into $tools"
        "$MSA_PYTHON" -m venv "$tools" >&2
        "$tools/bin/python" -m pip install --quiet uv >&2
    fi
    "$tools/bin/uv" "$@"
}

# The stamp is the hash of both project files: a change to either reinstalls both.
msa_ensure_venv() {
    local stamp=$MSA_VENV/.msa-installed want
    want=$(cat "$MSA_REPO/pyproject.toml" "$MSA_REPO/example_shop/pyproject.toml" | sha256sum \
        | cut -d' ' -f1)
    if [ -x "$MSA_VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        return 0
    fi
    msa_log "installing msa-framework[all,dev] and msa-example-shop (editable) into $MSA_VENV"
    [ -x "$MSA_VENV/bin/python" ] || msa_uv venv --quiet --python "$MSA_PYTHON" "$MSA_VENV" >&2
    # One resolution: the shop's `msa-framework[all]` is the editable framework named here.
    msa_uv pip install --quiet --python "$MSA_VENV/bin/python" \
        -e "$MSA_REPO[all,dev]" -e "$MSA_REPO/example_shop" >&2
    echo "$want" > "$stamp"
}

# The storefront's browser test drives Debian's Chromium with Playwright (no browser download).
msa_ensure_chromium() {
    command -v chromium >/dev/null 2>&1 && return 0
    msa_log "installing chromium (Debian package) for the storefront browser test"
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y -q chromium >&2 \
        || { $sudo apt-get update -q >&2 && $sudo apt-get install -y -q chromium >&2; }
}

# checkov and kubernetes-validate (scripts/validate-k8s) live in their own venv in the cache, not in
# the project venv: checkov pins old versions of common packages, and the framework must not run
# on those. The suite runs validate-k8s without a network (unshare -n), so this must come first.
MSA_K8S_TOOLS=$MSA_CACHE_DIR/k8s-tools
msa_ensure_k8s_tools() {
    local tools=$MSA_K8S_TOOLS
    if [ -x "$tools/bin/checkov" ] && [ -x "$tools/bin/kubernetes-validate" ]; then
        return 0
    fi
    msa_log "installing checkov and kubernetes-validate into $tools"
    [ -x "$tools/bin/python" ] || msa_uv venv --quiet --python "$MSA_PYTHON" "$tools" >&2
    msa_uv pip install --quiet --python "$tools/bin/python" \
        "checkov>=3.2" "kubernetes-validate>=1.30" pyyaml >&2
}
