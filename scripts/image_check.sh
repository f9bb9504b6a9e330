#!/usr/bin/env bash
# Builds the repository's Dockerfile without Docker and without a container registry (issue 14,
# item 7), then checks the image. NOT part of CI: a release build from scratch takes long.
#
# The machine this was written on has no Docker daemon and reaches only package registries
# (Debian, crates.io, PyPI, npm), not docker.io or gcr.io. So:
# - buildah and crun come from Debian (apt-get, installed when missing);
# - the two base images the Dockerfile names are stood in for by images made here, passed as
#   build arguments (BUILD_IMAGE, RUNTIME_IMAGE), from Debian packages with mmdebstrap:
#     build:   bookworm + gcc, libc6-dev, pkg-config, ca-certificates, with this machine's Rust
#              toolchain (rustc --print sysroot) copied in, CARGO_HOME=/usr/local/cargo, as in
#              rust:1.95-bookworm;
#     runtime: bookworm's essential packages + ca-certificates and libgcc-s1, the libraries of
#              gcr.io/distroless/cc-debian12 (but with a shell and dpkg: larger than distroless);
# - the build stage downloads the crates from crates.io (network of the host).
# Then: the image runs `mozaiks --version` as its own user, the user is 65532, and with
# --serve, `mozaiks all` from the image answers /health/ready against the test servers
# (scripts/servers.sh).
#
#   scripts/image_check.sh            # build and check
#   scripts/image_check.sh --serve    # also start the image's `mozaiks all` on the host network
#   scripts/image_check.sh --clean    # remove the images and the build cache it made
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${MOZAIKS_IMAGE_WORK:-/var/tmp/mozaiks-image-check}"
SUITE=bookworm
BUILD_BASE=localhost/mozaiks-build-base:check
RUNTIME_BASE=localhost/mozaiks-runtime-base:check
IMAGE=localhost/mozaiks:check

log() { echo "image_check.sh: $*" >&2; }

if [[ "${1:-}" == "--clean" ]]; then
    buildah rmi -f "$IMAGE" "$BUILD_BASE" "$RUNTIME_BASE" 2>/dev/null || true
    buildah prune -f 2>/dev/null || true
    rm -rf "$WORK"
    exit 0
fi
[[ "$(id -u)" == 0 ]] || { log "run as root (buildah mounts the images' file systems)"; exit 1; }
missing=()
for tool in buildah crun mmdebstrap; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]} from Debian"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        buildah crun mmdebstrap uidmap fuse-overlayfs netavark >&2
fi
mkdir -p "$WORK"
df_gb() { df -BG --output=avail "$1" | tail -1 | tr -dc 0-9; }
if (($(df_gb "$WORK") < 12)); then
    log "less than 12 GB free under $WORK: the build needs about 8"
    exit 1
fi

# An image from a root file system tarball, with a user and environment.
import_rootfs() {
    local tar="$1" name="$2"
    shift 2
    local ctr mnt
    ctr="$(buildah from scratch)"
    mnt="$(buildah mount "$ctr")"
    tar -C "$mnt" -xf "$tar"
    "$@" "$mnt"
    buildah umount "$ctr" >/dev/null
    buildah commit --quiet --rm "$ctr" "$name" >/dev/null
    log "made $name"
}

if ! buildah inspect --type image "$RUNTIME_BASE" >/dev/null 2>&1; then
    log "runtime base: mmdebstrap $SUITE (essential, ca-certificates, libgcc-s1)"
    mmdebstrap --quiet --variant=essential --include=ca-certificates,libgcc-s1 \
        "$SUITE" "$WORK/runtime.tar"
    import_rootfs "$WORK/runtime.tar" "$RUNTIME_BASE" true
    rm -f "$WORK/runtime.tar"
fi

if ! buildah inspect --type image "$BUILD_BASE" >/dev/null 2>&1; then
    log "build base: mmdebstrap $SUITE (gcc, libc6-dev, pkg-config) + this machine's Rust toolchain"
    mmdebstrap --quiet --variant=essential \
        --include=ca-certificates,gcc,libc6-dev,pkg-config,make \
        "$SUITE" "$WORK/build.tar"
    sysroot="$(cd "$REPO" && rustc --print sysroot)"
    log "toolchain $(cd "$REPO" && rustc --version) from $sysroot"
    add_toolchain() {
        local root="$1"
        # bin (rustc, cargo, ...), lib (the compiler and the standard library), libexec; no docs.
        for d in bin lib libexec; do
            [[ -d "$sysroot/$d" ]] && cp -a "$sysroot/$d/." "$root/usr/local/$d/"
        done
        mkdir -p "$root/usr/local/cargo/registry"
    }
    import_rootfs "$WORK/build.tar" "$BUILD_BASE" add_toolchain
    ctr="$(buildah from "$BUILD_BASE")"
    buildah config --env CARGO_HOME=/usr/local/cargo \
        --env PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        "$ctr"
    buildah commit --quiet --rm "$ctr" "$BUILD_BASE" >/dev/null
    rm -f "$WORK/build.tar"
