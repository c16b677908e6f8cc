"""The operator's few touches of checkpoint storage: deleting a removed run's checkpoints (only when
`storage.deleteOnRemoval` is set) and reading a round's manifest when its pod is gone.

Credentials come from the run's own `storage.credentialsSecret`, read through the API, so the
operator needs no storage access of its own. boto3 is synchronous: calls run in a thread.
"""

from __future__ import annotations

import asyncio
import base64

from ..checkpoints import CheckpointError, CheckpointStore
from ..spec import LearnerRunSpec
from .kube import Kube
from .results import ResultError, RoundResult, result_from_manifest

ACCESS_KEY = "AWS_ACCESS_KEY_ID"
SECRET_KEY = "AWS_SECRET_ACCESS_KEY"


def missing_secret_message(secret: str, namespace: str) -> str:
    return f"storage.credentialsSecret {secret!r} not found in namespace {namespace!r}"


async def open_store(kube: Kube, *, spec: LearnerRunSpec, namespace: str) -> CheckpointStore:
    keys: dict[str, str | None] = {"access_key": None, "secret_key": None}
    if name := spec.storage.credentials_secret:
        secret = await kube.get("v1", "secrets", namespace, name)
        if secret is None:
            raise ValueError(missing_secret_message(name, namespace))
        data = secret.get("data") or {}
        for field, key in (("access_key", ACCESS_KEY), ("secret_key", SECRET_KEY)):
            if data.get(key):
                keys[field] = base64.b64decode(data[key]).decode()
    return await asyncio.to_thread(CheckpointStore.from_uri, spec.storage.uri, endpoint=spec.storage.endpoint,
                                   region=spec.storage.region, **keys)


async def delete_run(kube: Kube, *, spec: LearnerRunSpec, run: str, namespace: str) -> str:
    store = await open_store(kube, spec=spec, namespace=namespace)
    await asyncio.to_thread(store.delete_run, run)
    return f"{store.uri}/{run}"


async def manifest_result(kube: Kube, *, spec: LearnerRunSpec, run: str, namespace: str, round_: int) -> RoundResult:
    """A published round's result from its manifest; ResultError when there is none."""
    try:
        store = await open_store(kube, spec=spec, namespace=namespace)
        ref = store.ref(run, round_)
        manifest = await asyncio.to_thread(store.manifest, ref)
    except (ValueError, CheckpointError, OSError) as err:
        raise ResultError(f"no manifest for round {round_}: {err}") from None
    except Exception as err:  # noqa: BLE001 - botocore errors are many; any of them means "not readable"
        raise ResultError(f"no manifest for round {round_}: {type(err).__name__}: {err}") from None
    return result_from_manifest(manifest, round_=round_, checkpoint=ref.uri)
