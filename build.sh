#!/usr/bin/env bash
# Build the mail2alert image: ./build.sh   (IMAGE=registry/mail2alert:1.2 ./build.sh to tag it)
set -euo pipefail

IMAGE="${IMAGE:-mail2alert:latest}"
cd "$(dirname "${BASH_SOURCE[0]}")"

docker build --tag "$IMAGE" .
# Prove the entrypoint runs in the image just built (never a pulled one).
docker run --rm --pull=never "$IMAGE" --version
echo "built $IMAGE; check a configuration with ./selftest.sh DIR, then start it with ./run.sh DIR"
