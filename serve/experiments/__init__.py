"""A/B experiments in the gateway: the running experiments and their record (``traffic``), shadow
copies (``shadow``) and the HTTP API (``api``). The durable rules are ``registry/experiments``."""
