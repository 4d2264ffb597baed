# Ferry's image: built with the same toolchain and lockfile as CI, run on a slim Debian.
FROM rust:1-bookworm AS build
WORKDIR /src
RUN apt-get update && apt-get install -y --no-install-recommends pkg-config libssl-dev zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*
COPY . .
RUN cargo build --release --locked && cp target/release/ferry /usr/local/bin/ferry

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/ferry /usr/local/bin/ferry
USER nobody
ENTRYPOINT ["ferry"]
