# The minimesh daemon, for running it as a compose service (Docker Desktop, or no root on the host).
ARG BASE_IMAGE=python:3.12-slim
FROM ${BASE_IMAGE}
COPY wheels /wheels
RUN (command -v iptables && command -v ss) >/dev/null || (apt-get update -qq && apt-get install -y -qq iptables iproute2 util-linux >/dev/null)
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --quiet --no-index --find-links /wheels minimesh uvloop \
    && rm -rf /wheels
COPY minimesh-entrypoint.sh /usr/local/bin/minimesh-entrypoint
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
WORKDIR /work
ENTRYPOINT ["minimesh-entrypoint"]
CMD ["up", "--capture", "netns", "-f", "/etc/minimesh/mesh.yaml"]
