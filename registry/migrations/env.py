"""Alembic environment: migrations run on the connection the registry hands over."""

from alembic import context

from adapterdeck.registry.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
context.run_migrations()
