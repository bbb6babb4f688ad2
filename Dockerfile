# syntax=docker/dockerfile:1
# One image for every shop service; the command picks the service:
#
#   docker build -t msa-framework/shop:0.1.0 .
#   docker run msa-framework/shop:0.1.0 run example_shop.orders:Orders
#   docker run msa-framework/shop:0.1.0 migrate example_shop.orders:Orders
#   docker run msa-framework/shop:0.1.0 gateway --config /etc/gateway/web.yaml
#
# Two distributions from this repository go in: the framework (pyproject.toml, `msa-framework`,
# with every integration: `all`) and the shop (example_shop/pyproject.toml, `msa-example-shop`,
# which requires `msa-framework[all]` - the one built here - and brings `msa shop` with its
# embedded PostgreSQL server, in-memory MongoDB engine and Locust).
# Both stages use the same pinned base, BASE: the venv's interpreter links to the base's python
# (/usr/local/bin/python), so the runtime stage must have it where the builder had it. Another
# base with python 3.11 at that path works too: scripts/lib/cluster-images.sh builds this file
# with buildah on its Debian-built msa.local/python:3.11-bookworm.
ARG BASE=python:3.11.11-slim-bookworm

FROM ${BASE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
# Only what the two wheels need (hatchling reads each pyproject.toml, and the framework's README.md).
COPY pyproject.toml README.md ./
COPY framework ./framework
COPY example_shop ./example_shop
RUN /opt/venv/bin/pip install "./[all]" ./example_shop \
 && /opt/venv/bin/python -m compileall -q /opt/venv/lib

FROM ${BASE} AS runtime
# Fixed, high, non-root UID/GID: Kubernetes' runAsUser/fsGroup use the same numbers.
RUN groupadd --system --gid 10001 msa \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin msa
COPY --from=builder /opt/venv /opt/venv
# The gateway profiles, so `gateway --config /etc/gateway/web.yaml` works with the image alone.
COPY example_shop/gateway/*.yaml /etc/gateway/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    MSA_HTTP_PORT=8080 \
    MSA_LOG_FORMAT=json
# A read-only root filesystem works: bytecode is compiled above, temp files go to /tmp.
WORKDIR /tmp
USER 10001:10001
EXPOSE 8080
# /alive has no dependency checks (see framework.service), so a slow database never restarts us.
# The gateway has no /alive: compose.yaml gives it a TCP check instead.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('MSA_HTTP_PORT', '8080') + '/alive', timeout=2)"]
ENTRYPOINT ["msa"]
CMD ["run", "example_shop.storefront:Storefront"]
