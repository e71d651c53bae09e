"""Fine-tuning in the gateway: the HTTP API (``api``, ``objects``), a job as a run config (``spec``),
the workers (``worker``, ``local``) and their training child (``child``). The durable records are
``registry/finetune``."""
