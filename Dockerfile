# syntax=docker/dockerfile:1
# Keel's one binary. Build: docker build -t keel . (from the repository root)

FROM rust:1-bookworm AS build
# libclang for bindgen (pg_query); protobuf is compiled by protox, so no protoc.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libclang-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p keel \
 && install -m 0755 target/release/keel /usr/local/bin/keel

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 keel \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin keel
COPY --from=build /usr/local/bin/keel /usr/local/bin/keel
# Inside a container the listeners must not be on loopback only.
# `keel serve` refuses to start without TLS: mount a PEM certificate and key and set
# KEEL_TLS_CERT_FILE and KEEL_TLS_KEY_FILE (helm/keel does), or KEEL_ALLOW_PLAINTEXT=true on a
# network you trust (deploy/compose.yaml, a laptop). /metrics answers 401 until
# KEEL_METRICS_TOKEN_FILE names a file holding the bearer token scrapers must send.
ENV KEEL_GRPC_LISTEN=0.0.0.0:50051 \
    KEEL_HTTP_LISTEN=0.0.0.0:9090
EXPOSE 50051 9090
USER 10001:10001
ENTRYPOINT ["keel"]
CMD ["serve", "--target", "all"]
