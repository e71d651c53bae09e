"""The web dashboard at ``/ui``: server-rendered pages over the gateway's own HTTP API."""
