# The greeter gRPC example (examples/grpc): grpcio from the host-side wheelhouse, no code
# generation. Compose picks server or client by its command; VERSION and FAIL set the server's behaviour.
ARG BASE_IMAGE=python:3.12-slim
FROM ${BASE_IMAGE}
COPY wheels /wheels
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --quiet --no-index --find-links /wheels grpcio \
    && rm -rf /wheels
COPY greeter /app/greeter
WORKDIR /app
EXPOSE 50051
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
CMD ["python", "-m", "greeter.server"]
