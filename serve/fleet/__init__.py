"""The fleet in the gateway: many vLLM replicas behind one gateway (``replicas``), the routing
over them (``router``, pure), what a replica tells about itself (``probe``), and the pinned
aliases kept loaded on them (``pins``, with their HTTP API in ``api``). The durable pins are
``registry/fleet``."""
