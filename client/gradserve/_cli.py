"""The client subcommands of ``gradserve`` (``models``, ``gradient``, ``sensitivity``; ``shap`` and ``pdp``
in ``_cli_explain``): the SDK from a shell.

Never imports TensorFlow: these commands run wherever the client SDK is installed. Arrays are
read and written as ``.npy``, ``.npz`` (one array per model input) or CSV (one example per row);
``--plot`` needs the ``[viz]`` extra (matplotlib), the progress bar uses tqdm from the same extra.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Iterator, Sequence

__all__ = ["register", "read_inputs", "write_result", "plot_attributions", "plot_indices", "parse_bounds",
           "METHODS", "GSA_METHODS"]

#: Methods the ``gradient`` subcommand offers (attributions shaped like the inputs, or predict).
METHODS = ("gradient", "input_x_gradient", "integrated_gradients", "smoothgrad", "grad_cam", "predict")

_DEFAULT_TARGET = os.environ.get("GRADSERVE_TARGET", "127.0.0.1:50051")
_VIZ_HINT = "install gradserve[viz] (pip install 'gradserve[viz]') for --plot"

_EPILOG_MODELS = """examples:
  gradserve models                               # the server on 127.0.0.1:50051
  gradserve models --target 10.0.0.5:50051 --json
"""

_EPILOG_GRADIENT = """examples:
  gradserve gradient dense2 --input x.npy -o grad.npy
  gradserve gradient dense2 --input rows.csv -o grad.csv --plot sensitivities.png
  gradserve gradient cnn --input images.npy --method integrated_gradients --steps 64 \\
      --index argmax --plot saliency.png
  gradserve gradient multi --input ab.npz --head y1 -o grads.npz     # one array per input name
  gradserve gradient dense2 --input big.npy --batch-size 4096 -o grad.npy   # streamed, with progress

Inputs: .npy (one array), .npz (arrays named after the model inputs) or .csv (one example per row,
an optional header row of feature names). The output format follows -o's extension.
"""


class CliError(Exception):
    """A problem with the command's arguments or files; printed without a traceback."""


