# syntax=docker/dockerfile:1
# The `mozaiks` image: one binary, the role is the container's command (`all`, `gateway`,
# `worker`, `projector`, `billing`, `ops`, `rebuild`).
#
#   docker build --build-arg MOZAIKS_GIT_COMMIT=$(git rev-parse --short=12 HEAD) -t mozaiks .
#
# Two stages: Rust's image builds a release binary; the runtime stage is distroless (glibc,
# CA certificates, no shell, no package manager: about 90 MB with the 62 MiB binary) and runs as the
# non-root user 65532. `mozaiks --version` and the `mozaiks_build_info` metric carry the version
# and MOZAIKS_GIT_COMMIT (the build context has no .git: see .dockerignore).

# The base images, as build arguments so that a machine without a container registry can build
# from base images it made itself (scripts/image_check.sh). The defaults are the real ones.
ARG BUILD_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${BUILD_IMAGE} AS build
WORKDIR /src
ARG MOZAIKS_GIT_COMMIT=unknown
ENV MOZAIKS_GIT_COMMIT=${MOZAIKS_GIT_COMMIT} CARGO_TERM_COLOR=never
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,id=mozaiks-target \
    cargo build --release --locked --bin mozaiks \
    && cp target/release/mozaiks /mozaiks \
    && /mozaiks --version \
    && mkdir -p /var/lib/mozaiks/archive

FROM ${RUNTIME_IMAGE}
LABEL org.opencontainers.image.title="mozaiks" \
      org.opencontainers.image.description="Mozaiks Runtime: an event-sourced, multi-tenant runtime for AI-agent chat apps"
COPY --from=build /mozaiks /usr/local/bin/mozaiks
COPY --from=build /src/workflows /opt/mozaiks/workflows
COPY --from=build /src/plugins /opt/mozaiks/plugins
COPY --from=build --chown=65532:65532 /var/lib/mozaiks /var/lib/mozaiks
ENV MOZAIKS_WORKFLOWS_DIR=/opt/mozaiks/workflows \
    MOZAIKS_PLUGINS_DIR=/opt/mozaiks/plugins \
    MOZAIKS_LISTEN=0.0.0.0:8000 \
    MOZAIKS_LOG_FORMAT=json \
    MOZAIKS_ARCHIVE_DIR=/var/lib/mozaiks/archive
WORKDIR /opt/mozaiks
# The projector's retention archive: mount a volume here to keep it.
VOLUME /var/lib/mozaiks
USER 65532:65532
# 8000: API and WebSocket (gateways); 9464: /metrics when MOZAIKS_METRICS_LISTEN=0.0.0.0:9464;
# 8081: health and metrics of the other roles when MOZAIKS_HEALTH_LISTEN=0.0.0.0:8081.
EXPOSE 8000 8081 9464
ENTRYPOINT ["/usr/local/bin/mozaiks"]
CMD ["all"]
