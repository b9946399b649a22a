#!/usr/bin/env bash
# Base images for the deployment test, made locally because no image registry is reachable here:
# a Debian root file system from debootstrap (with Debian's python3 and redis-server), imported
# with `docker import`. The root file system is cached outside the repository, so a rerun only
# imports it again when the image is missing.
#   usage: make-base-images.sh IMAGE_TAG [CACHE_DIR]
set -euo pipefail
tag=${1:?image tag}
cache=${2:-/var/cache/mtaq-deploy}
suite=${MTAQ_DEBIAN_SUITE:-bookworm}
mirror=${MTAQ_DEBIAN_MIRROR:-http://deb.debian.org/debian}
rootfs=$cache/rootfs-$suite
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "base image $tag exists"
  exit 0
fi
mkdir -p "$cache"
if [ ! -e "$rootfs/.complete" ]; then
  rm -rf "$rootfs"
  echo "debootstrap $suite into $rootfs (once; cached)"
  debootstrap --variant=minbase --include=python3,python3-venv,redis-server,ca-certificates \
    "$suite" "$rootfs" "$mirror" >"$cache/debootstrap.log" 2>&1 \
    || { tail -20 "$cache/debootstrap.log" >&2; exit 1; }
  # an image has no use for apt's downloaded packages and lists
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  touch "$rootfs/.complete"
fi
tar -C "$rootfs" --exclude=./.complete -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["/bin/bash"]' - "$tag" >/dev/null
echo "imported $tag"
