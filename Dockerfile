# syntax=docker/dockerfile:1
# Nox's container image: the API server on Debian's python3, with bubblewrap for the sandboxes.
#
#   docker build -t nox-api .
#   docker run -d --name nox -p 127.0.0.1:8080:8080 -v nox-data:/data \
#       --security-opt seccomp=unconfined --security-opt apparmor=unconfined \
#       --security-opt systempaths=unconfined nox-api
#
# What bubblewrap needs inside a container (user namespaces, the seccomp and AppArmor options, the
# unmasked /proc) and the `unsafe` backend when they are refused: docs/deploy.md, "Container".
#
# Behind a TLS-intercepting proxy, give the build its CA bundle as a secret (only pip and npm read
# it; it stays out of the image): --secret id=ca_bundle,src=/etc/ssl/certs/ca-certificates.crt
ARG BASE_IMAGE=debian:bookworm-slim

# -- 1. assets: the dashboard's front-end files, from ui/package-lock.json (npm ci) ------------
FROM ${BASE_IMAGE} AS assets
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates nodejs npm \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src/ui
COPY ui/package.json ui/package-lock.json ./
RUN --mount=type=secret,id=ca_bundle \
    if [ -s /run/secrets/ca_bundle ]; then export NODE_EXTRA_CA_CERTS=/run/secrets/ca_bundle; fi \
    && npm ci --no-audit --no-fund --loglevel=error
COPY ui/build.mjs ./
# Writes /src/src/nox_api/ui/static/vendor/ (the path the wheel packs).
RUN node build.mjs

# -- 2. build: the wheels of noxsdk, nox-api and every dependency; the server's virtualenv -----
FROM ${BASE_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /build/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY policy ./policy
COPY sdk ./sdk
COPY src ./src
COPY --from=assets /src/src/nox_api/ui/static/vendor ./src/nox_api/ui/static/vendor
# pip's cache mount keeps the downloads between builds (a changed source file rebuilds only
# Nox's own two wheels from the network's point of view).
RUN --mount=type=secret,id=ca_bundle --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
    && /build/venv/bin/pip wheel --prefer-binary --wheel-dir /wheels ./sdk '.[postgres]' \
    && python3 -m venv --without-pip /opt/nox \
    && /build/venv/bin/pip --python /opt/nox/bin/python install --no-index --find-links /wheels \
        'nox-api[postgres]' \
    && /opt/nox/bin/nox-api --help >/dev/null

# -- 3. runtime: Debian's python3, bubblewrap and libseccomp; no compiler, pip, node or npm ----
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="Nox" \
      org.opencontainers.image.description="Runs untrusted Python and shell code in bubblewrap sandboxes behind an HTTP API" \
      org.opencontainers.image.licenses="Apache-2.0"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# tini is PID 1: it forwards SIGTERM to the server and reaps the sandboxes' orphans.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends bubblewrap libseccomp2 python3 tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 nox \
    && useradd --uid 10001 --gid 10001 --no-log-init --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin nox \
    && install -d -o nox -g nox -m 0750 /data
COPY --from=build /opt/nox /opt/nox
ENV PATH=/opt/nox/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NOX_HOST=0.0.0.0 \
    NOX_PORT=8080 \
    NOX_DATA_DIR=/data
# nox (uid and gid 10001), by number so that runtimes can check it is not root.
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('NOX_PORT', '8080') + '/health', timeout=4)"]
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["nox-api", "serve"]
