# One image for every service in docker-compose.yml: anvil, the deployer and the nodes.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends make nodejs npm git && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . /app
ENV LONGTAIL_HOME=/data
RUN make setup
ENV PATH=/app/.venv/bin:$PATH
