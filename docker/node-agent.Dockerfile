# The LocalModel node agent, CPU engine. Also the image of `node-agent chat` (the chart's
# `helm test`) and of the cache-owner init container (it needs `chown`).
#
#   docker build -f docker/node-agent.Dockerfile -t localmodel/node-agent:0.1.0-cpu .
#
# TARGET_CPU: candle compiles its AVX2 kernels only with the target feature (x86-64-v3, about
# 4x faster decode); set TARGET_CPU=x86-64 for CPUs without AVX2.
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
ARG TARGET_CPU=x86-64-v3
WORKDIR /src
COPY . .
# Images carry no debug info (the release profile keeps line tables for profiling).
ENV CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=symbols
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    RUSTFLAGS="-C target-cpu=${TARGET_CPU}" cargo build --release --locked -p node-agent \
    && cp target/release/node-agent /node-agent

FROM debian:bookworm-slim
# CA certificates for weight sources over HTTPS.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /node-agent /usr/local/bin/node-agent
USER 65532:65532
ENV HOME=/tmp
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/node-agent"]
