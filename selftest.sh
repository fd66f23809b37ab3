#!/usr/bin/env bash
# Check a configuration with the image before using it: ./selftest.sh CONFIG_DIR
#
# Runs "mail2alert check" (is it valid?) and then "mail2alert coverage" (what do the rules
# cover?) in the image, with CONFIG_DIR mounted read-only at /etc/mail2alert and the same
# environment run.sh passes: GOUSER, GOPASS, GOTOKEN, LOGLEVEL, SLACK_TOKEN, SLACK_URL, and
# $ENV_FILE when set. IMAGE selects the image (default mail2alert:latest).
# Exits non-zero if the configuration is invalid (coverage is not run then).
set -euo pipefail

usage() {
    echo "usage: $(basename "$0") CONFIG_DIR   (a directory containing configuration.yml)" >&2
    exit 2
}

[[ $# -eq 1 ]] || usage
if [[ ! -d "$1" || ! -f "$1/configuration.yml" ]]; then
    echo "$(basename "$0"): $1: not a directory containing configuration.yml" >&2
    usage
fi
if [[ -n "${ENV_FILE:-}" && ! -r "$ENV_FILE" ]]; then
    echo "$(basename "$0"): ENV_FILE=$ENV_FILE: not a readable file" >&2
    exit 2
fi

CONFIG_DIR="$(cd "$1" && pwd -P)"
IMAGE="${IMAGE:-mail2alert:latest}"

options=(--rm --pull=never --volume "$CONFIG_DIR:/etc/mail2alert:ro")
for var in GOUSER GOPASS GOTOKEN LOGLEVEL SLACK_TOKEN SLACK_URL; do
    options+=(--env "$var")
done
if [[ -n "${ENV_FILE:-}" ]]; then
    options+=(--env-file "$ENV_FILE")
fi

docker run "${options[@]}" "$IMAGE" check
docker run "${options[@]}" "$IMAGE" coverage
