# The titan-mla training image: torch (CUDA build from PyPI), torchtitan, torchao and this project.
#   docker build -t titan-mla:latest .
#   docker run --gpus all --ipc=host titan-mla:latest ./run_train.sh --job.config_file train_configs/mla_1b.toml
# On SLURM: CONTAINER_IMAGE=titan-mla:latest sbatch ... infra/slurm/train.sbatch (enroot/pyxis);
# on Kubernetes: infra/k8s (image titan-mla:latest).
ARG PYTHON_IMAGE=python:3.12-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TORCH_VERSION=2.11.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

WORKDIR /workspace/titan-mla

# torch first, in its own layer: it is most of the image and changes least often.
RUN pip install "torch==${TORCH_VERSION}"

COPY pyproject.toml README.md ./
COPY titan_mla ./titan_mla
RUN pip install .

COPY run_train.sh ./
COPY train_configs ./train_configs
COPY infra ./infra

CMD ["./run_train.sh"]
