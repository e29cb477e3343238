# finetuned: a builder stage runs the same scripts CI runs (scripts/setup
# installs PyTorch's libtorch and the pretrained weights; cargo links against
# that libtorch), and slim runtime stages keep the binary, libtorch's shared
# libraries (same path, so the binary's rpath finds them), the weights and
# the Postgres server for the embedded default. Two images:
#
#   docker build --network host -t finetuned:gpu .               # the default target
#   docker build --network host --target cpu -t finetuned:cpu .  # a fraction of the size
#
#   docker run --rm -v finetuned-data:/data finetuned:gpu keys create --scope admin
#   docker run -d -p 8080:8080 --stop-timeout 30 -v finetuned-data:/data finetuned:gpu
#
# `gpu` keeps the CUDA runtime the PyTorch wheel carries, so on a GPU host
# (`docker run --gpus all …`) it trains on the GPU, and on the CPU elsewhere.
# `cpu` drops libtorch_cuda, cuDNN, cuBLAS, NCCL and the rest; its binary
# does not ask for libtorch_cuda.so.
#
# Behind a TLS-inspecting proxy, pass its CA certificates (PEM text) for the
# build stage's pip and cargo; no runtime stage ever sees them:
#   --build-arg EXTRA_CA_CERTS="$(cat /usr/local/share/ca-certificates/*.crt)"
# (a build argument, not a BuildKit secret, so that the classic builder
# works too; scripts/docker-check explains.)

# Where scripts/setup puts torch's site-packages (torch version from
# scripts/env.sh, Python from the build image); the build stage checks it.
ARG SITE=/opt/finetuned/torch-2.13.0/lib/python3.11/site-packages

FROM rust:1-bookworm AS build
ARG SITE
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv python3-pip postgresql patchelf \
 && rm -rf /var/lib/apt/lists/*
ARG EXTRA_CA_CERTS=""
RUN if [ -n "$EXTRA_CA_CERTS" ]; then \
        printf '%s\n' "$EXTRA_CA_CERTS" > /usr/local/share/ca-certificates/build-extra-ca.crt \
        && update-ca-certificates; \
    fi
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt \
    CARGO_HTTP_CAINFO=/etc/ssl/certs/ca-certificates.crt
WORKDIR /src
ENV FINETUNED_CACHE=/opt/finetuned \
    CARGO_TARGET_DIR=/cargo-target \
    FINETUNED_BROWSER_TESTS=0
# torch and the weights first (only the scripts they need, so editing other
# scripts reinstalls nothing); the test photos are not shipped.
COPY scripts/setup scripts/env.sh scripts/convert_weights.py scripts/reference_logits.py scripts/
RUN scripts/setup service \
 && rm -rf /opt/finetuned/fixtures \
 && if [ ! -d "$SITE/torch/lib" ]; then echo "no torch under SITE=$SITE: update it" >&2; exit 1; fi
# The dependencies, compiled against stub sources: this layer is reused
# until Cargo.toml, Cargo.lock, build.rs or the C++ shim change.
COPY Cargo.toml Cargo.lock build.rs ./
COPY src/native/ src/native/
RUN echo 'fn main() {}' > src/main.rs \
 && : > src/lib.rs \
 && for f in $(sed -n 's/^path = "\(.*\.rs\)"$/\1/p' Cargo.toml) \
             $(grep -A1 '^\[\[bench\]\]' Cargo.toml | sed -n 's/^name = "\(.*\)"$/benches\/\1.rs/p'); do \
        mkdir -p "$(dirname "$f")" && echo 'fn main() {}' > "$f"; \
    done \
 && . scripts/env.sh \
 && cargo build --release --locked --bin finetuned
# The crate itself: only what the binary is built from (src/, the files it
# embeds), so editing docs or tests rebuilds nothing.
COPY src/ src/
COPY migrations/ migrations/
COPY console/ console/
COPY openapi.yaml ./
RUN find src -type f -exec touch {} + \
 && . scripts/env.sh \
 && cargo build --release --locked --bin finetuned \
 && cp "$CARGO_TARGET_DIR/release/finetuned" /opt/finetuned/finetuned

# The CPU image's files: libtorch without its CUDA half, and a binary that
# no longer asks for libtorch_cuda.so (build.rs links it for GPU hosts; no
# symbol of it is used, so dropping the entry is all it takes). The CUDA
# wheel's libtorch_cpu.so itself needs libcudart and libcupti (4.8 MB).
FROM build AS cpu-files
ARG SITE
RUN cd "$SITE/torch/lib" \
 && rm -f libtorch_cuda.so libtorch_cuda_linalg.so libc10_cuda.so libcaffe2_nvrtc.so \
          libtorch_nvshmem.so libtorch_python.so \
 && mkdir /cuda-keep \
 && mv "$SITE/nvidia/cu13/lib/libcudart.so.13" "$SITE/nvidia/cu13/lib/libcupti.so.13" /cuda-keep/ \
 && patchelf --remove-needed libtorch_cuda.so /opt/finetuned/finetuned \
 && ! readelf -d /opt/finetuned/finetuned | grep -q 'libtorch_cuda'

# What both images share: Debian, the Postgres server (no cluster: the
# service makes its own), tini as PID 1 (forwards signals, reaps the
# embedded Postgres's children), and an unprivileged user.
FROM debian:bookworm-slim AS runtime
RUN mkdir -p /etc/postgresql-common/createcluster.d \
 && echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.d/finetuned.conf \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        postgresql ca-certificates curl libgomp1 tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 finetuned \
 && mkdir -p /data && chown finetuned: /data
USER finetuned
COPY docker/healthcheck /usr/local/bin/finetuned-healthcheck
ENV FINETUNED_LISTEN=0.0.0.0:8080 \
    FINETUNED_DATA_DIR=/data \
    FINETUNED_WEIGHTS_DIR=/opt/finetuned/weights
VOLUME /data
EXPOSE 8080
# Ready = Postgres answers, migrations applied, weights installed; on the
# port FINETUNED_LISTEN names.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/usr/local/bin/finetuned-healthcheck"]
ENTRYPOINT ["/usr/bin/tini", "--", "/opt/finetuned/finetuned"]
CMD ["serve"]

FROM runtime AS cpu
ARG SITE
COPY --from=cpu-files $SITE/torch/lib $SITE/torch/lib
COPY --from=cpu-files /cuda-keep $SITE/nvidia/cu13/lib
COPY --from=cpu-files /opt/finetuned/weights /opt/finetuned/weights
COPY --from=cpu-files /opt/finetuned/finetuned /opt/finetuned/finetuned

# The default target.
FROM runtime AS gpu
ARG SITE
COPY --from=build $SITE/torch/lib $SITE/torch/lib
COPY --from=build $SITE/nvidia $SITE/nvidia
COPY --from=build /opt/finetuned/weights /opt/finetuned/weights
COPY --from=build /opt/finetuned/finetuned /opt/finetuned/finetuned
