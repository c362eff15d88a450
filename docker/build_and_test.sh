#!/usr/bin/env bash
# Builds docker/Dockerfile with podman and proves the image: it starts, turns ready,
# answers tritonclient and the gRPC health service, counts requests on /metrics,
# passes its own HEALTHCHECK, and drains on `podman stop` (tests/deploy/check_container.py).
# Where containers cannot run here it prints SKIP with the reason and exits 0.
#
# No registry is needed: the base image is a Debian 12 minbase root filesystem made
# with debootstrap (python3, python3-venv, ca-certificates) and imported into podman
# once; later runs on the same machine reuse it, and podman's layer cache keeps the
# dependency layers. Set BASE_IMAGE to build on another base (e.g. python:3.11-slim-bookworm).
#   PYTHON=.venv/bin/python docker/build_and_test.sh       (a Python with the test extra)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
image=${IMAGE:-localhost/sluice:test}
# The tag names the recipe below: change it when the recipe changes.
base_default=localhost/sluice-debian-python:bookworm-minbase-1
base=${BASE_IMAGE:-$base_default}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/docker/containers.conf}

# Without systemd, podman cannot schedule an image's HEALTHCHECK and says so on
# stderr; `podman healthcheck run` below runs it instead.
quiet() { "$@" 2> >(grep -v "systemd connection" >&2); }
skip() { echo "SKIP docker/build_and_test.sh: $*"; exit 0; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

command -v podman >/dev/null || skip "podman is not installed (.ci/run installs podman, buildah, runc)"
command -v runc >/dev/null || skip "runc is not installed (docker/containers.conf selects it)"
podman info >/dev/null 2>&1 || skip "podman cannot start here: $(podman info 2>&1 | tail -1)"

if [[ "$base" == "$base_default" ]] && ! podman image exists "$base"; then
  command -v debootstrap >/dev/null || skip "debootstrap is not installed (needed for the base image)"
  mirror=$(grep -rhoE '^(URIs:|deb) +https?://[^ ]+/debian/?' /etc/apt/sources.list /etc/apt/sources.list.d 2>/dev/null \
           | grep -oE 'https?://[^ ]+' | head -1 || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  echo "== base image: debootstrap bookworm minbase from $mirror (once per machine)"
  t=$(now)
  rootfs=$(mktemp -d)
  trap 'rm -rf "$rootfs" "$rootfs.log"' EXIT
  if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
       bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1; then
    tail -5 "$rootfs.log"
    skip "debootstrap could not build the base root filesystem (above)"
  fi
  # Caches, package lists and docs (not the copyright files): ~145 MB the image
  # does not need; the build stage runs apt-get update itself.
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin \
         "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
         "$rootfs"/usr/share/locale/*
  find "$rootfs"/usr/share/doc -type f ! -name copyright -delete
  tar -C "$rootfs" -c . | podman import --quiet --change 'CMD ["/bin/bash"]' - "$base" >/dev/null
  rm -rf "$rootfs" "$rootfs.log"
  echo "base image $base in $(since "$t") s"
fi
# Can this machine run a container at all? (cgroups, runtime, user namespaces)
if ! out=$(podman run --rm --network none --pull=never "$base" true 2>&1); then
  skip "podman cannot run a container here: $out"
fi

echo "== build $image (FROM $base)"
t=$(now)
# pip inside the build trusts what this machine trusts (a TLS-intercepting proxy's
# CA, where there is one): the system bundle, mounted for the build steps only.
ca_args=()
ca=${BUILD_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
if [[ -f "$ca" ]]; then
  ca_args=(--volume "$ca:/run/build-ca.crt:ro" --build-arg PIP_CERT=/run/build-ca.crt)
fi
podman build --quiet --format docker --network host --pull=never "${ca_args[@]}" \
  --build-arg "BASE_IMAGE=$base" -f docker/Dockerfile -t "$image" . >/dev/null
echo "built in $(since "$t") s (layers reused from earlier builds count as cached)"
size=$(podman image inspect --format '{{.Size}}' "$image")
echo "image size $((size / 1000000)) MB; layers (newest first):"
podman history --format '{{.Size}}\t{{.CreatedBy}}' "$image" | cut -c1-110 | head -12
echo "largest parts of the venv:"
quiet podman run --rm --network none --entrypoint /bin/sh "$image" -c \
  'du -sm /opt/sluice /models /usr 2>/dev/null; du -sm /opt/sluice/lib/python3*/site-packages/* | sort -rn | head -8'

free_port() { "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
grpc_port=$(free_port)
http_port=$(free_port)
name="sluice-test-$$"
cleanup() { podman rm -f -t 0 "$name" >/dev/null 2>&1 || true; }
trap cleanup EXIT
echo "== run: 127.0.0.1:$grpc_port -> 8001 (gRPC), 127.0.0.1:$http_port -> 8002 (HTTP)"
t=$(now)
# --read-only as deploy/kubernetes runs it (readOnlyRootFilesystem; /tmp a tmpfs).
quiet podman run -d --name "$name" --stop-timeout 30 --memory 1g --cpus 2 --read-only \
  -p "127.0.0.1:$grpc_port:8001" -p "127.0.0.1:$http_port:8002" "$image" >/dev/null
check() { "$py" tests/deploy/check_container.py "$@"; }
if ! check ready "$grpc_port" "$http_port" 120 >/dev/null; then
  podman logs "$name" | tail -30
  exit 1
fi
echo "podman run to ready (every bundled model loaded): $(since "$t") s"
check serve "$grpc_port" "$http_port"
status=$(podman healthcheck run "$name" >/dev/null && echo healthy || echo unhealthy)
echo "HEALTHCHECK: $status"
[[ "$status" == healthy ]]
[[ "$(podman image inspect --format '{{.Config.User}} {{.Config.StopSignal}}' "$image")" == "10001:10001 SIGTERM" ]]
echo "== drain on podman stop"
quiet check drain "$grpc_port" "$http_port" -- podman stop "$name"
exit_code=$(podman inspect --format '{{.State.ExitCode}}' "$name")
podman logs "$name" 2>&1 | grep -E "not ready; accepting|stopping|stopped" | cut -c1-160
[[ "$exit_code" == 0 ]] || { echo "container exited $exit_code"; exit 1; }
echo "PASS docker/build_and_test.sh: image $image ($((size / 1000000)) MB) built, served, drained"
