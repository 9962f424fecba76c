"""KServe's own gRPC client with gradserve's system shared memory, where KServe supports it.

KServe's clients have no registration calls and cannot send an input without data (its gRPC
client requires a list of values, its REST client 'data'), but they send a requested output's
parameters: so the region is registered over REST, and the attributions asked for there. (Its
REST client cannot read such an answer: it wants 'data' for every output.) Run by
test_oip_shared_memory.py in a fresh interpreter (kserve and tritonclient.grpc cannot share one).
Exits 0 when every check passes.
"""
from __future__ import annotations

import asyncio
import mmap
import os
import pathlib
import secrets
import sys

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/: subprocess_server

import httpx
from kserve import InferenceGRPCClient, InferInput, InferRequest
from kserve.protocol.infer_type import RequestedOutput

from gradserve.server.config import ServerConfig
from gradserve.server.process.app import BackgroundServer
from subprocess_server import free_port


def _request(x: np.ndarray, region: str, offset: int) -> InferRequest:
    inp = InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=False)
    out = RequestedOutput("attributions/input", parameters={"shared_memory_region": region,
                                                           "shared_memory_byte_size": x.nbytes,
                                                           "shared_memory_offset": offset})
    return InferRequest("dense2", [inp], parameters={"method": "gradient"}, request_outputs=[out])


async def check(grpc_address: str, region: str, memory: mmap.mmap) -> None:
    x = np.random.default_rng(0).random((3, 4), dtype=np.float32)
    client = InferenceGRPCClient(grpc_address)
    try:
        await client.infer(_request(x, region, 0))
    finally:
        await client.close()
    np.testing.assert_allclose(np.frombuffer(memory[:x.nbytes], np.float32), 0.5, rtol=1e-5)


def main() -> int:
    key = f"/gs-test-kserve-{secrets.token_hex(4)}"
    path = "/dev/shm/" + key[1:]
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, 4096)
        memory = mmap.mmap(fd, 4096)
        config = ServerConfig(demo_models=True, host="127.0.0.1", port=0, http_port=free_port())
        with BackgroundServer(config) as server:
            assert server.server is not None and server.server.rest is not None
            base_url = f"http://127.0.0.1:{server.server.rest.port}"
            answer = httpx.post(f"{base_url}/v2/systemsharedmemory/region/kserve/register",
                                json={"key": key, "offset": 0, "byte_size": 4096}, timeout=60)
            assert answer.status_code == 200, answer.text
            asyncio.run(check(server.address, "kserve", memory))
            httpx.post(f"{base_url}/v2/systemsharedmemory/unregister", timeout=60).raise_for_status()
    finally:
        os.close(fd)
        os.unlink(path)
    print("kserve gRPC client with shared memory: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
