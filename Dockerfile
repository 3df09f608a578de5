# syntax=docker/dockerfile:1
# curvecast model server.
#   CPU (default, slim):  docker build -t curvecast .
#   CUDA:                 docker build --build-arg VARIANT=cuda -t curvecast:cuda .
#   run:                  docker run -p 8000:8000 curvecast      (then GET /readyz)
# The image serves the embedded default model (and stage4 behind /v1/early-stop); their ONNX
# exports are made at build time (next to the weights, keyed by their sha256), so containers
# start in seconds and need no writable package directory. Settings: CURVECAST_* environment
# variables (docs/serving.md).
ARG VARIANT=cpu

# --- where Python comes from ---------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS base-cpu

FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 AS base-cuda
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && ln -sf /usr/bin/python3 /usr/local/bin/python \
 && rm -rf /var/lib/apt/lists/*

# --- build: a virtualenv with curvecast and its wheels --------------------------------------------
FROM base-${VARIANT} AS build
ARG VARIANT
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pfn pfn
COPY prior prior
COPY serve serve
COPY train train
RUN if [ "$VARIANT" = "cuda" ]; then \
      pip install "torch>=2.13,<2.14" --index-url https://download.pytorch.org/whl/cu126 \
      && pip install ".[gpu]" \
      && pip uninstall -y onnxruntime && pip install "onnxruntime-gpu>=1.18"; \
    else \
      pip install "torch>=2.13,<2.14" --index-url https://download.pytorch.org/whl/cpu \
      && pip install .; \
    fi \
 && curvecast export-onnx --model default \
 && curvecast export-onnx --model stage4

# --- runtime: non-root, no compilers, no sources ---------------------------------------------------
FROM base-${VARIANT} AS runtime
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/curvecast curvecast
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    XDG_CACHE_HOME=/tmp/curvecast-cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    CURVECAST_HOST=0.0.0.0 \
    CURVECAST_PORT=8000
USER 10001:10001
WORKDIR /home/curvecast
EXPOSE 8000
# liveness (the model is verified at start; /readyz is the readiness endpoint for orchestrators)
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; u = 'http://127.0.0.1:%s/healthz' % os.environ.get('CURVECAST_PORT', '8000'); sys.exit(0 if urllib.request.urlopen(u, timeout=2).status == 200 else 1)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["curvecast", "serve"]
