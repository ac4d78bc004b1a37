# One image for every echoq service: worker, beat, flower, api and the replica simulator.
# Compose gives each service its command (`echoq worker`, `echoq beat`, ...); there is no
# ENTRYPOINT, so `docker compose run worker echoq --help` and a shell both work as expected.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# ffmpeg decodes audio uploads (pydub runs it as a subprocess).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ffmpeg \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . /src
RUN pip install "/src[api]" \
    && rm -rf /src/build /src/*.egg-info

# Run as an unprivileged user; /data/out is where the simulator writes the audio it received.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin echoq \
    && mkdir -p /data/out \
    && chown -R echoq:echoq /data
USER echoq
WORKDIR /home/echoq

CMD ["echoq", "--help"]
