"""The fleet's durable state: pinned aliases (``pins``) and ``adapterdeck registry pin``,
``unpin`` and ``pins`` (``cli``). The replicas and the routing are processes: ``serve/fleet/``."""

from adapterdeck.registry.fleet.pins import MAX_REPLICAS, Pin, Pins, check_replicas

__all__ = ["MAX_REPLICAS", "Pin", "Pins", "check_replicas"]
