#!/usr/bin/env bash
# Start (or replace) the mail2alert container on the configuration in CONFIG_DIR.
#
#   ./run.sh /etc/mail2alert
#
# CONFIG_DIR must contain configuration.yml; it is mounted read-only at /etc/mail2alert.
# The configuration is checked in the image first: an invalid one never replaces a running
# container. Settings (environment):
#   IMAGE      image to run                          (default mail2alert:latest)
#   NAME       container name                        (default mail2alert-app)
#   BIND       host address:port published to 1025  (default 127.0.0.1:1025)
#   VOLUME     named volume for /var/lib/mail2alert  (default mail2alert-data)
#   ENV_FILE   a docker env file, for variables the configuration names beyond those below
# GOUSER, GOPASS, GOTOKEN, LOGLEVEL, SLACK_TOKEN and SLACK_URL are passed on when set.
set -euo pipefail

# shellcheck source=docker-config.sh
source "$(dirname "$0")/docker-config.sh"

NAME="${NAME:-mail2alert-app}"
BIND="${BIND:-127.0.0.1:1025}"
VOLUME="${VOLUME:-mail2alert-data}"

echo "checking $CONFIG_DIR/configuration.yml in $IMAGE"
if ! docker run --rm "${options[@]}" "$IMAGE" check; then
    echo "$(basename "$0"): configuration invalid; $NAME left as it was" >&2
    exit 1
fi

if docker container inspect "$NAME" >/dev/null 2>&1; then
    echo "replacing $NAME (stopping it gracefully first)"
    docker stop --time 30 "$NAME" >/dev/null
    docker rm "$NAME" >/dev/null
fi

docker run --detach --name "$NAME" \
    --restart unless-stopped \
    --init \
    --stop-timeout 30 \
    --publish "$BIND:1025" \
    --volume "$VOLUME:/var/lib/mail2alert" \
    --read-only --tmpfs /tmp \
    --cap-drop ALL --security-opt no-new-privileges \
    "${options[@]}" \
    "$IMAGE" serve

echo "started $NAME, listening on $BIND; reload the configuration with: docker kill --signal=HUP $NAME"
