# finetuned: a builder stage runs the same scripts CI runs (scripts/setup
# installs PyTorch's libtorch and the pretrained weights; cargo links against
# that libtorch), and a slim runtime stage keeps the binary, libtorch's
# shared libraries (same path, so the binary's rpath finds them), the
# weights and the Postgres server for the embedded default.
#
#   docker build -t finetuned .
#   docker run --rm -v finetuned-data:/data finetuned keys create --scope admin
#   docker run -p 8080:8080 -v finetuned-data:/data finetuned
#
# The PyTorch wheel carries the CUDA runtime, so on a GPU host
# (`docker run --gpus all …`) the same image trains on the GPU.

FROM rust:1-bookworm AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv python3-pip postgresql \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
ENV FINETUNED_CACHE=/opt/finetuned \
    CARGO_TARGET_DIR=/opt/finetuned/target \
    FINETUNED_BROWSER_TESTS=0
# Dependencies first, so editing the sources does not reinstall torch.
COPY scripts/ scripts/
RUN scripts/setup
COPY . .
# The runtime needs torch's shared libraries, not its C++ headers.
RUN . scripts/env.sh \
 && cargo build --release --locked --bin finetuned \
 && cp "$CARGO_TARGET_DIR/release/finetuned" /opt/finetuned/finetuned \
 && rm -rf "$CARGO_TARGET_DIR" /opt/finetuned/fixtures \
 && find /opt/finetuned -path '*/site-packages/torch/include' -prune -exec rm -rf {} +

FROM debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        postgresql ca-certificates curl libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 finetuned \
 && mkdir -p /data && chown finetuned: /data
COPY --from=build /opt/finetuned /opt/finetuned
USER finetuned
ENV FINETUNED_LISTEN=0.0.0.0:8080 \
    FINETUNED_DATA_DIR=/data \
    FINETUNED_WEIGHTS_DIR=/opt/finetuned/weights
VOLUME /data
EXPOSE 8080
# Ready = Postgres answers, migrations applied, weights installed.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/readyz || exit 1
ENTRYPOINT ["/opt/finetuned/finetuned"]
CMD ["serve"]
