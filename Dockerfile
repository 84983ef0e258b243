# The server on SQLite by default (data in the /data volume), or on PostgreSQL
# with ASSISTANTS_DATABASE_URL (see docker-compose.yml).
FROM python:3.11-slim

# LITELLM_LOCAL_MODEL_COST_MAP: litellm would otherwise fetch its model price
# list from the network on import.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LITELLM_LOCAL_MODEL_COST_MAP=True \
    ASSISTANTS_DATA_DIR=/data

WORKDIR /srv/assistants

# Dependencies first, read from pyproject.toml, so that editing the code does
# not reinstall them. As in scripts/bootstrap, litellm comes last with
# --no-deps: it declares openai<3, which we deliberately break (see the
# comments in pyproject.toml); 1.107.0 was a compromised release, hence the pin.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && pip install --no-deps "litellm==1.100.5" \
    && rm /tmp/requirements.txt

# Editable like scripts/bootstrap: the migrations are found next to the app
# package (app/db.py), so the code runs from this directory.
COPY README.md ./
COPY migrations ./migrations
COPY app ./app
RUN pip install --no-deps -e . && python -m compileall -q app migrations

# The code interpreter's sandbox: bubblewrap, and a Python with the data stack
# under /usr (the only system tree the sandbox mounts). The container needs
# user namespaces: run it with `--security-opt seccomp=unconfined
# --security-opt apparmor=unconfined` (or a seccomp profile allowing clone/
# unshare/mount), or set ASSISTANTS_SANDBOX=none only if you accept running
# model-written code unisolated (the server warns loudly).
RUN apt-get update && apt-get install -y --no-install-recommends bubblewrap && rm -rf /var/lib/apt/lists/*
COPY scripts/sandbox-setup ./scripts/sandbox-setup
RUN SANDBOX_BASE_PYTHON=/usr/local/bin/python3.11 SANDBOX_VENV=/srv/assistants/.sandbox-venv ./scripts/sandbox-setup
ENV ASSISTANTS_SANDBOX_PYTHON=/srv/assistants/.sandbox-venv

RUN useradd --system --uid 10001 --create-home assistants \
    && mkdir /data && chown assistants:assistants /data
USER assistants
VOLUME /data
EXPOSE 8000

# Something answers on the port once migrations ran and the app started.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s \
    CMD ["python", "-c", "import os, socket; socket.create_connection(('127.0.0.1', int(os.environ.get('ASSISTANTS_PORT', '8000'))), 2).close()"]

# Exec form: the server is PID 1 and gets docker stop's SIGTERM (graceful shutdown).
ENTRYPOINT ["python", "-m", "app"]
CMD ["serve", "--host", "0.0.0.0"]
