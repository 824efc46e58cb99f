# One image for the API, the migration step and the workers. The torch wheel brings its own CUDA
# libraries, so a slim Python base serves GPU workers too (the host needs only the NVIDIA driver and
# the container toolkit).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ITRD_STATE_DIR=/state

WORKDIR /app

# Dependencies first, so a code change does not reinstall torch.
COPY pyproject.toml README.md ./
RUN mkdir -p itrd service worker \
    && touch itrd/__init__.py service/__init__.py worker/__init__.py \
    && pip install . \
    && pip uninstall -y itrd-service

COPY alembic.ini ./
COPY migrations ./migrations
COPY itrd ./itrd
COPY service ./service
COPY worker ./worker
# Editable, so the service finds migrations/ beside its package.
RUN pip install --no-deps -e . \
    && useradd --create-home --uid 1000 itrd \
    && mkdir -p /state /artifacts /data \
    && chown itrd /state /artifacts /data

USER itrd
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"
CMD ["itrd", "api", "--host", "0.0.0.0", "--port", "8000", "--no-migrate"]
