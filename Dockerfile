# Ferry's image: built with the same toolchain and lockfile as CI, run on a slim Debian as a
# numeric non-root user (Kubernetes' runAsNonRoot checks the number).
FROM rust:1-bookworm AS build
WORKDIR /src
RUN apt-get update && apt-get install -y --no-install-recommends pkg-config libssl-dev zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*
# Dependencies first, in a layer of their own: a change to Ferry's code rebuilds only Ferry.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
RUN mkdir -p src tests/it && echo 'fn main() {}' > src/main.rs && touch src/lib.rs tests/it/main.rs \
    && cargo build --release --locked --bin ferry \
    && rm -rf src tests
COPY . .
# The placeholder's outputs are older than the real sources; cargo rebuilds Ferry alone.
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin ferry \
    && cp target/release/ferry /usr/local/bin/ferry

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/ferry /usr/local/bin/ferry
COPY integrations /etc/ferry/integrations
COPY proto /etc/ferry/proto
USER 10001:10001
# The consumer's admin API (health, readiness, metrics, operations) and the relay's metrics.
EXPOSE 9190 9187
ENTRYPOINT ["ferry"]
