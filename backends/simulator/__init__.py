"""A simulated LLM model server (TGI, vLLM, SGLang or TEI) with a realistic latency model.

Speaks the real servers' HTTP APIs and Prometheus metric names so the gateway can be exercised without
GPUs. Run it with ``python -m backends.simulator`` (see ``cli.py``) or in-process with
``app.build_app`` + ``app.start_server``. Runtime knobs: ``POST /sim/control``, ``GET /sim/state``.
"""
