# syntax=docker/dockerfile:1
# Multi-stage: build a virtualenv with the pinned dependencies, copy it into a slim runtime that
# runs as a non-root user, migrates the database, then serves with uvicorn.

FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml constraints.txt README.md ./
COPY app ./app
COPY salesmsg_emulator ./salesmsg_emulator
RUN /opt/venv/bin/pip install -c constraints.txt .

FROM python:3.11-slim AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SMC_HOME=/srv/salesmsg-connect \
    SMC_ENV=production
RUN groupadd --system --gid 10001 smc && useradd --system --uid 10001 --gid smc --home /srv/salesmsg-connect smc
WORKDIR /srv/salesmsg-connect
COPY --from=build /opt/venv /opt/venv
COPY alembic.ini ./
COPY migrations ./migrations
COPY templates ./templates
COPY static ./static
COPY scripts/docker-start.sh /usr/local/bin/docker-start
RUN mkdir -p var && chown smc:smc var
USER smc
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"
CMD ["docker-start"]
