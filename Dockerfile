# The image for both `pmq worker` and `pmq serve`: slim Python, no build tools.
# The base is a build argument so that machines without Docker Hub can build on
# a Python image of their own (the compose test does); the default is the
# pinned official image.
ARG PYTHON_IMAGE=python:3.12.8-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # Every `pmq` started as root switches to this user once it has read its
    # secrets, which compose mounts with the host file's owner and mode (600).
    PMQ_RUN_AS=10001:10001

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin pmq
WORKDIR /app
COPY pyproject.toml ./
# Dependencies first, in a layer that changes only with pyproject.toml: a code change
# then rebuilds in seconds.
RUN python -c "import subprocess, sys, tomllib; \
deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
subprocess.check_call([sys.executable, '-m', 'pip', 'install', *deps])" \
    && rm -rf /root/.cache
COPY README.md ./
COPY worker ./worker
COPY mcp_frontend ./mcp_frontend
RUN pip install --no-deps . && rm -rf /root/.cache

# Root until the secrets are read: see PMQ_RUN_AS above and mcp_frontend/privileges.py.
USER root
EXPOSE 8000 9100
ENTRYPOINT ["pmq"]
CMD ["serve", "--transport", "http", "--host", "0.0.0.0", "--port", "8000"]
