"""The one health picture of a multi-process proxy, as data.

The supervisor runs the health checks and the outlier detector (fed by every worker's failures)
on its own copy of the topology; after each change it sends every worker this view, and a
worker copies it onto its own backends and providers. Moments (ejected until, down until, back
since) travel as offsets from the sender's now, so the two processes need not share a clock.
"""

from __future__ import annotations

from typing import Any

from .topology import Topology

_BACKEND_FIELDS = ("healthy", "ejections", "consecutive_failures", "on_probation", "draining",
                   "reason")
_BACKEND_MOMENTS = ("ejected_until", "usable_since")
_PROVIDER_FIELDS = ("state", "reason", "downs", "forced_down")
_PROVIDER_MOMENTS = ("down_until", "down_since", "up_since")


def export_view(topology: Topology, now: float, version: int) -> dict[str, Any]:
    upstreams = {}
    for upstream in topology.upstreams.values():
        upstreams[upstream.name] = {
            "backends": {
                b.name: _export(b, _BACKEND_FIELDS, _BACKEND_MOMENTS, now)
                for b in upstream.backends
            },
            "providers": {
                p.name: _export(p, _PROVIDER_FIELDS, _PROVIDER_MOMENTS, now)
                for p in upstream.providers.values()
            },
        }
    return {"t": "health", "version": version, "upstreams": upstreams}


def apply_view(topology: Topology, view: dict[str, Any], now: float) -> None:
    """Make this process's backends and providers what the supervisor says they are."""
    for name, state in view["upstreams"].items():
        upstream = topology.upstreams.get(name)
        if upstream is None:
            continue  # a generation this worker has not loaded yet; the next view will match
        for backend in upstream.backends:
            if backend.name in state["backends"]:
                _apply(backend, state["backends"][backend.name], now)
        for provider in upstream.providers.values():
            if provider.name in state["providers"]:
                _apply(provider, state["providers"][provider.name], now)
        upstream.refresh(now)


def _export(item: object, fields: tuple[str, ...], moments: tuple[str, ...], now: float
            ) -> dict[str, Any]:
    data = {name: getattr(item, name) for name in fields}
    for name in moments:
        moment = getattr(item, name)
        data[name] = moment - now if moment else None
    return data


def _apply(item: object, data: dict[str, Any], now: float) -> None:
    for name, value in data.items():
        if name in _BACKEND_MOMENTS or name in _PROVIDER_MOMENTS:
            value = now + value if value is not None else 0.0
        setattr(item, name, value)
