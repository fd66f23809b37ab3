# Sourced by run.sh and selftest.sh (not run by itself): checks the CONFIG_DIR argument and
# sets CONFIG_DIR, IMAGE, and the docker run options both scripts share: the configuration
# mounted read-only at /etc/mail2alert, and GOUSER, GOPASS, GOTOKEN, LOGLEVEL, SLACK_TOKEN,
# SLACK_URL and $ENV_FILE passed on when set. "--env NAME" passes a variable only when it is
# set here, and keeps its value off the command line.
# shellcheck shell=bash

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

options=(--pull=never --volume "$CONFIG_DIR:/etc/mail2alert:ro")
for var in GOUSER GOPASS GOTOKEN LOGLEVEL SLACK_TOKEN SLACK_URL; do
    options+=(--env "$var")
done
if [[ -n "${ENV_FILE:-}" ]]; then
    options+=(--env-file "$ENV_FILE")
fi
