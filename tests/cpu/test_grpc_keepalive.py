"""Keepalive on stage connections (runtime/codec.py's keepalive_options): a worker that stops
answering without closing its connection (here SIGSTOPped; in production a lost node or a
network partition) fails the calls on it within the keepalive, not at their deadline."""

import asyncio
import signal
import time

import pytest

from services.runtime.errors import DeadlineExceededError, StageUnavailableError
from services.runtime.grpc_client import GrpcEncoderClient
from services.runtime.messages import EncodeRequest
from tests.servers import start_worker


def test_a_frozen_worker_fails_its_calls_within_the_keepalive(flux_dev_dir):
    worker, port = start_worker("encoder", flux_dev_dir)
    request = EncodeRequest(prompts=["a red circle"], max_sequence_length=24)

    async def frozen_call(keepalive):
        client = GrpcEncoderClient(f"127.0.0.1:{port}", keepalive=keepalive)
        try:
            assert await client.ready(timeout_s=30)
            await client.encode(request, timeout_s=30)  # the connection works
            worker.proc.send_signal(signal.SIGSTOP)
            t0 = time.monotonic()
            try:
                with pytest.raises((StageUnavailableError, DeadlineExceededError)) as err:
                    await client.encode(request, timeout_s=6)
            finally:
                worker.proc.send_signal(signal.SIGCONT)
            return err.value, time.monotonic() - t0
        finally:
            await client.close()

    try:
        # pings every second, dropped after a second unanswered: the call fails in ~2 s
        failure, waited = asyncio.run(frozen_call((1.0, 1.0)))
        assert isinstance(failure, StageUnavailableError) and waited < 5, (failure, waited)
        # pings too rare to matter (the control): the same call waits for its deadline
        failure, waited = asyncio.run(frozen_call((600.0, 600.0)))
        assert isinstance(failure, DeadlineExceededError) and waited >= 5.5, (failure, waited)

        async def thawed():  # the worker resumed: a new connection serves again
            client = GrpcEncoderClient(f"127.0.0.1:{port}")
            try:
                return await client.encode(request, timeout_s=30)
            finally:
                await client.close()

        assert asyncio.run(thawed()).prompt_embeds.shape[0] == 1
    finally:
        worker.stop()
