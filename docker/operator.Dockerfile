# The LocalModel operator: one static (musl) binary on an empty base image, run as non-root.
#
#   docker build -f docker/operator.Dockerfile -t localmodel/operator:0.1.0 .
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/* \
    && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
# Images carry no debug info (the release profile keeps line tables for profiling).
ENV CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=symbols
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p operator --target x86_64-unknown-linux-musl \
    && cp target/x86_64-unknown-linux-musl/release/operator /operator

FROM scratch
COPY --from=build /operator /operator
USER 65532:65532
EXPOSE 9090
ENTRYPOINT ["/operator"]
