"""Uploaded fine-tuning files: their records in the database, their bytes in the storage."""

from __future__ import annotations

import hashlib
from pathlib import Path

from sqlalchemy import Engine, select

import adapterdeck.registry.schema as t
from adapterdeck.registry.db import Page, ensure_tenant, fetch_page, now, write_transaction
from adapterdeck.registry.errors import NotFound
from adapterdeck.registry.finetune.names import FILE_PREFIX, new_id
from adapterdeck.registry.finetune.records import FILE_COLUMNS, FILE_FROM, FileRecord, file_record, seq_of
from adapterdeck.registry.store import FileStore, sha256_file


class UploadedFiles:
    """The files part of ``FineTuning``: a file is listed once its bytes are stored."""

    engine: Engine
    files: FileStore

    def add_file(
        self,
        tenant: str,
        filename: str,
        purpose: str,
        *,
        path: str | Path | None = None,
        data: bytes | None = None,
        format: str | None = None,
        examples: int | None = None,
    ) -> FileRecord:
        """Store a file (from ``path`` or ``data``) for ``tenant``; it is listed once it is stored."""
        if (path is None) == (data is None):
            raise ValueError("give exactly one of path and data")
        file_id = new_id(FILE_PREFIX)
        if path is not None:
            size = Path(path).stat().st_size
            digest = sha256_file(path)
            self.files.put_file(file_id, path)
        else:
            assert data is not None
            size, digest = len(data), hashlib.sha256(data).hexdigest()
            self.files.put_bytes(file_id, data)
        try:
            with write_transaction(self.engine) as conn:
                conn.execute(
                    t.ft_files.insert().values(
                        id=file_id,
                        tenant_id=ensure_tenant(conn, tenant),
                        filename=filename,
                        purpose=purpose,
                        bytes=size,
                        sha256=digest,
                        format=format,
                        examples=examples,
                        created_at=now(),
                    )
                )
        except BaseException:
            self.files.delete(file_id)
            raise
        return self.get_file(file_id, tenant)

    def get_file(self, file_id: str, tenant: str | None) -> FileRecord:
        query = select(*FILE_COLUMNS).select_from(FILE_FROM).where(t.ft_files.c.id == file_id)
        if tenant is not None:
            query = query.where(t.tenants.c.name == tenant)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None:
            raise NotFound(f"No such file: {file_id}")
        return file_record(row)

    def list_files(
        self,
        tenant: str | None,
        *,
        purpose: str | None = None,
        after: str | None = None,
        limit: int = 10000,
        order: str = "desc",
    ) -> Page:
        query = select(*FILE_COLUMNS).select_from(FILE_FROM)
        if tenant is not None:
            query = query.where(t.tenants.c.name == tenant)
        if purpose is not None:
            query = query.where(t.ft_files.c.purpose == purpose)
        with self.engine.connect() as conn:
            mark = seq_of(conn, t.ft_files, after, tenant, "No such file")
            return fetch_page(
                conn,
                query,
                t.ft_files.c.seq,
                after=mark,
                limit=limit,
                descending=order == "desc",
                item=file_record,
            )

    def file_content(self, record: FileRecord) -> bytes:
        return self.files.read(record.id, record.sha256)

    def delete_file(self, file_id: str, tenant: str | None) -> None:
        record = self.get_file(file_id, tenant)
        with write_transaction(self.engine) as conn:
            conn.execute(t.ft_files.delete().where(t.ft_files.c.id == record.id))
        self.files.delete(record.id)
