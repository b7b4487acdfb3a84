# The LocalModel node agent with the CUDA engine (the `cuda` feature).
#
#   docker build -f docker/node-agent-cuda.Dockerfile -t localmodel/node-agent:0.1.0-cuda .
#
# CUDA_COMPUTE_CAP: the GPU generation candle's kernels are compiled for (no GPU is needed at
# build time): 80 = A100, 86 = A10/RTX 30xx, 89 = L4/L40S/RTX 40xx, 90 = H100/H200.
ARG RUST_VERSION=1.95
ARG CUDA_VERSION=12.6.3

FROM rust:${RUST_VERSION}-bookworm AS rust

FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04 AS build
ARG CUDA_COMPUTE_CAP=89
ARG TARGET_CPU=x86-64-v3
# The Rust toolchain of the official image (no installer download).
COPY --from=rust /usr/local/cargo /usr/local/cargo
COPY --from=rust /usr/local/rustup /usr/local/rustup
ENV CARGO_HOME=/usr/local/cargo RUSTUP_HOME=/usr/local/rustup PATH=/usr/local/cargo/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends gcc g++ pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Images carry no debug info (the release profile keeps line tables for profiling).
ENV CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=symbols
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} RUSTFLAGS="-C target-cpu=${TARGET_CPU}" \
    cargo build --release --locked -p node-agent --features cuda \
    && cp target/release/node-agent /node-agent

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /node-agent /usr/local/bin/node-agent
USER 65532:65532
ENV HOME=/tmp
# The NVIDIA container runtime mounts the driver (libcuda, NVML) into the container.
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/node-agent"]
