# The bookinfo services and Istio's tcp-echo in one image; compose picks the service by its command.
# PyMySQL: ratings v2 reads its stars from MariaDB (DB_TYPE=mysql).
ARG BASE_IMAGE=python:3.12-slim
FROM ${BASE_IMAGE}
COPY wheels /wheels
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --quiet --no-index --find-links /wheels aiohttp PyMySQL
COPY *.py /app/
WORKDIR /app
EXPOSE 9080
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
CMD ["python", "productpage.py"]
