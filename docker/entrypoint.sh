#!/bin/sh
# `docker run peftopt SPEC.json|SPEC.yaml [options]` runs that jobspec; `docker run peftopt SUBCOMMAND ...` (validate,
# schema, env, report, ...) passes straight through to the peftopt CLI.
set -e
case "$1" in
  *.json|*.yaml|*.yml) exec peftopt run --output-dir "${PEFTOPT_OUTPUT_DIR:-/runs}" "$@" ;;
  *) exec peftopt "$@" ;;
esac
