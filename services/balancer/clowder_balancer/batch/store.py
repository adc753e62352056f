"""Batch state in etcd: files/, batches/, each line's result written once, and balancers' claims on chunks."""

from __future__ import annotations

import logging
from typing import Callable

from clowder.balancer.v1 import batch_pb2
from clowder_common.errors import AlreadyExists, NotFound
from clowder_common.etcd import EtcdState, Versioned

log = logging.getLogger(__name__)

FILES = "files/"
BATCHES = "batches/"
RESULTS = "batch-results/"
CLAIMS = "batch-claims/"
FINALIZE_CLAIM = "finalize"
# Suffixes of a result key: the outcome is in the key, so counting needs no values (keys-only range).
OK, ERR = "ok", "err"


def file_not_found(file_id: str) -> NotFound:
    return NotFound(f"No such File object: {file_id}", reason="FILE_NOT_FOUND", field="file_id",
                    metadata={"id": file_id})


def batch_not_found(batch_id: str) -> NotFound:
    return NotFound(f"No such Batch object: {batch_id}", reason="BATCH_NOT_FOUND", field="batch_id",
                    metadata={"id": batch_id})


class BatchStore:
    def __init__(self, state: EtcdState) -> None:
        self.state = state

    def _file(self, file_id: str) -> str:
        return self.state.key(FILES + file_id)

    def batch_key(self, batch_id: str) -> str:
        return self.state.key(BATCHES + batch_id)

    @property
    def batches_prefix(self) -> str:
        return self.state.key(BATCHES)

    def _results(self, batch_id: str) -> str:
        return self.state.key(f"{RESULTS}{batch_id}/")

    def _result(self, batch_id: str, index: int, outcome: str) -> str:
        return f"{self._results(batch_id)}{index:08d}.{outcome}"

    def _claims(self, batch_id: str) -> str:
        return self.state.key(f"{CLAIMS}{batch_id}/")

    # -- files -----------------------------------------------------------------------------------

    async def create_file(self, f: batch_pb2.BatchFile) -> None:
        await self.state.create(self._file(f.id), f)

    async def get_file(self, file_id: str) -> batch_pb2.BatchFile:
        found = await self.state.get(self._file(file_id), batch_pb2.BatchFile)
        if found is None:
            raise file_not_found(file_id)
        return found.value

    async def list_files(self) -> list[batch_pb2.BatchFile]:
        items, _ = await self.state.list(self.state.key(FILES), batch_pb2.BatchFile)
        return [i.value for i in items]

    async def delete_file(self, file_id: str) -> bool:
        return await self.state.delete(self._file(file_id))

    # -- batches ---------------------------------------------------------------------------------

    async def create_batch(self, batch: batch_pb2.Batch) -> None:
        await self.state.create(self.batch_key(batch.id), batch)

    async def get_batch(self, batch_id: str) -> Versioned[batch_pb2.Batch]:
        found = await self.state.get(self.batch_key(batch_id), batch_pb2.Batch)
        if found is None:
            raise batch_not_found(batch_id)
        return found

    async def list_batches(self) -> list[batch_pb2.Batch]:
        items, _ = await self.state.list(self.batches_prefix, batch_pb2.Batch)
        return [i.value for i in items]

    async def mutate(self, batch_id: str, change: Callable[[batch_pb2.Batch], bool]) -> batch_pb2.Batch:
        """Apply `change` to the stored batch until a compare-and-swap takes it; `change` returning False
        leaves the batch as it is (a transition that no longer applies). Returns the batch as stored."""
        while True:
            current = await self.get_batch(batch_id)
            batch = batch_pb2.Batch()
            batch.CopyFrom(current.value)
            if not change(batch):
                return current.value
            if await self.state.update(current.key, batch, current.mod_revision):
                return batch

    # -- results ---------------------------------------------------------------------------------

    async def put_result(self, batch_id: str, index: int, result: batch_pb2.BatchResult) -> bool:
        """Record line `index`'s outcome unless one is recorded already (either outcome): True if this wrote it."""
        ok_key, err_key = self._result(batch_id, index, OK), self._result(batch_id, index, ERR)
        key = ok_key if result.status_code == 200 else err_key
        return await self.state.put_if_absent(key, result, others=[k for k in (ok_key, err_key) if k != key])

    async def result_outcomes(self, batch_id: str) -> dict[int, bool]:
        """Line index -> succeeded, for every line with a recorded result (keys only: no values travel)."""
        prefix = self._results(batch_id)
        out: dict[int, bool] = {}
        for key in await self.state.list_keys(prefix):
            name = key.removeprefix(prefix)
            index, _, outcome = name.partition(".")
            out[int(index)] = outcome == OK
        return out

    async def results(self, batch_id: str) -> dict[int, batch_pb2.BatchResult]:
        prefix = self._results(batch_id)
        items, _ = await self.state.list(prefix, batch_pb2.BatchResult)
        return {int(i.key.removeprefix(prefix).partition(".")[0]): i.value for i in items}

    # -- claims ----------------------------------------------------------------------------------

    async def claim(self, batch_id: str, name: str, balancer: str, lease: int) -> bool:
        """Take chunk `name` (or the finalize claim) under `lease`; False when another balancer holds it."""
        try:
            await self.state.create(self._claims(batch_id) + name, batch_pb2.BatchClaim(balancer=balancer, lease=lease),
                                    lease=lease)
        except AlreadyExists:
            return False
        return True

    async def release(self, batch_id: str, name: str, lease: int) -> None:
        """Drop a claim, only if it is still ours (a claim that expired may belong to someone else now)."""
        key = self._claims(batch_id) + name
        found = await self.state.get(key, batch_pb2.BatchClaim)
        if found is not None and found.value.lease == lease:
            await self.state.delete(key, found.mod_revision)

    async def claims(self, batch_id: str) -> dict[str, batch_pb2.BatchClaim]:
        prefix = self._claims(batch_id)
        items, _ = await self.state.list(prefix, batch_pb2.BatchClaim)
        return {i.key.removeprefix(prefix): i.value for i in items}

    async def clear(self, batch_id: str) -> None:
        """Forget the per-line records of a batch that ended (its files hold them now)."""
        await self.state.delete_prefix(self._results(batch_id))
        await self.state.delete_prefix(self._claims(batch_id))
