#!/usr/bin/env bash
# Build the kvcluster image where the build itself cannot use a registry or
# PyPI: the Python wheels are built on the host (its pip, its network and
# certificates) into build/docker-wheels, and the Dockerfile installs only
# from them.
#
#   scripts/build-image.sh [--local-base] [--base IMAGE] [--tag TAG]
#
#   --local-base   base on kvcluster-base:bookworm, made by
#                  scripts/build-base-image.sh (no registry needed)
#   --base IMAGE   any base image with python3 3.11 and venv (default python:3.11-slim)
#   --tag TAG      image name (default kvcluster:latest)
#
# Environment: PYTHON (default .venv/bin/python, else python3) runs `pip wheel`.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE="python:3.11-slim"
TAG="kvcluster:latest"
LOCAL_BASE=0
die() { echo "build-image: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
  case "$1" in
    --local-base) LOCAL_BASE=1 ;;
    --base) [ $# -ge 2 ] || die "--base needs a value"; BASE="$2"; shift ;;
    --tag) [ $# -ge 2 ] || die "--tag needs a value"; TAG="$2"; shift ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
  shift
done

if [ "$LOCAL_BASE" = 1 ]; then
  BASE="${KVCLUSTER_BASE_IMAGE:-kvcluster-base:bookworm}"
  scripts/build-base-image.sh --image "$BASE"
fi

PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# The image runs CPython 3.11 on glibc: the host must build wheels for the same.
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || die "$PYTHON is not Python 3.11 (the image's); set PYTHON=python3.11"

wheels=build/docker-wheels
mkdir -p "$wheels"
rm -f "$wheels"/kvcluster-*.whl  # always rebuild the project itself; dependencies are reused
# setuptools builds in-tree: stale modules in build/lib would end up in the wheel
rm -rf build/lib build/bdist.*
start=$SECONDS
echo "build-image: building wheels into $wheels"
log="$(mktemp)"
if ! "$PYTHON" -m pip wheel --quiet --disable-pip-version-check -c constraints.txt \
    -w "$wheels" . >"$log" 2>&1; then
  cat "$log" >&2; rm -f "$log"; die "pip wheel failed"
fi
rm -rf "$log" build/lib build/bdist.*
echo "build-image: wheels ready ($((SECONDS - start)) s); building $TAG on $BASE"
docker build --force-rm --build-arg BASE_IMAGE="$BASE" -t "$TAG" .
echo "build-image: built $TAG"
