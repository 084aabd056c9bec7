# memory-gateway:
#   docker build -t memory-gateway .
#   docker run -p 8080:8080 -v mg-data:/data \
#     -e OPENAI_API_KEY=sk-... -e GATEWAY_ADMIN_KEY=<a long random string> memory-gateway
# With an OPENAI_API_KEY, whoever reaches the port spends that key unless
# auth.require_key is true: mount a gateway.yaml that issues per-user keys
# over /app/gateway.yaml (README.md, docs/gateway.md "Docker").
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_DATA_DIR=/data

WORKDIR /app

# Optional extras to install, separated by commas: `postgres` for a shared
# extraction queue (docs/scaling.md; deploy/compose.yaml builds with it).
ARG EXTRAS=""

# The dependencies first, in a layer of their own: editing the source does not
# reinstall them. The list is pyproject.toml's [project].dependencies and the
# EXTRAS' [project.optional-dependencies].
COPY pyproject.toml ./
RUN EXTRAS="$EXTRAS" python -c "import os, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; deps = p['dependencies'] + [d for e in os.environ['EXTRAS'].split(',') if e.strip() for d in p['optional-dependencies'][e.strip()]]; open('/tmp/requirements.txt', 'w').write('\n'.join(deps) + '\n')" \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt \
    && useradd --create-home --uid 10001 gateway \
    && mkdir -p /data \
    && chown gateway:gateway /data

# gateway/defaults.yaml is a symlink to ../gateway.yaml: the built-in defaults
# are that file, so it sits next to the package when the wheel is built (the
# wheel holds a copy). It also stays as /app/gateway.yaml, the ./gateway.yaml
# that `serve` and `health` read from this directory: mount your own over it.
COPY README.md gateway.yaml ./
COPY gateway ./gateway
COPY memory ./memory
RUN pip install --no-cache-dir --no-deps .

USER gateway
VOLUME ["/data"]
EXPOSE 8080
# `health` finds the port the way `serve` does (./gateway.yaml, GATEWAY_PORT...)
# and asks http://127.0.0.1:<port>/health; it exits 0 when healthy, else 1.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["memory-gateway", "health"]
# Listening on every interface comes from GATEWAY_HOST above, so that `health`
# reads the same configuration as `serve`: change the port with GATEWAY_PORT
# (not a --port flag, which the health check would not see).
CMD ["memory-gateway", "serve"]