def register(subparsers: Any) -> None:
    """Add the client subcommands to the ``gradserve`` parser's subparsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    models = subparsers.add_parser("models", help="list the models a server hosts", epilog=_EPILOG_MODELS,
                                   description="List the models of a gradserve server, with versions, "
                                               "states, inputs and outputs.", formatter_class=fmt)
    _common(models)
    models.add_argument("--json", action="store_true", help="print JSON instead of a table")
    models.set_defaults(run=_models)

    grad = subparsers.add_parser("gradient", help="gradients and attributions of a model for input files",
                                 epilog=_EPILOG_GRADIENT, formatter_class=fmt,
                                 description="Compute d output / d input (or another attribution) for "
                                             "the examples in a file and write or plot them.")
    _common(grad)
    grad.add_argument("model", help="model name on the server")
    grad.add_argument("--input", "-i", required=True, help="input file: .npy, .npz or .csv")
    grad.add_argument("--method", "-m", choices=METHODS, default="gradient", help="method (default gradient)")
    grad.add_argument("--output", "-o", help="write the result to .npy, .npz or .csv; default: print a summary")
    grad.add_argument("--index", help="which output element is differentiated: an int or 'argmax' "
                                      "(default: the sum of the output)")
    grad.add_argument("--head", help="output head of a multi-output model, by name or position")
    grad.add_argument("--version", type=int, default=0, help="model version (default: the latest READY)")
    grad.add_argument("--steps", type=int, default=50, help="integrated gradients: path steps (default 50)")
    grad.add_argument("--baseline", type=float, default=0.0, help="integrated gradients: baseline value (default 0)")
    grad.add_argument("--samples", type=int, default=50, help="smoothgrad: noisy samples (default 50)")
    grad.add_argument("--noise", type=float, default=None, help="smoothgrad: noise as a fraction of the input range")
    grad.add_argument("--seed", type=int, default=None, help="smoothgrad: random seed")
    grad.add_argument("--layer", help="grad_cam / layer attributions: layer name")
    grad.add_argument("--with-outputs", action="store_true",
                      help="also write the model outputs (.npz: as 'outputs/<name>')")
    grad.add_argument("--batch-size", type=int, default=0,
                      help="send the examples in batches of this size over one stream (progress bar)")
    grad.add_argument("--no-progress", action="store_true", help="no progress bar")
    grad.add_argument("--plot", help="draw the attributions to this PNG: a heatmap over image inputs, "
                                     "a bar chart of per-feature sensitivity for tabular inputs")
    grad.add_argument("--plot-example", type=int, default=0, help="which example --plot draws for images (default 0)")
    grad.set_defaults(run=_gradient)
    _register_sensitivity(subparsers)
    from gradserve import _cli_explain  # imports this module's helpers: here, once they exist

    _cli_explain.register(subparsers)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", "-t", default=_DEFAULT_TARGET,
                        help="server address host:port, several comma-separated, or a gRPC target "
                             "(default $GRADSERVE_TARGET or 127.0.0.1:50051)")
    parser.add_argument("--timeout", type=float, default=60.0, help="deadline per call in seconds (default 60)")
    parser.add_argument("--token", default=os.environ.get("GRADSERVE_TOKEN"),
                        help="bearer token (default $GRADSERVE_TOKEN)")
    parser.set_defaults(log_level="WARNING")


def _client(args: argparse.Namespace) -> Any:
    import gradserve

    targets = [t for t in args.target.split(",") if t]
    return gradserve.Client(targets if len(targets) > 1 else targets[0], timeout=args.timeout, token=args.token)


def _fail(message: str) -> int:
    print(f"gradserve: error: {message}", file=sys.stderr)
    return 2


# -- models ------------------------------------------------------------------------------------
def _models(args: argparse.Namespace) -> int:
    import gradserve

    try:
        with _client(args) as c:
            infos = c.models()
    except gradserve.GradserveError as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps([_info_json(i) for i in infos], indent=2))
        return 0
    for info in infos:
        for v in info.versions:
            ins = ", ".join(f"{t.name}:{t.dtype}{list(t.shape)}" for t in v.inputs)
            outs = ", ".join(f"{t.name}:{t.dtype}{list(t.shape)}" for t in v.outputs)
            print(f"{info.name}\tv{v.version}\t{v.state}\tinputs {ins}\toutputs {outs}")
    return 0


def _info_json(info: Any) -> dict[str, Any]:
    def spec(t: Any) -> dict[str, Any]:
        return {"name": t.name, "dtype": str(t.dtype), "shape": list(t.shape)}

    return {"name": info.name, "versions": [
        {"version": v.version, "state": v.state, "message": v.message,
         "inputs": [spec(t) for t in v.inputs], "outputs": [spec(t) for t in v.outputs]}
        for v in info.versions]}


# -- files -------------------------------------------------------------------------------------
def read_inputs(path: str) -> tuple[Any, list[str] | None]:
    """Load inputs from .npy, .npz (a dict by input name) or .csv; also CSV column names if any."""
    import numpy as np

    ext = os.path.splitext(path)[1].lower()
    if not os.path.exists(path):
        raise CliError(f"--input: no such file {path!r}")
    if ext == ".npy":
        return np.load(path, allow_pickle=False), None
    if ext == ".npz":
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        if list(arrays) == ["arr_0"]:
            return arrays["arr_0"], None
        return arrays, None
    if ext == ".csv":
        with open(path, encoding="utf-8") as f:
            first = f.readline()
        header = None
        try:
            [float(v) for v in first.strip().split(",")]
        except ValueError:
            header = [h.strip() for h in first.strip().split(",")]
        data = np.loadtxt(path, delimiter=",", skiprows=1 if header else 0, ndmin=2, dtype=np.float64)
        return data, header
    raise CliError(f"--input: unsupported file type {ext or path!r}; use .npy, .npz or .csv")


def write_result(path: str, result: Any, outputs: Any = None, header: Sequence[str] | None = None) -> None:
    """Write an array (or a dict/list of arrays by input) to .npy, .npz or .csv."""
    import numpy as np

    ext = os.path.splitext(path)[1].lower()
    arrays = _as_dict(result)
    if outputs is not None:
        arrays.update({f"outputs/{k}": v for k, v in _as_dict(outputs, "output").items()})
    if ext == ".npz":
        np.savez(path, **arrays)
        return
    if len(arrays) != 1:
        raise CliError(f"-o: the result has {len(arrays)} arrays ({', '.join(arrays)}); write it to .npz")
    (array,) = arrays.values()
    if ext == ".npy":
        np.save(path, array)
    elif ext == ".csv":
        flat = np.asarray(array, dtype=np.float64).reshape(len(array), -1) if np.ndim(array) else np.atleast_2d(array)
        names = list(header) if header and len(header) == flat.shape[1] else None
        np.savetxt(path, flat, delimiter=",", header=",".join(names) if names else "", comments="", fmt="%.9g")
    else:
        raise CliError(f"-o: unsupported file type {ext or path!r}; use .npy, .npz or .csv")


def _as_dict(result: Any, single: str = "attributions") -> dict[str, Any]:
    if isinstance(result, dict):
        return dict(result)
    if isinstance(result, (list, tuple)):
        return {f"{single}_{i}": r for i, r in enumerate(result)}
    return {single: result}


# -- gradient ----------------------------------------------------------------------------------
def _index(text: str | None) -> Any:
    if text is None or text == "argmax":
        return text
    try:
        return int(text)
    except ValueError:
        raise CliError(f"--index: expected an int or 'argmax', got {text!r}") from None


def _head(text: str | None) -> Any:
    if text is None:
        return None
    return int(text) if text.lstrip("-").isdigit() else text


def _options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {"version": args.version}
    if args.method == "predict":
        return opts
    opts.update(target=_index(args.index), output=_head(args.head))
    if args.method == "grad_cam":
        return {**opts, "layer": args.layer}
    opts.update(return_outputs=args.with_outputs, layer=args.layer)
    if args.method == "integrated_gradients":
        opts.update(baseline=args.baseline, steps=args.steps)
    if args.method == "smoothgrad":
        opts.update(samples=args.samples, noise=args.noise, seed=args.seed)
        del opts["return_outputs"], opts["layer"]
    return opts


def _rows(inputs: Any) -> int:
    import numpy as np

    first = next(iter(inputs.values())) if isinstance(inputs, dict) else inputs
    return int(np.shape(first)[0]) if np.ndim(first) else 1


def _batches(inputs: Any, size: int) -> Iterator[Any]:
    n = _rows(inputs)
    for start in range(0, n, size):
        if isinstance(inputs, dict):
            yield {k: v[start:start + size] for k, v in inputs.items()}
        else:
            yield inputs[start:start + size]


def _concat(parts: list[Any]) -> Any:
    import numpy as np

    first = parts[0]
    if isinstance(first, tuple):
        return tuple(_concat([p[i] for p in parts]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: np.concatenate([p[k] for p in parts]) for k in first}
    if isinstance(first, list):
        return [np.concatenate([p[i] for p in parts]) for i in range(len(first))]
    return np.concatenate(parts)


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="batch", file=sys.stderr, desc="gradserve")


def _gradient(args: argparse.Namespace) -> int:
    import gradserve

    try:
        inputs, header = read_inputs(args.input)
        options = _options(args)
        if args.plot:
            _require_matplotlib()
        with _client(args) as c:
            n = _rows(inputs)
            if args.batch_size and args.batch_size < n:
                batches = -(-n // args.batch_size)
                bar = _progress(batches, not args.no_progress)
                parts = []
                for part in c.stream(args.model, _batches(inputs, args.batch_size), method=args.method, **options):
                    parts.append(part)
                    if bar is not None:
                        bar.update(1)
                if bar is not None:
                    bar.close()
                result = _concat(parts)
            else:
                result = getattr(c, args.method)(args.model, inputs, **options)
    except (CliError, gradserve.GradserveError) as exc:
        return _fail(str(exc))
    outputs = None
    if args.method != "predict" and args.with_outputs and isinstance(result, tuple):
        outputs, result = result[0], result[1]
    try:
        if args.output:
            write_result(args.output, result, outputs, header)
        else:
            _summary(result)
        if args.plot:
            plot_attributions(args.plot, inputs, result, header, example=args.plot_example)
    except CliError as exc:
        return _fail(str(exc))
    return 0


def _summary(result: Any) -> None:
    import numpy as np

    for name, arr in _as_dict(result).items():
        a = np.asarray(arr)
        print(f"{name}: shape {list(a.shape)} dtype {a.dtype}")
        with np.printoptions(precision=6, suppress=True, threshold=200):
            print(a)


# -- plots -------------------------------------------------------------------------------------
def _require_matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise CliError(f"--plot needs matplotlib: {_VIZ_HINT}") from None
    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    return plt


def plot_attributions(path: str, inputs: Any, attributions: Any, feature_names: Sequence[str] | None = None,
                      *, example: int = 0) -> None:
    """Draw attributions to a PNG (600x400 pixels).

    Image-shaped inputs (batch, H, W) or (batch, H, W, C): the input of one example in grey with
    the magnitude of its attribution as a heatmap over it. Tabular inputs (batch, features): a
    bar chart of the mean absolute attribution of each feature over the batch.
    """
    import numpy as np

    plt = _require_matplotlib()
    if isinstance(inputs, dict) or isinstance(attributions, (dict, list)):
        name = next(iter(attributions)) if isinstance(attributions, dict) else 0
        inputs = inputs[name] if isinstance(inputs, dict) and name in inputs else next(iter(_as_dict(inputs).values()))
        attributions = attributions[name]
    x, a = np.asarray(inputs, dtype=np.float64), np.asarray(attributions, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if x.ndim in (3, 4) and a.ndim >= 3:
        if not 0 <= example < len(x):
            raise CliError(f"--plot-example: {example} is not in [0, {len(x)})")
        image = x[example] if x.ndim == 3 else x[example].mean(axis=-1)
        heat = np.abs(a[example]) if a.ndim == 3 else np.abs(a[example]).sum(axis=-1)
        ax.imshow(image, cmap="gray")
        shown = ax.imshow(heat, cmap="inferno", alpha=0.6)
        fig.colorbar(shown, ax=ax, label="|attribution|")
        ax.set_title(f"attribution, example {example}")
        ax.axis("off")
    elif a.ndim == 2:
        sensitivity = np.abs(a).mean(axis=0)
        labels = list(feature_names) if feature_names and len(feature_names) == a.shape[1] \
            else [f"x{i}" for i in range(a.shape[1])]
        ax.bar(range(len(sensitivity)), sensitivity, color="tab:blue")
        ax.set_xticks(range(len(sensitivity)), labels, rotation=45 if len(labels) > 8 else 0)
        ax.set_ylabel("mean |attribution|")
        ax.set_title("per-feature sensitivity")
    else:
        plt.close(fig)
        raise CliError(f"--plot: cannot draw attributions of shape {list(a.shape)}; expected "
                       "(batch, features) or image-shaped (batch, H, W[, C])")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- sensitivity (global) ----------------------------------------------------------------------
#: Global analyses the ``sensitivity`` subcommand offers.
GSA_METHODS = ("sobol", "dgsm", "morris")

_EPILOG_SENSITIVITY = """examples:
  gradserve sensitivity ishigami --method sobol --bounds=-3.1416:3.1416,-3.1416:3.1416,-3.1416:3.1416 \\
      --samples 4096 --plot sobol.png
  gradserve sensitivity price --method dgsm --bounds 80:120,90:110,0.1:2,0:0.05,0.1:0.5 --samples 8192
  gradserve sensitivity multi --method morris --bounds a=0:1,0:1,0:1 --bounds b=0:1,0:1 --samples 32
  gradserve sensitivity price --method sobol --problem problem.json --samples 2048 --second-order

