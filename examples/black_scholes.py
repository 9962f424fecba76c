"""Black-Scholes pricing as a Keras model, served by gradserve; its delta from ``client.gradient``
checked against the closed form N(d1).

The model maps one row of market data (S, K, T, r, sigma) to the price of a European call. Its
gradient with respect to the inputs is the option's first-order Greeks in one call: delta (d/dS),
d/dK, theta (-d/dT), rho (d/dr) and vega (d/dsigma).

Usage::

    python examples/black_scholes.py serve --port 50051    # serve the model (needs gradserve[server])
    python examples/black_scholes.py delta --target 127.0.0.1:50051   # client only: no TensorFlow
    python examples/black_scholes.py save bs.keras          # write the model file

The client side needs only the SDK; the server side imports this file so that Keras can rebuild
the registered ``BlackScholesPrice`` layer from the ``.keras`` file (safe mode stays on).
"""
from __future__ import annotations

import argparse
import math
import sys
from functools import lru_cache
from typing import Any

import numpy as np

#: Input columns, in order.
COLUMNS = ("S", "K", "T", "r", "sigma")
MODEL_NAME = "black_scholes"


@lru_cache(maxsize=1)
def _layer_class() -> Any:
    """The price layer, defined (and registered with Keras) on first use so that importing this
    module does not need TensorFlow."""
    import keras
    from keras import ops

    @keras.saving.register_keras_serializable(package="gradserve_examples")
    class BlackScholesPrice(keras.layers.Layer):
        """Call price S·N(d1) - K·exp(-rT)·N(d2) from columns (S, K, T, r, sigma)."""

        def call(self, x: Any) -> Any:
            s, k, t, r, sigma = (x[:, i:i + 1] for i in range(5))
            vol = sigma * ops.sqrt(t)
            d1 = (ops.log(s / k) + (r + 0.5 * sigma * sigma) * t) / vol
            d2 = d1 - vol

            def cdf(z: Any) -> Any:
                return 0.5 * (1.0 + ops.erf(z / math.sqrt(2.0)))

            return s * cdf(d1) - k * ops.exp(-r * t) * cdf(d2)

    return BlackScholesPrice


def build_model() -> Any:
    """The Keras model: input "market" (batch, 5) -> output "price" (batch, 1)."""
    import keras

    market = keras.Input((5,), name="market")
    price = _layer_class()(name="price")(market)
    return keras.Model(market, price, name=MODEL_NAME)


def save_model(path: str) -> str:
    """Write the model to a ``.keras`` file and return the path."""
    build_model().save(path)
    return path


def analytic(market: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form price and delta = N(d1), in float64 (no TensorFlow)."""
    s, k, t, r, sigma = (market[:, i].astype(np.float64) for i in range(5))
    erf = np.vectorize(math.erf)

    def cdf(z: np.ndarray) -> np.ndarray:
        return np.asarray(0.5 * (1.0 + erf(z / math.sqrt(2.0))))

    d1 = (np.log(s / k) + (r + 0.5 * sigma ** 2) * t) / (sigma * np.sqrt(t))
    d2 = d1 - sigma * np.sqrt(t)
    return s * cdf(d1) - k * np.exp(-r * t) * cdf(d2), cdf(d1)


def sample_market(n: int, seed: int = 0) -> np.ndarray:
    """``n`` rows of plausible market data (S, K, T, r, sigma) as float32."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(80, 120, n), rng.uniform(90, 110, n), rng.uniform(0.1, 2.0, n),
                     rng.uniform(0.0, 0.05, n), rng.uniform(0.1, 0.5, n)], axis=1).astype(np.float32)


def delta(target: str, model: str = MODEL_NAME, n: int = 8, tolerance: float = 1e-4) -> int:
    """Price and Greeks from the server; compare delta with N(d1). Returns a process exit status."""
    import gradserve

    market = sample_market(n)
    with gradserve.Client(target) as client:
        price, greeks = client.gradient(model, market, return_outputs=True)   # one forward pass
    want_price, want_delta = analytic(market)
    print(f"{'S':>8} {'K':>8} {'T':>6} {'price':>10} {'delta':>9} {'N(d1)':>9} {'vega':>9}")
    for row, p, g, d in zip(market, price[:, 0], greeks, want_delta):
        print(f"{row[0]:8.2f} {row[1]:8.2f} {row[2]:6.2f} {p:10.4f} {g[0]:9.6f} {d:9.6f} {g[4]:9.4f}")
    err_delta = float(np.max(np.abs(greeks[:, 0] - want_delta)))
    err_price = float(np.max(np.abs(price[:, 0] - want_price) / want_price))
    print(f"max |delta - N(d1)| = {err_delta:.2e}; max relative price error = {err_price:.2e}")
    return 0 if err_delta < tolerance and err_price < 1e-4 else 1


def serve(port: int, host: str) -> int:
    """Serve the model (this process registers the layer, so the saved file loads in safe mode)."""
    import asyncio
    import os
    import tempfile

    from gradserve.server.config import ModelSource, ServerConfig
    from gradserve.server.process.app import GradServer

    path = save_model(os.path.join(tempfile.mkdtemp(), f"{MODEL_NAME}.keras"))

    async def run() -> None:
        server = GradServer(ServerConfig(host=host, port=port, models=(ModelSource(MODEL_NAME, path),)))
        await server.start()
        await server.load_models()
        print(f"serving {MODEL_NAME} on {host}:{server.port}", flush=True)
        await server.wait()

    asyncio.run(run())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("delta", help="ask the server for prices and Greeks; check delta against N(d1)")
    d.add_argument("--target", default="127.0.0.1:50051", help="server address (default 127.0.0.1:50051)")
    d.add_argument("--model", default=MODEL_NAME, help=f"model name (default {MODEL_NAME})")
    d.add_argument("-n", type=int, default=8, help="number of option contracts (default 8)")
    s = sub.add_parser("serve", help="serve the model")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=50051)
    w = sub.add_parser("save", help="write the model to a .keras file")
    w.add_argument("path")
    args = parser.parse_args(argv)
    if args.command == "delta":
        return delta(args.target, args.model, args.n)
    if args.command == "serve":
        return serve(args.port, args.host)
    save_model(args.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
