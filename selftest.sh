#!/usr/bin/env bash
# Check a configuration with the image before using it: ./selftest.sh CONFIG_DIR
#
# Runs "mail2alert check --online" (is it valid, and does everything it needs answer: the
# smarthost, GoCD, the chat destinations?) and then "mail2alert coverage" (what do the rules
# cover?) in the image, with CONFIG_DIR mounted read-only at /etc/mail2alert and the same
# environment run.sh passes: GOUSER, GOPASS, GOTOKEN, LOGLEVEL, SLACK_TOKEN, SLACK_URL, and
# $ENV_FILE when set. IMAGE selects the image (default mail2alert:latest).
# Exits non-zero if the configuration is invalid or something it needs does not answer
# (coverage is not run then).
set -euo pipefail

# shellcheck source=docker-config.sh
source "$(dirname "$0")/docker-config.sh"

docker run --rm "${options[@]}" "$IMAGE" check --online
docker run --rm "${options[@]}" "$IMAGE" coverage
