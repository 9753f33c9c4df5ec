"""Load-aware endpoint weights: model servers' telemetry → EDS ``load_balancing_weight``.

The contract, in the style of the Kubernetes Gateway API inference extension (filters, scorers, pickers),
cut down to what a weight on an EDS endpoint can express. Envoy does the picking; this package only
decides how much of the choice each replica deserves.

**Scorer** (``scorers.py``)
    Maps one endpoint's ``EndpointSignals`` to a score in [0, 1], 1 meaning the most spare capacity, or
    ``None`` when the signals it needs are missing (TGI reports no KV-cache usage, the first scrape has
    no latency means). ``score(signals, fleet=None)``: ``fleet`` (a ``FleetView`` of the fresh signals
    of the same model's endpoints) lets a scorer be relative to its peers, e.g. a queue compared with the
    fleet's shortest, a latency compared with the fleet's best. A scorer has a ``name`` and no state.

**WeightPolicy** (``policy.py``)
    Combines weighted scorer outputs per endpoint (a weighted mean over the scorers that returned a
    score) into integer weights in [1, max_weight] (default 100), within one group of endpoints that
    share a cluster, i.e. one model:

    - an endpoint's weight is proportional to ``static weight x combined score``, scaled so that the
      group's best endpoint gets ``max_weight`` (integer weights keep 1 % resolution; an equally loaded
      fleet gets equal weights whatever the absolute load, so absolute load changes cause no pushes);
    - an endpoint with stale (older than ``max_age_s``) or missing signals, or none that any scorer can
      use, is *neutral*: it is given the group's mean score, i.e. its static weight relative to an
      average peer; it is neither favoured nor starved;
    - a group where no endpoint has usable signals gets its static weights unchanged, so a gateway
      without telemetry produces exactly the EDS it would produce without this package.

    Policies are registered by name (``make_policy``): ``none`` (no policy: static weights),
    ``queue`` (queue depth only) and ``telemetry`` (queue 0.5, KV cache 0.25, latency 0.25).

**WeightController** (``policy.py``)
    Sits between the policy and the xDS push. ``update(...)`` returns a complete new weight map only
    when some endpoint's weight moved by more than ``hysteresis`` (a fraction of the larger of the old
    and new weight) from the last published map *and* ``min_interval_s`` passed since that publication;
    otherwise ``None``, and the control plane pushes nothing. A change of the endpoint set or of a static
    weight is published at once. Small noise therefore never reaches the Envoys, and a real shift reaches
    them within one interval.

How Envoy uses the weights. The clusters use ``LEAST_REQUEST``. While all endpoint weights are equal,
Envoy picks the less busy of two random hosts (P2C) by in-flight requests. Once weights differ it uses a
weighted schedule whose effective weight is ``load_balancing_weight / (active_requests + 1) ^
active_request_bias`` (bias 1 by default). So the weights computed here shift each replica's *share* of
new requests over seconds, from what the servers report (queues, KV cache, latency, which Envoy cannot
see), while least-request still reacts instantly to each Envoy's own in-flight counts. Weights are per
Envoy and per cluster: only their ratios within one model matter.

Inputs from the registry (``registry.py``): ``endpoint_groups`` (model id → endpoint ids) and
``static_weights`` (endpoint id → registry weight).

Staleness: signals are scraped every ``interval_s`` (2 s by default); ``max_age_s`` should span a few
intervals (e.g. 3x) so a single failed scrape does not make an endpoint neutral.
"""
