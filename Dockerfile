# The project's image: import-patient, export-volumes, the ML backend (gunicorn backend.app:create_app())
# and the RQ workers (sts-worker) run from it with different commands.
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 curl \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 1000 sts
WORKDIR /app
COPY pyproject.toml README.md ./
COPY core ./core
COPY importers ./importers
COPY exporters ./exporters
COPY backend ./backend
COPY workers ./workers
RUN pip install ".[workers,backend]" && pip install --no-deps "label-studio-ml==1.0.9"
USER sts
ENV STS_DATA_DIR=/data
VOLUME ["/data"]
CMD ["import-patient", "--help"]
