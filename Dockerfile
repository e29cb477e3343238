# finetuned: one image that builds and runs the service with the same
# scripts CI runs (scripts/setup installs PyTorch's libtorch, the Postgres
# binaries and the pretrained weights; the build links against that libtorch).
#
#   docker build -t finetuned .
#   docker run -p 8080:8080 -v finetuned-data:/data finetuned
#
# The PyTorch wheel carries the CUDA runtime, so on a GPU host
# (`docker run --gpus all …`) the same image trains on the GPU.
FROM rust:1-bookworm

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv python3-pip postgresql \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 finetuned \
 && mkdir -p /data /opt/finetuned && chown finetuned: /data /opt/finetuned

USER finetuned
WORKDIR /home/finetuned/src
ENV FINETUNED_CACHE=/opt/finetuned \
    CARGO_TARGET_DIR=/opt/finetuned/target

# Dependencies first, so editing the sources does not reinstall torch.
COPY --chown=finetuned scripts/ scripts/
RUN scripts/setup

COPY --chown=finetuned . .
RUN . scripts/env.sh \
 && cargo build --release --locked --bin finetuned \
 && cp "$CARGO_TARGET_DIR/release/finetuned" /opt/finetuned/finetuned \
 && rm -rf "$CARGO_TARGET_DIR" "$HOME/.cargo/registry"

ENV FINETUNED_LISTEN=0.0.0.0:8080 \
    FINETUNED_DATA_DIR=/data \
    FINETUNED_WEIGHTS_DIR=/opt/finetuned/weights
VOLUME /data
EXPOSE 8080
ENTRYPOINT ["/opt/finetuned/finetuned"]
CMD ["serve"]
