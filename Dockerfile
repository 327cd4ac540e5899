# tgops service image: `docker build -t tgops .`, then
#   docker run --ulimit nofile=65536:65536 -v tgops-state:/var/lib/tgops \
#     -v $PWD/tgops.toml:/etc/tgops/tgops.toml -p 8080:8080 tgops
# `tgops serve` raises its soft open-files limit to the hard limit (at most 65536) itself.
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends dpkg openssh-client \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 tgops \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /var/lib/tgops \
      --shell /usr/sbin/nologin tgops

WORKDIR /opt/tgops
COPY requirements.lock ./
RUN pip install --no-cache-dir --disable-pip-version-check -r requirements.lock
COPY pyproject.toml README.md ./
COPY core ./core
COPY bot ./bot
COPY notify ./notify
COPY config ./config
# the language catalogues (notify/locale/LANG/LC_MESSAGES/tgops.po -> .mo), then tgops
RUN python -m notify.i18n compile \
 && pip install --no-cache-dir --disable-pip-version-check --no-deps .

ENV TGOPS_CONFIG=/etc/tgops/tgops.toml \
    TGOPS_DATABASE_URL=sqlite+aiosqlite:////var/lib/tgops/state.db \
    TGOPS_UPDATES__CACHE_DIR=/var/lib/tgops/cache \
    TGOPS_HTTP__HOST=0.0.0.0 \
    TGOPS_HTTP__PORT=8080
# numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd
USER 10001:10001
VOLUME ["/var/lib/tgops"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('TGOPS_HTTP__PORT', '8080'), timeout=4)"]
ENTRYPOINT ["tgops", "serve"]
