# Build: the same bootstrap as on a developer machine (cmake, pkg-config,
# libssl-dev). OpenSSL is vendored and linked statically.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN scripts/bootstrap && cargo build --release --locked --bin privacy-gateway

# Run: distroless, i.e. glibc, libgcc and CA certificates (for https:// pools)
# and nothing else: no shell, no package manager, no curl. User 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/privacy-gateway /usr/local/bin/privacy-gateway
# The demo data set and a configuration listening on every interface; mount
# your own folder over /etc/privacy-gateway in production.
COPY config/rules.toml config/pools.toml config/accounts.jsonl deploy/container/gateway.toml /etc/privacy-gateway/
USER 65532:65532
# api, chat, admin (/healthz, /readyz, /metrics)
EXPOSE 8080 8081 9090
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
  CMD ["/usr/local/bin/privacy-gateway", "healthcheck", "--config", "/etc/privacy-gateway/gateway.toml"]
ENTRYPOINT ["/usr/local/bin/privacy-gateway"]
CMD ["run", "--config", "/etc/privacy-gateway/gateway.toml"]
