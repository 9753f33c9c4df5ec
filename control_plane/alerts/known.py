"""The alert names an `auto_drain` entry may use: the gateway's alerts (the required list), plus any other
rule in the shipped rules file. A name outside them would never fire, so a setting naming it is a typo."""

from __future__ import annotations

import functools
import logging

import yaml

log = logging.getLogger(__name__)


@functools.cache
def known_alerts() -> frozenset[str]:
    # Imported here, not at the top: the registry schema calls this, and the observability package
    # imports the xDS resources, which import the schema.
    from control_plane.observability.runbooks import REQUIRED_ALERTS, alerts

    names = set(REQUIRED_ALERTS)
    try:
        names.update(str(rule["alert"]) for rule in alerts())
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:  # not shipped with this install: the list
        log.debug("alert rules not readable (%s); known alerts are the required ones", exc)
    return frozenset(names)


def unknown_alert_problem(name: str) -> str | None:
    """Why `name` cannot be an auto-drain alert, or None if it can."""
    if name in known_alerts():
        return None
    return f"no alert is named {name!r}; known alerts: {', '.join(sorted(known_alerts()))}"
