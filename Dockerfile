# Portico in a container: build with the Rust toolchain (cmake for Pingora's zlib-ng),
# run on a slim Debian.
FROM rust:1.85-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin portico

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/portico /usr/local/bin/portico
EXPOSE 8080 9901
ENTRYPOINT ["portico"]
