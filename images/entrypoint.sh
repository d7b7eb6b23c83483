#!/bin/sh
# Fail fast when the image cannot run the CLI (broken install, missing native library), then run the
# given command. KFP replaces the entrypoint with its own command, so the build runs the same check.
set -e
vembed --help >/dev/null
exec "$@"
