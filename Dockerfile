# Build: the same bootstrap as on a developer machine (cmake, pkg-config, libssl-dev).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN scripts/bootstrap && cargo build --release --locked --bin privacy-gateway

# Run: Debian's OpenSSL and CA certificates for https:// pools.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends libssl3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --no-create-home --shell /usr/sbin/nologin gateway
COPY --from=build /src/target/release/privacy-gateway /usr/local/bin/privacy-gateway
COPY config/ /etc/privacy-gateway/
USER gateway
EXPOSE 8080 8081
ENTRYPOINT ["privacy-gateway"]
CMD ["run", "--config", "/etc/privacy-gateway/gateway.toml"]
