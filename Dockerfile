# The control plane (and the simulated backends) as one image. Envoy runs from envoyproxy/envoy.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY control_plane ./control_plane
COPY backends ./backends
COPY envoy ./envoy
RUN pip install --no-cache-dir .
ENV PYTHONUNBUFFERED=1
EXPOSE 18000 8081
ENTRYPOINT ["python", "-m", "control_plane"]
CMD ["serve", "--config", "/config/models.yaml", "--xds-host", "0.0.0.0", "--admin-host", "0.0.0.0"]
