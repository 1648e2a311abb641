#!/usr/bin/env bash
# Build a local Docker base image equivalent to python:3.11-slim without any
# container registry: debootstrap a minimal Debian bookworm (python3 3.11,
# python3-venv, python3-pip, python-is-python3, ca-certificates) from a
# Debian mirror and `docker import` it as kvcluster-base:bookworm.
#
#   scripts/build-base-image.sh [--force] [--image NAME] [--mirror URL]
#
# Idempotent: does nothing when the image exists (--force: debootstrap anew).
# The root file system is cached as a tarball under $KVCLUSTER_CACHE (default
# ~/.cache/kvcluster), keyed by suite, architecture and package list, so a
# rerun after `docker rmi` (or on a CI machine with a warm cache) only
# imports (seconds). Needs root (debootstrap) and a reachable Debian mirror.
#
# Then: scripts/build-image.sh --base kvcluster-base:bookworm (or --local-base)
set -euo pipefail

IMAGE="${KVCLUSTER_BASE_IMAGE:-kvcluster-base:bookworm}"
SUITE=bookworm
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
CACHE="${KVCLUSTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvcluster}"
PACKAGES="python3,python3-venv,python3-pip,python-is-python3,ca-certificates"
FORCE=0

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "build-base-image: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --force) FORCE=1 ;;
    --image) [ $# -ge 2 ] || die "--image needs a value"; IMAGE="$2"; shift ;;
    --mirror) [ $# -ge 2 ] || die "--mirror needs a value"; MIRROR="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
  shift
done

command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "the Docker engine is not reachable (docker info failed)"

if [ "$FORCE" = 0 ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "build-base-image: $IMAGE exists (use --force to rebuild)"
  exit 0
fi

arch="$(dpkg --print-architecture 2>/dev/null || uname -m)"
key="$(printf '%s %s %s' "$SUITE" "$arch" "$PACKAGES" | sha256sum | cut -c1-12)"
tarball="$CACHE/rootfs-$SUITE-$arch-$key.tar.gz"

if [ "$FORCE" = 1 ] || [ ! -s "$tarball" ]; then
  [ "$(id -u)" = 0 ] || die "debootstrap needs root"
  command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
  mkdir -p "$CACHE"
  work="$(mktemp -d "$CACHE/rootfs.XXXXXX")"
  trap 'rm -rf "$work"' EXIT
  rootfs="$work/rootfs"
  echo "build-base-image: debootstrap $SUITE ($arch) from $MIRROR into $rootfs"
  start=$SECONDS
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" \
    > "$work/debootstrap.log" 2>&1 || { tail -n 30 "$work/debootstrap.log" >&2; die "debootstrap failed"; }
  # Trim it like the slim images: no apt lists, caches, docs, man pages or logs.
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
         "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/log/* \
         "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
         "$rootfs"/tmp/* "$rootfs"/root/.cache
  find "$rootfs"/usr/lib/python3* -name __pycache__ -prune -exec rm -rf {} + 2>/dev/null || true
  # The image gets its own resolv.conf and hosts from the engine.
  : > "$rootfs"/etc/resolv.conf
  printf 'deb %s %s main\ndeb %s %s-updates main\ndeb http://deb.debian.org/debian-security %s-security main\n' \
    "$MIRROR" "$SUITE" "$MIRROR" "$SUITE" "$SUITE" > "$rootfs"/etc/apt/sources.list
  tar --numeric-owner -C "$rootfs" -czf "$work/rootfs.tar.gz" .
  mv "$work/rootfs.tar.gz" "$tarball"
  echo "build-base-image: rootfs cached at $tarball ($((SECONDS - start)) s)"
else
  echo "build-base-image: using cached rootfs $tarball"
fi

docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  --message "debootstrap $SUITE minbase + $PACKAGES (scripts/build-base-image.sh)" \
  "$tarball" "$IMAGE" >/dev/null
echo "build-base-image: built $IMAGE"
