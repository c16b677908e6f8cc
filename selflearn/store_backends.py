"""Where a CheckpointStore's bytes live: a directory (file://) or an S3-compatible bucket (s3://).

Both backends offer the same small key-value interface (`Backend`); the store (checkpoints.py)
builds the layout, the manifests and the verification on top of it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Protocol


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or fails verification."""


class Backend(Protocol):
    def put_file(self, key: str, src: Path) -> None: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def put_if_absent(self, key: str, data: bytes) -> bool: ...
    def get_bytes(self, key: str) -> bytes | None: ...
    def get_file(self, key: str, dest: Path) -> None: ...
    def list_dirs(self, prefix: str) -> list[str]: ...
    def list_files(self, prefix: str) -> list[str]: ...
    def delete_prefix(self, prefix: str) -> None: ...
    def check(self) -> None: ...


class FileBackend:
    def __init__(self, root: Path):
        self.root = root

    def _p(self, key: str) -> Path:
        return self.root / key

    def put_file(self, key: str, src: Path) -> None:
        dst = self._p(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)

    def put_bytes(self, key: str, data: bytes) -> None:
        dst = self._p(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        # Write-then-rename so a reader never sees a torn manifest or pointer.
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Write `key` unless it exists; False when it did (someone else's write won)."""
        dst = self._p(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, dst)  # atomic, and refuses an existing name: a reader never sees half of it
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def get_bytes(self, key: str) -> bytes | None:
        try:
            return self._p(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def get_file(self, key: str, dest: Path) -> None:
        src = self._p(key)
        if not src.is_file():
            raise CheckpointError(f"missing file {src}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)

    def list_dirs(self, prefix: str) -> list[str]:
        d = self._p(prefix)
        return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []

    def list_files(self, prefix: str) -> list[str]:
        d = self._p(prefix)
        if not d.is_dir():
            return []
        return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and not p.name.startswith("."))

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._p(prefix), ignore_errors=True)

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"checkpoint directory {self.root} is not writable: {err}") from None
        if not os.access(self.root, os.W_OK):
            raise ValueError(f"checkpoint directory {self.root} is not writable")


class S3Backend:
    def __init__(self, bucket: str, prefix: str, *, endpoint: str | None = None, region: str | None = None,
                 access_key: str | None = None, secret_key: str | None = None):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint = endpoint
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("S3_ENDPOINT") or None,
            region_name=region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=60,
                          s3={"addressing_style": "path"}),
        )
        from boto3.s3.transfer import TransferConfig

        # Multipart above 64 MiB: a 500 MB weights file goes up in parallel parts and can resume.
        self.transfer = TransferConfig(multipart_threshold=64 * 1024 * 1024, multipart_chunksize=64 * 1024 * 1024)

    def _k(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_file(self, key: str, src: Path) -> None:
        self.client.upload_file(str(src), self.bucket, self._k(key), Config=self.transfer)

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """A conditional PUT (`If-None-Match: *`); False when the key exists (412) or another
        conditional write of it is in flight (409). A store without conditional writes (one that
        ignores the header, or answers 501) overwrites: callers read the key back and use that."""
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data, IfNoneMatch="*")
            return True
        except ClientError as err:
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status in (409, 412):
                return False
            if status != 501:
                raise
        self.put_bytes(key, data)
        return True

    def get_bytes(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def get_file(self, key: str, dest: Path) -> None:
        from botocore.exceptions import ClientError

        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client.download_file(self.bucket, self._k(key), str(dest), Config=self.transfer)
        except ClientError as err:
            raise CheckpointError(f"cannot download s3://{self.bucket}/{self._k(key)}: {err}") from None

    def _list(self, prefix: str, delimiter: bool) -> Iterable[dict]:
        p = self._k(prefix).strip("/")
        kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": p + "/" if p else ""}  # "": the bucket's root
        if delimiter:
            kw["Delimiter"] = "/"
        for page in self.client.get_paginator("list_objects_v2").paginate(**kw):
            yield page

    def list_dirs(self, prefix: str) -> list[str]:
        out = []
        for page in self._list(prefix, True):
            for cp in page.get("CommonPrefixes", []):
                out.append(cp["Prefix"].rstrip("/").rsplit("/", 1)[-1])
        return sorted(out)

    def list_files(self, prefix: str) -> list[str]:
        base = self._k(prefix).strip("/")
        base = base + "/" if base else ""
        return sorted(o["Key"][len(base):] for page in self._list(prefix, False) for o in page.get("Contents", []))

    def delete_prefix(self, prefix: str) -> None:
        keys = [{"Key": o["Key"]} for page in self._list(prefix, False) for o in page.get("Contents", [])]
        for i in range(0, len(keys), 1000):
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys[i:i + 1000]})

    def check(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as err:
            where = f" at {self.endpoint}" if self.endpoint else ""
            raise ValueError(f"bucket s3://{self.bucket}{where} is not reachable: {err}") from None
