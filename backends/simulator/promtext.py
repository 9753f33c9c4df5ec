"""A small writer for the Prometheus text exposition format, version 0.0.4."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from .stats import Histogram

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = Mapping[str, str]


def format_value(value: float) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape_label(str(v))}"' for k, v in labels.items()) + "}"


class MetricsWriter:
    """Collects metric families; ``text()`` returns the exposition."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._names: set[str] = set()

    def _header(self, name: str, kind: str, help_text: str) -> None:
        if name in self._names:
            raise ValueError(f"metric family {name} written twice")
        self._names.add(name)
        self._lines.append(f"# HELP {name} {_escape_help(help_text)}")
        self._lines.append(f"# TYPE {name} {kind}")

    def _sample(self, name: str, labels: Labels, value: float) -> None:
        self._lines.append(f"{name}{format_labels(labels)} {format_value(value)}")

    def gauge(self, name: str, help_text: str, samples: Iterable[tuple[Labels, float]]) -> None:
        self._header(name, "gauge", help_text)
        for labels, value in samples:
            self._sample(name, labels, value)

    def counter(self, name: str, help_text: str, samples: Iterable[tuple[Labels, float]]) -> None:
        """A counter; ``name`` is used verbatim (vLLM names end in ``_total``, TGI's do not)."""
        self._header(name, "counter", help_text)
        for labels, value in samples:
            self._sample(name, labels, value)

    def histogram(
        self, name: str, help_text: str, histogram: Histogram, labels: Labels | None = None
    ) -> None:
        self._header(name, "histogram", help_text)
        base = dict(labels or {})
        for bound, count in histogram.cumulative():
            self._sample(f"{name}_bucket", {**base, "le": format_value(float(bound))}, count)
        self._sample(f"{name}_sum", base, float(histogram.total))
        self._sample(f"{name}_count", base, histogram.count)

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"