--bounds takes LOW:HIGH per element of the model's input, comma-separated (write --bounds=-1:1,...
when it starts with a minus sign); for several inputs, one --bounds NAME=LOW:HIGH,... per input.
--problem reads a SALib problem dict from JSON: {"names": [...], "bounds": [...], "dists": [...]}.
--samples is N: Sobol' base samples (N * (D + 2) evaluations), DGSM points, Morris trajectories.
"""


def _register_sensitivity(subparsers: Any) -> None:
    sens = subparsers.add_parser("sensitivity", help="global sensitivity of a model over input ranges "
                                                     "(Sobol', DGSM, Morris)", epilog=_EPILOG_SENSITIVITY,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description="Which inputs drive a model's output over their whole range: the "
                                             "server samples the inputs, evaluates the model and computes the "
                                             "indices with their confidence intervals.")
    _common(sens)
    sens.add_argument("model", help="model name on the server")
    sens.add_argument("--method", "-m", choices=GSA_METHODS, default="sobol", help="analysis (default sobol)")
    source = sens.add_mutually_exclusive_group(required=True)
    source.add_argument("--bounds", "-b", action="append", metavar="[NAME=]LOW:HIGH,...",
                        help="uniform ranges, one LOW:HIGH per input element (repeat with NAME= per input)")
    source.add_argument("--problem", "-p", metavar="JSON", help="SALib problem dict (names, bounds, dists)")
    sens.add_argument("--samples", "-n", type=int, default=1024,
                      help="Sobol' base samples, DGSM points or Morris trajectories (default 1024)")
    sens.add_argument("--second-order", action="store_true", help="sobol: also the second-order indices S2")
    sens.add_argument("--levels", type=int, default=4, help="morris: grid levels (default 4)")
    sens.add_argument("--seed", type=int, default=None, help="seed: the same seed gives the same answer")
    sens.add_argument("--conf-level", type=float, default=0.95, help="confidence level of the intervals (default 0.95)")
    sens.add_argument("--head", help="output head of a multi-output model, by name or position")
    sens.add_argument("--index", type=int, default=None,
                      help="analyse this element of the output's last axis (default: the sum of the output)")
    sens.add_argument("--version", type=int, default=0, help="model version (default: the latest READY)")
    sens.add_argument("--json", action="store_true", help="print the indices as JSON instead of a table")
    sens.add_argument("--no-progress", action="store_true", help="no progress bar")
    sens.add_argument("--plot", help="draw the indices as a bar chart with error bars to this PNG")
    sens.set_defaults(run=_sensitivity)


def _number(text: str, field: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise CliError(f"{field}: {text!r} is not a number") from None


def parse_bounds(specs: Sequence[str]) -> Any:
    """``["LOW:HIGH,LOW:HIGH"]`` -> a list of pairs; ``["a=LOW:HIGH,...", "b=..."]`` -> a dict by input."""
    named: dict[str, list[tuple[float, float]]] = {}
    plain: list[tuple[float, float]] = []
    for spec in specs:
        name, sep, ranges = spec.partition("=")
        if not sep:
            name, ranges = "", spec
        pairs = []
        for part in ranges.split(","):
            low, colon, high = part.strip().partition(":")
            if not colon:
                raise CliError(f"--bounds: expected LOW:HIGH, got {part!r}")
            pairs.append((_number(low, "--bounds"), _number(high, "--bounds")))
        if name:
            named[name] = named.get(name, []) + pairs
        else:
            plain.extend(pairs)
    if named and plain:
        raise CliError("--bounds: name every input (NAME=LOW:HIGH,...) or none")
    return named or plain


def _read_problem(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            problem = json.load(f)
    except OSError as exc:
        raise CliError(f"--problem: cannot read {path!r} ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise CliError(f"--problem: {path!r} is not JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(problem, dict) or "bounds" not in problem:
        raise CliError("--problem: expected a JSON object with 'bounds' (and 'names', 'dists')")
    return problem


def _sensitivity(args: argparse.Namespace) -> int:
    import gradserve

    bar: Any = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if args.no_progress:
            return
        if bar is None:
            bar = _progress(total, True)
            if bar is None:
                return
            bar.unit = "eval"
        bar.update(done - bar.n)

    try:
        if args.plot:
            _require_matplotlib()
        bounds = parse_bounds(args.bounds) if args.bounds else None
        problem = _read_problem(args.problem) if args.problem else None
        common: dict[str, Any] = dict(seed=args.seed, conf_level=args.conf_level, output=_head(args.head),
                                      target=args.index, version=args.version, progress=progress)
        with _client(args) as c:
            if args.method == "sobol":
                result = c.sobol(args.model, bounds, problem, samples=args.samples,
                                 second_order=args.second_order, **common)
            elif args.method == "dgsm":
                result = c.dgsm(args.model, bounds, problem, samples=args.samples, **common)
            else:
                result = c.morris(args.model, bounds, problem, trajectories=args.samples, levels=args.levels,
                                  **common)
    except (CliError, gradserve.GradserveError) as exc:
        return _fail(str(exc))
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        print(json.dumps({k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in result.items()}, indent=2))
    else:
        print(result.table())
        if "S2" in result:
            import numpy as np

            print("S2 (row j, column k: the interaction of factors j and k)")
            with np.printoptions(precision=4, suppress=True, nanstr="."):
                print(result["S2"])
    if args.plot:
        try:
            plot_indices(args.plot, result)
        except CliError as exc:
            return _fail(str(exc))
    return 0


def plot_indices(path: str, result: Any) -> None:
    """Bar chart of a global analysis (600x400 pixels), with the confidence intervals as error
    bars: S1 and ST side by side for Sobol', the normalised dgsm for DGSM, mu* for Morris."""
    import numpy as np

    plt = _require_matplotlib()
    names = list(result["names"])
    series = {"sobol": [("S1", "first order S1"), ("ST", "total ST")], "dgsm": [("dgsm", "dgsm")],
              "morris": [("mu_star", "mu*")]}[result.method]
    ylabel = {"sobol": "Sobol' index", "dgsm": "vi (b - a)^2 / (pi^2 Var f)", "morris": "mean |elementary effect|"}
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    width = 0.8 / len(series)
    at = np.arange(len(names))
    for k, (key, label) in enumerate(series):
        err = result.get(key + "_conf")
        ax.bar(at + (k - (len(series) - 1) / 2) * width, result[key], width, yerr=err, capsize=4, label=label)
    ax.set_xticks(at, names, rotation=45 if len(names) > 8 else 0)
    ax.set_ylabel(ylabel[result.method])
    title = {"sobol": "Sobol' indices", "dgsm": "DGSM", "morris": "Morris screening"}[result.method]
    ax.set_title(f"{title}, {result.evaluations} evaluations (error bars: confidence intervals)", fontsize=10)
    ax.axhline(0, color="black", linewidth=0.5)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
