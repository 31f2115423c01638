# kvd container image.
#
#   docker build -t kvd .                    # the server (stage "runtime", the default)
#   docker build --target test -t kvd-test . # the test suite (stage "test")
#
# Both stages share "base": the runtime pins from requirements.txt, then the
# package itself with --no-deps, so the image runs exactly the pinned set.
# tests/test_docker.py replays base's COPY and pip lines in a fresh venv and
# runs this file's CMD and HEALTHCHECK against it, so keep those lines plain.

FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed uid/gid keeps /data's ownership stable across rebuilds and lets a
# bind-mounted host directory be chowned to match. --no-log-init: a high uid
# must not grow /var/log/faillog into a huge sparse file.
RUN groupadd --system --gid 10001 kvd \
    && useradd --system --no-log-init --uid 10001 --gid kvd \
       --create-home --home-dir /home/kvd --shell /usr/sbin/nologin kvd

WORKDIR /app

# Dependencies first so editing the source does not invalidate this layer.
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt

COPY pyproject.toml README.md ./
COPY kvd/ kvd/
RUN pip install --no-cache-dir --no-deps .


# ---------------------------------------------------------------------------
# test: `docker compose run --rm test` (or `docker run kvd-test`).
FROM base AS test

COPY requirements-test.txt ./
RUN pip install --no-cache-dir -r requirements-test.txt

# The whole build context (minus .dockerignore): tests, docs, config and
# examples are all read by the suite. Owned by kvd, and run as kvd, so that
# permission tests behave as for a real user (root ignores file modes) and
# pytest/hypothesis can write their caches under /app.
COPY --chown=kvd:kvd . .
RUN chown kvd:kvd /app

# kvd, by number: an orchestrator's "must not run as root" check (such as
# Kubernetes' runAsNonRoot) can only verify a numeric user.
USER 10001:10001
CMD ["python", "-m", "pytest"]


# ---------------------------------------------------------------------------
# runtime: the default target (last stage).
FROM base AS runtime

# The image listens on all interfaces (kvd's own default is 127.0.0.1) and
# keeps its journal in the /data volume; see SPEC section 6.
ENV KVD_SERVER_HOST=0.0.0.0 \
    KVD_JOURNAL_DATA_DIR=/data

# Created and chowned before VOLUME so a new named volume starts out owned by
# kvd (Docker copies the image's directory ownership into it).
RUN mkdir -p /data && chown kvd:kvd /data
VOLUME ["/data"]

# kvd, by number (see the test stage).
USER 10001:10001
EXPOSE 8000

# slim has no curl; python's urllib is always there. urlopen raises on any
# non-2xx answer or connection error, which exits non-zero.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('KVD_SERVER_PORT', '8000'), timeout=2)"]

# Exec form keeps kvd as PID 1, so it receives SIGTERM itself and drains,
# flushes and exits 0 (no shell in between to swallow the signal).
STOPSIGNAL SIGTERM
CMD ["kvd", "serve"]
