"""Load telemetry of the model servers: what each replica reports about its queue, batch, KV cache and GPU.

Modules (import them directly; this package imports nothing, so importing it costs nothing):

- ``signals``: ``EndpointSignals`` and ``GpuSignals``, the normalised, engine-independent view of one
  scrape (plain frozen data, with the monotonic time it was taken).
- ``metric_map`` + ``metric_map.yaml``: which Prometheus metric names give which signal for each engine
  kind (TGI, vLLM, SGLang, TEI) and for a DCGM exporter, with aggregation and unit factors as data. An
  operator may pass a file of their own (``load_metric_map(path)``).
- ``parse``: pure functions from Prometheus text exposition to signals.
- ``scraper``: ``TelemetryScraper`` (one HTTP scrape) and ``TelemetryCollector`` (the periodic,
  bounded-concurrency loop over a target list, keeping the latest signals and the last failure of each
  endpoint).
- ``gpu_nvml``: optional local GPU readings through NVML (``nvidia-ml-py``), imported lazily.

The signals feed ``control_plane.balancing``, which turns them into EDS load-balancing weights.
"""
