# mail2alert in a container: build with ./build.sh, check a config with ./selftest.sh DIR,
# run with ./run.sh DIR. The configuration directory is mounted read-only at /etc/mail2alert;
# the outbox and GoCD snapshots live in the volume /var/lib/mail2alert.
#
# In the mounted configuration.yml, set
#     local-smtp: 0.0.0.0:1025          # "localhost" would be unreachable from outside the container
#     data-dir: /var/lib/mail2alert     # the volume ($MAIL2ALERT_DATA_DIR, the default here, says so too)

# --- build: mail2alert and its dependencies installed in a venv ------------------------------
# Plain Dockerfile instructions only: the classic builder of Debian's docker.io builds it as
# well as BuildKit does.
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# .dockerignore lets in only pyproject.toml, README.md and src/.
COPY . .
RUN python -m venv /opt/mail2alert && /opt/mail2alert/bin/pip install .

# --- runtime: the venv copied over; no compilers, no sources, no wheels ------------------
FROM python:3.11-slim

LABEL org.opencontainers.image.title="mail2alert" \
      org.opencontainers.image.description="An SMTP relay that routes CI alert mails to the right people by rules." \
      org.opencontainers.image.licenses="MIT"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MAIL2ALERT_CONFIGURATION=/etc/mail2alert/configuration.yml \
    MAIL2ALERT_DATA_DIR=/var/lib/mail2alert \
    PATH=/opt/mail2alert/bin:$PATH

COPY --from=build /opt/mail2alert /opt/mail2alert
# A fixed uid/gid lets the host grant the mounted configuration to it (chgrp 10001 ...).
RUN groupadd --system --gid 10001 mail2alert \
    && useradd --system --uid 10001 --gid mail2alert --no-create-home \
        --home-dir /var/lib/mail2alert --shell /usr/sbin/nologin mail2alert \
    && mkdir -p /etc/mail2alert /var/lib/mail2alert \
    && chown mail2alert:mail2alert /var/lib/mail2alert \
    && chmod 0750 /var/lib/mail2alert

# Declared after the chown, so a new named volume starts out owned by mail2alert.
VOLUME ["/var/lib/mail2alert"]
# Without a data-dir in the file, $MAIL2ALERT_DATA_DIR (above) puts the outbox in the volume.
WORKDIR /var/lib/mail2alert
USER 10001:10001

EXPOSE 1025

# Healthy means /readyz answers 200: intake listens, the outbox takes a write, the
# configuration is loaded (urlopen raises on a 503 or no answer). It asks the http listener on
# its default address inside the container; a configuration that moves it (http.address) or
# turns it off (http: null) needs this line changed too. Only the image's Python is needed.
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9025/readyz', timeout=8)"]

# mail2alert stops cleanly on SIGTERM and reloads its configuration on SIGHUP
# (docker kill --signal=HUP mail2alert-app), keeping the old one if the new one is invalid.
STOPSIGNAL SIGTERM
ENTRYPOINT ["mail2alert"]
CMD ["serve"]
