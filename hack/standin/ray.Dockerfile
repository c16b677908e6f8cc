# A stand-in for rayproject/ray:2.60.0-py311 where no registry can be reached (hack/images.sh
# --local-base). It keeps what Dockerfile.serve relies on: the user ray (1000:100) who owns a Python
# env on PATH, with ray[serve] of the pinned version, home /home/ray.
ARG BASE=selflearn-standin/python:3.11-bookworm
FROM ${BASE}
ARG RAY_VERSION=2.60.0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN useradd --uid 1000 --gid 100 --create-home --home-dir /home/ray --shell /bin/bash ray \
 && python -m venv /home/ray/anaconda3 \
 && chown -R 1000:100 /home/ray
ENV PATH=/home/ray/anaconda3/bin:$PATH
USER 1000:100
WORKDIR /home/ray
RUN pip install --no-cache-dir --disable-pip-version-check "ray[serve]==${RAY_VERSION}"
CMD ["bash"]
