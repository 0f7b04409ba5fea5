"""Open streams that a busy host sees: StreamGuestFaults of VMMs and slow WatchEvents readers.

Used by ``bench/bench_streams.py`` and by ``tests/test_stream_load.py``. The load runs on an
asyncio loop of its own thread (grpc.aio client), so one process can hold dozens of streams.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio

from tagstore.v1 import tagstore_pb2 as pb
from tagstore.v1 import tagstore_pb2_grpc as pb_grpc

BOOT_RAM_GPA = 0x4000_0000


class StreamLoad:
    """``nr_fault_streams`` StreamGuestFaults streams, each faulting a mapped page every
    ``fault_interval_s``, and ``nr_watchers`` WatchEvents(include_faults) streams that read one
    event every ``watch_read_interval_s`` (slow readers: their queues fill and drop).

    ``with StreamLoad(...) as load:`` opens them all (``load.opened`` is set once every stream
    has its headers) and closes them at exit; ``load.errors`` lists any stream that failed.
    """

    def __init__(
        self,
        address: str,
        metadata: tuple[tuple[str, str], ...],
        vm_id: str,
        *,
        nr_fault_streams: int = 64,
        nr_watchers: int = 8,
        fault_interval_s: float = 0.25,
        watch_read_interval_s: float = 1.0,
    ) -> None:
        self._address = address
        self._metadata = metadata
        self._vm_id = vm_id
        self._nr_fault_streams = nr_fault_streams
        self._nr_watchers = nr_watchers
        self._fault_interval_s = fault_interval_s
        self._watch_read_interval_s = watch_read_interval_s
        self.opened = threading.Event()
        self.errors: list[str] = []
        self.faults_answered = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="stream-load")
        self._stop: asyncio.Event | None = None
        self._main: Any = None

    def __enter__(self) -> StreamLoad:
        self._thread.start()
        self._main = asyncio.run_coroutine_threadsafe(self._run(), self._loop)
        if not self.opened.wait(60):
            raise RuntimeError(f"streams did not open: {self.errors}")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._main.result(60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    async def _run(self) -> None:
        self._stop = asyncio.Event()
        async with grpc.aio.insecure_channel(self._address) as channel:
            stub = pb_grpc.TagStorageStub(channel)
            calls: list[Any] = []
            for _ in range(self._nr_watchers):
                calls.append(
                    stub.WatchEvents(
                        pb.WatchEventsRequest(include_faults=True), metadata=self._metadata
                    )
                )
            for _ in range(self._nr_fault_streams):
                calls.append(stub.StreamGuestFaults(self._faults(), metadata=self._metadata))
            await asyncio.gather(*(call.initial_metadata() for call in calls))
            readers = [
                asyncio.create_task(self._read_slowly(c)) for c in calls[: self._nr_watchers]
            ]
            readers += [asyncio.create_task(self._read(c)) for c in calls[self._nr_watchers :]]
            self.opened.set()
            await self._stop.wait()
            for call in calls:
                call.cancel()
            await asyncio.gather(*readers, return_exceptions=True)

    async def _faults(self) -> AsyncIterator[pb.GuestFaultRequest]:
        assert self._stop is not None
        request = pb.GuestFaultRequest(
            vm_id=self._vm_id, gpa=BOOT_RAM_GPA, length=4096, access=pb.ACCESS_READ
        )
        while not self._stop.is_set():
            yield request
            await asyncio.sleep(self._fault_interval_s)

    async def _read(self, call: Any) -> None:
        try:
            async for _ in call:
                self.faults_answered += 1
        except asyncio.CancelledError:
            pass
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                self.errors.append(f"StreamGuestFaults: {e.code().name} {e.details()}")

    async def _read_slowly(self, call: Any) -> None:
        try:
            while True:
                if await call.read() is grpc.aio.EOF:
                    return
                await asyncio.sleep(self._watch_read_interval_s)
        except asyncio.CancelledError:
            pass
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                self.errors.append(f"WatchEvents: {e.code().name} {e.details()}")
