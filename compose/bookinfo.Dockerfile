# The four bookinfo services in one image; compose picks the service by its command.
ARG BASE_IMAGE=python:3.12-slim
FROM ${BASE_IMAGE}
COPY wheels /wheels
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --quiet --no-index --find-links /wheels aiohttp
COPY *.py /app/
WORKDIR /app
EXPOSE 9080
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
CMD ["python", "productpage.py"]
