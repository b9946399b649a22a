# One image for every role: `mtaq ingress`, `mtaq worker`, `mtaq exporter`, `mtaq queue`, `mtaq health`.
#
# MTAQ_BASE_IMAGE is any Debian-like image with python3 and its venv module on PATH (the official
# python image, or one made locally where no registry is reachable). Nothing below assumes where
# that image keeps Python. Classic builder syntax only (no BuildKit features), so that
# `docker build` and Debian's docker-compose 1.29 both build it.
ARG MTAQ_BASE_IMAGE=python:3.11-slim

# -- stage 1: every wheel the application needs, built from the source ----------------------------
FROM ${MTAQ_BASE_IMAGE} AS wheels
ENV PYTHONDONTWRITEBYTECODE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python3 -m venv /opt/build
WORKDIR /src
# the whole context (.dockerignore keeps .venv, var and caches out); wheels/ holds wheels made on the host (`pip wheel -w wheels/ . setuptools wheel`) for a build
# without network; with none in it, pip uses the package index as usual
COPY . /src/
RUN if ls wheels/*.whl >/dev/null 2>&1; then \
        echo "installing from wheels/ only (no network)"; \
        set -- --no-index --find-links /src/wheels; \
    fi; \
    /opt/build/bin/pip wheel "$@" --wheel-dir /wheels . \
    && ls /wheels

# -- stage 2: the runtime, no compilers, no build tools, not root ----------------------------------
FROM ${MTAQ_BASE_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    PATH=/opt/mtaq/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
COPY --from=wheels /wheels /tmp/wheels
RUN python3 -m venv /opt/mtaq \
    && /opt/mtaq/bin/pip install --no-index --find-links /tmp/wheels mtaq \
    && rm -rf /tmp/wheels \
    && /opt/mtaq/bin/pip uninstall --yes pip \
    && useradd --system --uid 10025 --user-group --home-dir /var/lib/mtaq --shell /usr/sbin/nologin mtaq \
    && mkdir -p /var/lib/mtaq \
    && chown mtaq:mtaq /var/lib/mtaq
USER mtaq
WORKDIR /var/lib/mtaq
EXPOSE 25 9125
ENTRYPOINT ["mtaq"]
CMD ["ingress"]
