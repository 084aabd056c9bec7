# memory-gateway: docker build -t memory-gateway . && docker run -p 8080:8080 -v mg-data:/data memory-gateway
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GATEWAY_DATA_DIR=/data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY memory ./memory
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 10001 gateway \
    && mkdir -p /data \
    && chown gateway:gateway /data
# The documented defaults; `serve` reads ./gateway.yaml. Mount your own over it.
COPY gateway.yaml ./gateway.yaml

USER gateway
VOLUME ["/data"]
EXPOSE 8080
# The slim image has no curl: ask /health with the standard library.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('GATEWAY_PORT', '8080') + '/health', timeout=4); sys.exit(0 if r.status == 200 else 1)"]
CMD ["memory-gateway", "serve", "--host", "0.0.0.0"]
