# syntax=docker/dockerfile:1
# Build: docker build -t exitserve .
# Run:   docker run -p 8080:8080 -v hf-cache:/data/hf exitserve
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The workspace's other member, the benchmark: cargo reads every member to build one.
COPY bench/Cargo.toml ./bench/
COPY bench/src ./bench/src
COPY openapi.yaml ./
COPY config ./config
RUN cargo build --release --locked --bin exitserve

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /data --create-home exitserve
COPY --from=build /src/target/release/exitserve /usr/local/bin/exitserve
COPY config/default.toml /etc/exitserve/default.toml
# For chat with a base model: --chat-template /etc/exitserve/chat-template-base.jinja
COPY config/chat-template-base.jinja /etc/exitserve/chat-template-base.jinja
USER exitserve
# glibc's per-thread malloc arenas let the resident floor creep up under bursts (+10 % in
# a minute of the CI soak, flat with 2 arenas): cap them.
ENV MALLOC_ARENA_MAX=2 \
    HF_HOME=/data/hf \
    EXITSERVE_HOST=0.0.0.0 \
    EXITSERVE_PORT=8080
VOLUME ["/data/hf"]
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/health || exit 1
ENTRYPOINT ["exitserve"]
