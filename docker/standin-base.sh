#!/usr/bin/env bash
# Makes sure the base image the Dockerfile names is in the engine: pulled if a registry answers, else a
# stand-in built from Debian's own packages (mmdebstrap) and tagged under that name, so the Dockerfile builds
# unchanged on a machine that reaches only the package registries.
#   docker/standin-base.sh            # the Dockerfile's BASE_IMAGE default
# The stand-in carries this machine's CA certificates (and PIP_CERT/SSL_CERT_FILE pointing at the bundle),
# as builds behind a TLS-inspecting proxy need. Its tarball is kept in ~/.cache/peftopt for reruns.
set -euo pipefail
cd "$(dirname "$0")/.."
image=${1:-$(sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile)}
[[ -n "$image" ]] || { echo "no ARG BASE_IMAGE in the Dockerfile" >&2; exit 1; }
if docker image inspect "$image" >/dev/null 2>&1; then exit 0; fi
if timeout 60 docker pull -q "$image" >/dev/null 2>&1; then exit 0; fi

suite=$(sed -E 's/^debian:([a-z]+).*/\1/' <<<"$image")
[[ "$suite" != "$image" ]] || { echo "$image cannot be pulled, and only Debian bases have a stand-in" >&2; exit 1; }
cache=${PEFTOPT_CACHE:-$HOME/.cache/peftopt}
tarball="$cache/standin-$suite.tar"
if [[ ! -s "$tarball" ]]; then
  command -v mmdebstrap >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap; }
  mkdir -p "$cache"
  certs=(/usr/local/share/ca-certificates/*.crt)
  hooks=(--customize-hook='mkdir -p "$1/usr/local/share/ca-certificates"')
  [[ -e "${certs[0]}" ]] && hooks+=(--customize-hook="cp ${certs[*]} \"\$1/usr/local/share/ca-certificates/\"")
  hooks+=(--customize-hook='chroot "$1" update-ca-certificates >/dev/null 2>&1'
          --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin')
  mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
  mmdebstrap --quiet --variant=minbase --include=ca-certificates "${hooks[@]}" "$suite" "$cache/standin-$suite.part.tar" \
    "deb $mirror $suite main" "deb $mirror $suite-updates main" \
    "deb ${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security} $suite-security main"
  mv "$cache/standin-$suite.part.tar" "$tarball"
fi
bundle=/etc/ssl/certs/ca-certificates.crt
docker import --change "ENV PIP_CERT=$bundle SSL_CERT_FILE=$bundle" --change 'CMD ["bash"]' \
  "$tarball" "$image" >/dev/null
echo "made a stand-in for $image from Debian $suite packages ($tarball)"
