# Portico in a container. The build stage uses the toolchain the lockfile needs (the
# `rust-version` of Cargo.toml; tests/cli.rs checks they agree), with cmake for Pingora's
# zlib-ng; the runtime is a slim Debian, running as an unprivileged user.
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin portico

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home portico
COPY --from=build /src/target/release/portico /usr/local/bin/portico
USER portico
EXPOSE 8080 9901
# The slim image has no curl: `portico health` asks the admin /healthz itself.
HEALTHCHECK --interval=5s --timeout=4s --start-period=5s --retries=3 CMD ["portico", "health", "--admin", "127.0.0.1:9901"]
ENTRYPOINT ["portico"]
