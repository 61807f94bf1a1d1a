# syntax=docker/dockerfile:1
#
# One image holding all three workq binaries in /usr/local/bin:
# workq-coordinator, workq-worker and queue-cli.
#
#   docker build -t workq:0.1.0 .
#   docker run --rm -p 7070:7070 -p 8080:8080 workq:0.1.0            # a coordinator
#   docker run --rm workq:0.1.0 workq-worker --help                  # any binary
#
# No ENTRYPOINT: the command is the whole argv, so Kubernetes' `command:` (and
# `docker run IMAGE CMD…`) picks the binary, and that binary runs as PID 1 and gets
# SIGTERM itself (exec form, no shell in between).

# The builder must match the runtime's Debian release: a binary linked on a newer
# glibc does not start on an older one. (`rust:1-slim` alone follows Debian's newest.)
ARG RUST_VERSION=1
FROM rust:${RUST_VERSION}-slim-bookworm AS builder
WORKDIR /src
COPY . .
# Cache mounts keep the registry and build artefacts between builds (BuildKit).
# protobuf is compiled by protox in build.rs: no protoc needed.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
        -p workq-coordinator -p workq-worker -p workq-cli \
    && mkdir -p /out \
    && install -m 0755 -t /out \
        target/release/workq-coordinator \
        target/release/workq-worker \
        target/release/queue-cli

FROM debian:bookworm-slim
ARG UID=10001
RUN groupadd --system --gid "${UID}" workq \
    && useradd --system --uid "${UID}" --gid workq --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin workq \
    && mkdir -p /data \
    && chown "${UID}:${UID}" /data
COPY --from=builder /out/ /usr/local/bin/
# The book's Job manifests run `command: ["/kuard"]` with kuard's --keygen-* flags;
# workq-worker accepts those flags, so the same manifests run on this image unchanged.
RUN ln -s /usr/local/bin/workq-worker /kuard

LABEL org.opencontainers.image.title="workq" \
      org.opencontainers.image.description="Durable distributed work queue for Kubernetes batch Jobs: workq-coordinator, workq-worker, queue-cli" \
      org.opencontainers.image.licenses="Apache-2.0"

# A numeric user, so Kubernetes can check runAsNonRoot without a runAsUser.
USER ${UID}:${UID}
WORKDIR /data
# gRPC (queue API, grpc.health.v1) and HTTP (kuard memq API, /metrics, dashboard).
EXPOSE 7070 8080
# The default command runs a coordinator reachable from outside the container; the
# data dir /data is where a volume belongs.
CMD ["workq-coordinator", "--data-dir", "/data", "--grpc-addr", "0.0.0.0:7070", "--http-addr", "0.0.0.0:8080"]
