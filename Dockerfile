# vlbot on CPU. Build: docker build -t vlbot .   Run: see README ("Docker").
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/home/vlbot/.cache/huggingface \
    VLBOT_DATA_DIR=/data \
    VLBOT_HTTP__HOST=0.0.0.0

# A C compiler for the CPU kernels (engine/cpu/kernels/), built on first use; without one the
# engine uses torch's own operators, slower. The fonts draw `vlbot eval`'s labelled image set.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
        fonts-dejavu-core fonts-liberation fonts-wqy-microhei \
    && rm -rf /var/lib/apt/lists/*

# CPU build of torch from the PyTorch CPU index (PyPI's default torch is a multi-GB CUDA build).
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /app
COPY pyproject.toml README.md ./
COPY bot ./bot
COPY engine ./engine
COPY adapters ./adapters
# torch is already satisfied by the CPU build above, so pip keeps it.
RUN pip install . && python -c "import torch, sys; sys.exit(torch.version.cuda is not None)"

RUN useradd --create-home --uid 1000 vlbot && mkdir -p /data "$HF_HOME" \
    && chown -R vlbot:vlbot /data /home/vlbot
USER vlbot

# Model weights (Hugging Face cache) and history live in volumes, not in the image.
VOLUME ["/home/vlbot/.cache/huggingface", "/data"]
EXPOSE 8080

HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4).status != 200)"

ENTRYPOINT ["vlbot"]
CMD ["serve"]