fi

# The context is the commit (git archive HEAD), not the working tree.
commit="$(git -C "$REPO" rev-parse --short=12 HEAD)"
rm -rf "$WORK/context" && mkdir -p "$WORK/context"
git -C "$REPO" archive HEAD | tar -x -C "$WORK/context"
log "building $IMAGE from the Dockerfile (commit $commit)"
started=$SECONDS
# Chroot isolation: no OCI runtime (crun refuses this machine's hybrid cgroups) and no cgroups.
# The host's CA bundle is mounted over the build's during RUN steps: a TLS-inspecting egress
# proxy's certificate is trusted by the host, not by Debian's ca-certificates (cargo's downloads
# from crates.io fail with "self-signed certificate in certificate chain" otherwise).
cabundle="${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}"
buildah bud --isolation chroot --pull-never --network host --layers \
    --volume "$cabundle:/etc/ssl/certs/ca-certificates.crt:ro" \
    --build-arg BUILD_IMAGE="$BUILD_BASE" \
    --build-arg RUNTIME_IMAGE="$RUNTIME_BASE" \
    --build-arg MOZAIKS_GIT_COMMIT="$commit" \
    -t "$IMAGE" -f "$WORK/context/Dockerfile" "$WORK/context" >&2
log "built in $((SECONDS - started)) s"

# The checks.
ctr="$(buildah from "$IMAGE")"
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
user="$(buildah inspect --type image --format '{{.OCIv1.Config.User}}' "$IMAGE")"
[[ "$user" == "65532:65532" ]] || { log "FAIL: the image runs as '$user', not 65532:65532"; exit 1; }
version="$(buildah run --isolation chroot "$ctr" -- /usr/local/bin/mozaiks --version)"
echo "$version"
[[ "$version" == *"$commit"* ]] || { log "FAIL: --version does not name the commit $commit"; exit 1; }
uid="$(buildah run --isolation chroot "$ctr" -- /usr/bin/id -u)"
[[ "$uid" == 65532 ]] || { log "FAIL: the container's processes run as uid $uid"; exit 1; }
size="$(buildah inspect --type image --format '{{.Size}}' "$IMAGE" 2>/dev/null || true)"
binary="$(buildah run --isolation chroot "$ctr" -- /usr/bin/stat -c %s /usr/local/bin/mozaiks)"
log "ok: user 65532, '$version', binary $((binary / 1024 / 1024)) MiB${size:+, image $((size / 1024 / 1024)) MiB}"

if [[ "${1:-}" == "--serve" ]]; then
    # The image's `mozaiks all` on the host network against servers of its own (the project's
    # nats-server and SecantusDB from .tools/venv, on free ports, data under $WORK).
    "$REPO/scripts/servers.sh" install >&2
    free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
    nport="$(free_port)" mport="$(free_port)" port="$(free_port)"
    rm -rf "$WORK/nats" "$WORK/mongo" && mkdir -p "$WORK/nats" "$WORK/mongo"
    "$REPO/.tools/venv/bin/nats-server" -js -a 127.0.0.1 -p "$nport" -sd "$WORK/nats" > "$WORK/nats.log" 2>&1 &
    nats_pid=$!
    "$REPO/.tools/venv/bin/secantusd-py" --host 127.0.0.1 --port "$mport" \
        --storage-path "$WORK/mongo" --log-level WARNING > "$WORK/mongo.log" 2>&1 &
    mongo_pid=$!
    trap 'buildah rm "$ctr" >/dev/null 2>&1 || true; kill $nats_pid $mongo_pid 2>/dev/null || true' EXIT
    NATS_URL="nats://127.0.0.1:$nport"
    MONGO_URI="mongodb://127.0.0.1:$mport/?directConnection=true"
    log "mozaiks all from the image on 127.0.0.1:$port (NATS $NATS_URL)"
    buildah run --isolation chroot --network host \
        --env NATS_URL="$NATS_URL" --env MONGO_URI="$MONGO_URI" \
        --env JWT_SECRET=image-check-secret-that-is-long-enough-0123 \
        --env MOZAIKS_LISTEN=127.0.0.1:$port \
        "$ctr" -- /usr/local/bin/mozaiks all > "$WORK/serve.log" 2>&1 &
    serving=$!
    ready=""
    for _ in $(seq 1 120); do
        if curl -fsS "http://127.0.0.1:$port/health/ready" >/dev/null 2>&1; then
            ready=1
            break
        fi
        sleep 1
    done
    curl -sS "http://127.0.0.1:$port/health/ready" || true
    echo
    kill "$serving" 2>/dev/null || true
    wait "$serving" 2>/dev/null || true
    [[ -n "$ready" ]] || { log "FAIL: not ready in 120 s; log: $WORK/serve.log"; tail -20 "$WORK/serve.log" >&2; exit 1; }
    log "ok: the image's mozaiks all was ready"
fi
