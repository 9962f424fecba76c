"""The KServe peer of bench/run.py: a KServe Python ModelServer (Open Inference Protocol v2 over
gRPC) with one custom model, ``dense2``, whose ``predict`` calls the compiled XLA gradient of
gradserve's ``dense2`` demo model inline.

    KSERVE_PYTHON=/path/to/venv/bin/python python bench/run.py   # run.py starts this file there

It runs in its own environment (``kserve`` pins grpcio-tools and other packages that gradserve's
test environment must not take), which needs ``kserve``, ``tensorflow`` and, for the benchmark's
clients, ``tritonclient[grpc]``; gradserve itself is not imported: the model is built by
``server/gradserve/server/models/demo.py``, loaded from its file. Like ``bench/_server.py`` it
binds 127.0.0.1 (gRPC on a free port, REST on another; KServe binds every interface, so the two
binds are redirected to 127.0.0.1), prints ``PORT <grpc port>`` once the model answers, and exits when
its stdin closes.

Request: input ``input``, FP32 ``[batch, 4]``. Response: output ``gradient``, FP32, the gradient
of the sum of the model's output with respect to the input (0.5 everywhere), as gradserve's
``gradient`` method answers with its default target.
"""
from __future__ import annotations

import importlib.util
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _build_dense2() -> Any:
    demo_py = ROOT / "server" / "gradserve" / "server" / "models" / "demo.py"
    spec = importlib.util.spec_from_file_location("gradserve_demo", demo_py)
    assert spec is not None and spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo.build_dense2()


def _compiled_gradient(model: Any) -> Any:
    import tensorflow as tf

    @tf.function(jit_compile=True, input_signature=[tf.TensorSpec((None, 4), tf.float32)], autograph=False)
    def gradient(x: Any) -> Any:
        with tf.GradientTape() as tape:
            tape.watch(x)
            total = tf.reduce_sum(model(x, training=False))
        return tape.gradient(total, x)

    concrete = gradient.get_concrete_function()
    concrete(tf.zeros((1, 4)))  # compile the batch-1 shape before serving
    return concrete


def _bind_loopback_only() -> None:
    """KServe binds its gRPC and REST servers on every interface; the benchmark's servers listen
    on 127.0.0.1 only."""
    import grpc.aio
    import uvicorn

    server_cls = type(grpc.aio.server())
    add_port = server_cls.add_insecure_port

    def add_insecure_port(self: Any, address: str) -> int:
        return int(add_port(self, "127.0.0.1:" + address.rsplit(":", 1)[1]))

    server_cls.add_insecure_port = add_insecure_port
    config_init = uvicorn.Config.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["host"] = "127.0.0.1"
        config_init(self, *args, **kwargs)

    uvicorn.Config.__init__ = init  # type: ignore[method-assign]


def main() -> None:
    import numpy as np
    from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer

    class Dense2Gradient(Model):  # type: ignore[misc]
        def __init__(self, name: str) -> None:
            super().__init__(name)
            self.gradient: Any = None
            self.load()

        def load(self) -> bool:
            self.gradient = _compiled_gradient(_build_dense2())
            self.ready = True
            return True

        def predict(self, payload: InferRequest, headers: Any = None, response_headers: Any = None) -> InferResponse:
            x = payload.inputs[0].as_numpy()
            g = self.gradient(x).numpy()
            out = InferOutput(name="gradient", shape=list(g.shape), datatype="FP32")
            out.set_data_from_numpy(g)
            return InferResponse(model_name=self.name, infer_outputs=[out], response_id=payload.id)

    grpc_port, http_port = _free_port(), _free_port()
    _bind_loopback_only()

    def announce() -> None:
        # KServe's own generated protos: tritonclient's would clash with them in this process.
        import grpc
        from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
        from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

        tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 4])
        request = pb.ModelInferRequest(model_name="dense2", inputs=[tensor],
                                       raw_input_contents=[np.ones((1, 4), np.float32).tobytes()])
        for _ in range(600):
            try:
                with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
                    answer = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(request, timeout=5)
                if answer.raw_output_contents:
                    g = np.frombuffer(answer.raw_output_contents[0], np.float32)
                else:
                    g = np.asarray(answer.outputs[0].contents.fp32_contents, np.float32)
                if g.size == 4 and np.allclose(g, 0.5):
                    print(f"PORT {grpc_port} 0", flush=True)
                    return
            except grpc.RpcError:  # not up yet
                pass
            time.sleep(0.2)
        os._exit(3)

    def exit_when_stdin_closes() -> None:
        sys.stdin.read()
        os._exit(0)

    threading.Thread(target=announce, daemon=True).start()
    threading.Thread(target=exit_when_stdin_closes, daemon=True).start()
    ModelServer(http_port=http_port, grpc_port=grpc_port, workers=1, enable_grpc=True).start(
        [Dense2Gradient("dense2")])


if __name__ == "__main__":
    main()
