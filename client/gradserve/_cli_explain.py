"""The ``shap`` and ``pdp`` subcommands of ``gradserve``: Shapley values and partial dependence from a shell.

Files and plots as for ``gradserve gradient`` (``_cli``): .npy, .npz or CSV in, ``--plot`` PNGs
with matplotlib and a progress bar with tqdm from the ``[viz]`` extra. Never imports TensorFlow.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

from gradserve._cli import (
    CliError,
    _client,
    _common,
    _fail,
    _head,
    _index,
    _require_matplotlib,
    read_inputs,
    write_result,
)

__all__ = ["register", "parse_feature", "superpixels", "plot_shap", "plot_partial_dependence"]

_EPILOG_SHAP = """examples:
  gradserve shap price --input rows.csv --background sample.csv --plot shap.png
  gradserve shap price --input rows.npy --background sample.npy --method exact -o values.npy
  gradserve shap cnn --input images.npy --background bg.npy --superpixel 4 --index argmax --plot shap.png
  gradserve shap dense2 --input x.npy --background bg.npy --method gradient --samples 400 --seed 0

--input holds the rows to explain, --background the rows that stand in for the features a
coalition leaves out (a sample of the training data, 10 to 100 rows is typical). Methods: kernel
(Kernel SHAP over --samples coalitions, every coalition when that covers them), exact (every
coalition; few features), gradient (expected gradients at --samples points per row). The values
of a row sum to f(row) - base, base = E[f(background)], printed with them.
"""

_EPILOG_PDP = """examples:
  gradserve pdp price --background sample.csv --feature 0 --plot pdp.png
  gradserve pdp price --background sample.csv --feature 0 --feature 3 --feature 0,3 --plot pdp.png
  gradserve pdp multi --background ab.npz --feature a:1 --grid-resolution 50 --json

--feature N is element N of the model's input (CSV column N); NAME:N names the input of a
multi-input model; N,M asks for the two-way surface of two features. Repeat --feature for
several plots. The grid spans --percentiles of the background's values in --grid-resolution points
(its unique values when fewer), as scikit-learn's partial_dependence builds it.
"""


def register(subparsers: Any) -> None:
    """Add ``shap`` and ``pdp`` to the ``gradserve`` parser's subparsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    shap = subparsers.add_parser("shap", help="Shapley values of a model's output for the rows of a file",
                                 epilog=_EPILOG_SHAP, formatter_class=fmt,
                                 description="How much each feature moved each row's output away from the "
                                             "background's mean output (interventional Shapley values), "
                                             "computed on the server.")
    _common(shap)
    shap.add_argument("model", help="model name on the server")
    shap.add_argument("--input", "-i", required=True, help="rows to explain: .npy, .npz or .csv")
    shap.add_argument("--background", "-b", required=True, help="background rows: .npy, .npz or .csv")
    shap.add_argument("--method", "-m", choices=("kernel", "exact", "gradient"), default="kernel",
                      help="kernel (default), exact or gradient")
    shap.add_argument("--samples", "-n", type=int, default=None,
                      help="kernel: coalitions per row (default 2M + 2048); gradient: path points per row "
                           "(default 200 rounded up to a multiple of the background rows)")
    shap.add_argument("--seed", type=int, default=None, help="seed: the same seed gives the same answer")
    shap.add_argument("--index", help="explain this output element: an int or 'argmax' (default: the sum)")
    shap.add_argument("--head", help="output head of a multi-output model, by name or position")
    shap.add_argument("--superpixel", type=int, default=0, metavar="SIZE",
                      help="image inputs: one feature per SIZE x SIZE block of pixels (all channels)")
    shap.add_argument("--batch-size", type=int, default=0,
                      help="rows per request (default: about 20 requests; each shows on the progress bar)")
    shap.add_argument("--version", type=int, default=0, help="model version (default: the latest READY)")
    shap.add_argument("--output", "-o", help="write the values to .npy, .npz or .csv; default: print a summary")
    shap.add_argument("--no-progress", action="store_true", help="no progress bar")
    shap.add_argument("--plot", help="draw mean |value| per feature and one row's values to this PNG")
    shap.add_argument("--plot-example", type=int, default=0, help="the row --plot details (default 0)")
    shap.set_defaults(run=_shap)

    pdp = subparsers.add_parser("pdp", help="partial dependence and ICE curves of a model's output",
                                epilog=_EPILOG_PDP, formatter_class=fmt,
                                description="The model's output as one feature (or two) sweeps a grid, the "
                                            "others kept at each background row's values: one ICE curve per "
                                            "row and their mean, the partial dependence, computed on the server.")
    _common(pdp)
    pdp.add_argument("model", help="model name on the server")
    pdp.add_argument("--background", "-b", required=True, help="rows to draw the curves for: .npy, .npz or .csv")
    pdp.add_argument("--feature", "-f", action="append", required=True, metavar="[NAME:]N[,[NAME:]M]",
                     help="feature (element N of the input); N,M for a two-way surface; repeatable")
    pdp.add_argument("--grid-resolution", type=int, default=20, help="grid points per feature (default 20)")
    pdp.add_argument("--percentiles", default="0.05,0.95", metavar="LOW,HIGH",
                     help="the grid spans these percentiles of the values (default 0.05,0.95)")
    pdp.add_argument("--index", help="explain this output element: an int or 'argmax' (default: the sum)")
    pdp.add_argument("--head", help="output head of a multi-output model, by name or position")
    pdp.add_argument("--version", type=int, default=0, help="model version (default: the latest READY)")
    pdp.add_argument("--json", action="store_true", help="print grids and curves as JSON instead of tables")
    pdp.add_argument("--no-progress", action="store_true", help="no progress bar")
    pdp.add_argument("--plot", help="draw the ICE curves and their average (a contour map for two features)")
    pdp.set_defaults(run=_pdp)


# -- shap ------------------------------------------------------------------------------------------
def _bar(total: int, unit: str, enabled: bool) -> Any:
    """A tqdm progress bar on stderr counting ``unit``s (None: disabled, or tqdm not installed)."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit=unit, file=sys.stderr, desc="gradserve")


def superpixels(shape: Sequence[int], size: int) -> Any:
    """Labels of ``size`` x ``size`` blocks over the first two axes of an image example ``shape``."""
    import numpy as np

    if len(shape) < 2:
        raise CliError(f"--superpixel: the input's examples {list(shape)} are not images")
    rows, cols = -(-shape[0] // size), -(-shape[1] // size)
    blocks = np.arange(rows * cols).reshape(rows, cols)
    return np.repeat(np.repeat(blocks, size, axis=0), size, axis=1)[:shape[0], :shape[1]].astype(np.int32)


def _flat(values: Any, inputs: Any, header: Sequence[str] | None) -> tuple[Any, list[str]]:
    """Values as ``(rows, features)`` and a name per feature."""
    import numpy as np

    if isinstance(values, (dict, list)):
        named = values.items() if isinstance(values, dict) else enumerate(values)
        parts, names = [], []
        for name, v in named:
            v = np.asarray(v)
            parts.append(v.reshape(len(v), -1))
            names += [f"{name}[{i}]" for i in range(parts[-1].shape[1])]
        return np.concatenate(parts, axis=1), names
    v = np.asarray(values)
    flat = v.reshape(len(v), -1)
    if header and len(header) == flat.shape[1]:
        return flat, list(header)
    return flat, [f"x{i}" for i in range(flat.shape[1])]


def _shap(args: argparse.Namespace) -> int:
    import gradserve

    bar: Any = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = _bar(total, "row", not args.no_progress)
        if bar is not None:
            bar.update(done - bar.n)

    try:
        x, header = read_inputs(args.input)
        background, _ = read_inputs(args.background)
        if args.plot:
            _require_matplotlib()
        features = None
        if args.superpixel:
            import numpy as np

            if isinstance(x, dict):
                raise CliError("--superpixel: the model has several inputs; superpixels need one image input")
            features = superpixels(np.shape(x)[1:], args.superpixel)
        rows = len(next(iter(x.values()))) if isinstance(x, dict) else len(x)
        batch = args.batch_size or max(1, math.ceil(rows / 20))
        with _client(args) as c:
            values, base = c.shap(args.model, x, background=background, method=args.method, samples=args.samples,
                                  seed=args.seed, target=_index(args.index), output=_head(args.head),
                                  features=features, return_base=True, batch_size=batch, version=args.version,
                                  progress=progress)
    except (CliError, gradserve.GradserveError) as exc:
        return _fail(str(exc))
    finally:
        if bar is not None:
            bar.close()
    names = [f"group {g}" for g in range(values.shape[1])] if features is not None else None
    try:
        if args.output:
            write_result(args.output, values, None, header if features is None else names)
        else:
            _shap_summary(values, base, x, header if names is None else names)
        if args.plot:
            plot_shap(args.plot, x, values, base, header if names is None else names, example=args.plot_example,
                      superpixel=features)
    except CliError as exc:
        return _fail(str(exc))
    return 0


def _shap_summary(values: Any, base: Any, x: Any, header: Sequence[str] | None) -> None:
    import numpy as np

    flat, names = _flat(values, x, header)
    strength = np.abs(flat).mean(axis=0)
    order = np.argsort(-strength)[:20]
    width = max([len(names[i]) for i in order] + [7])
    print(f"base E[f(background)] = {float(np.mean(base)):.6g}; each row's values sum to f(row) - base")
    print(f"{'feature':<{width}}  {'mean |value|':>14}")
    for i in order:
        print(f"{names[i]:<{width}}  {strength[i]:>14.6g}")
    if len(strength) > len(order):
        print(f"({len(strength) - len(order)} more features; -o writes them all)")


def plot_shap(path: str, x: Any, values: Any, base: Any, feature_names: Sequence[str] | None = None, *,
              example: int = 0, superpixel: Any = None) -> None:
    """Draw Shapley values to a PNG (1000x400 pixels): the mean |value| of the strongest features
    over the rows (as shap's bar plot), and one row's values: a waterfall from the base to
    f(row) for tabular rows, a signed map over the image for image rows (per pixel, or per
    superpixel with ``superpixel`` labels)."""
    import numpy as np

    plt = _require_matplotlib()
    flat, names = _flat(values, x, feature_names)
    if not 0 <= example < len(flat):
        raise CliError(f"--plot-example: {example} is not in [0, {len(flat)})")
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    strength = np.abs(flat).mean(axis=0)
    top = np.argsort(-strength)[:15][::-1]
    left.barh(range(len(top)), strength[top], color="#008bfb")
    left.set_yticks(range(len(top)), [names[i] for i in top], fontsize=8)
    left.set_xlabel("mean |Shapley value|")
    left.set_title(f"feature importance over {len(flat)} rows", fontsize=10)
    image = None if isinstance(x, dict) else np.asarray(x)
    if image is not None and image.ndim in (3, 4) and (superpixel is not None or np.ndim(values) >= 3):
        row = np.asarray(values)[example]
        heat = row[superpixel] if superpixel is not None else row
        if heat.ndim == 3:
            heat = heat.sum(axis=-1)
        shown_image = image[example] if image.ndim == 3 else image[example].mean(axis=-1)
        limit = float(np.abs(heat).max()) or 1.0
        right.imshow(shown_image, cmap="gray")
        shown = right.imshow(heat, cmap="RdBu_r", vmin=-limit, vmax=limit, alpha=0.7)
        fig.colorbar(shown, ax=right, label="Shapley value")
        right.set_title(f"row {example}: red raises the output, blue lowers it", fontsize=10)
        right.axis("off")
    else:
        _waterfall(right, flat[example], names, float(np.asarray(base).reshape(-1)[example]), example)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _waterfall(ax: Any, row: Any, names: Sequence[str], base: float, example: int, shown: int = 9) -> None:
    """A row's values as steps from the base to f(row), the largest first, the rest in one step."""
    import numpy as np

    order = list(np.argsort(-np.abs(row)))
    steps = [(names[i], float(row[i])) for i in order[:shown]]
    if len(order) > shown:
        steps.append((f"{len(order) - shown} other features", float(row[order[shown:]].sum())))
    steps.reverse()   # the largest at the top
    start = base + sum(v for _, v in steps)   # f(row); walk back down to the base
    ends = []
    level = start
    for _, v in reversed(steps):
        ends.append(level)
        level -= v
    ends.reverse()
    for k, ((_, v), end) in enumerate(zip(steps, ends)):
        ax.barh(k, v, left=end - v, color="#ff0051" if v > 0 else "#008bfb")
    ax.set_yticks(range(len(steps)), [f"{n} ({v:+.3g})" for n, v in steps], fontsize=8)
    ax.axvline(base, color="grey", linewidth=0.8, linestyle="--")
    ax.axvline(start, color="black", linewidth=0.8)
    edges = [base, start] + ends + [end - v for (_, v), end in zip(steps, ends)]
    pad = 0.06 * (max(edges) - min(edges)) or 0.05 * max(1e-12, abs(base))
    ax.set_xlim(min(edges) - pad, max(edges) + pad)
    ax.set_xlabel(f"output: base {base:.4g} (dashed) to f(row) {start:.4g} (solid)")
    ax.set_title(f"row {example}", fontsize=10)


# -- pdp -------------------------------------------------------------------------------------------
def parse_feature(text: str) -> Any:
    """``"N"`` -> N, ``"NAME:N"`` -> (NAME, N), ``"N,M"`` -> a pair of them (a two-way surface)."""
    def one(part: str) -> Any:
        name, colon, index = part.strip().rpartition(":")
        try:
            value = int(index)
        except ValueError:
            raise CliError(f"--feature: expected N or NAME:N, got {part!r}") from None
        return (name, value) if colon else value

    parts = text.split(",")
    if len(parts) > 2:
        raise CliError(f"--feature: one feature or a pair N,M, got {text!r}")
    refs = [one(p) for p in parts]
    return refs[0] if len(refs) == 1 else tuple(refs)


def _percentiles(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise CliError(f"--percentiles: expected LOW,HIGH, got {text!r}") from None
    return low, high


def _feature_name(ref: Any, header: Sequence[str] | None) -> str:
    if isinstance(ref, tuple):
        return f"{ref[0]}[{ref[1]}]"
    return header[ref] if header and 0 <= ref < len(header) else f"x{ref}"


def _pdp(args: argparse.Namespace) -> int:
    import gradserve

    bar: Any = None
    try:
        background, header = read_inputs(args.background)
        features = [parse_feature(f) for f in args.feature]
        percentiles = _percentiles(args.percentiles)
        if args.plot:
            _require_matplotlib()
        bar = _bar(len(features), "feature", not args.no_progress and len(features) > 1)
        results = []
        with _client(args) as c:
            for feature in features:
                results.append(c.partial_dependence(args.model, background, feature=feature,
                                                    grid_resolution=args.grid_resolution, percentiles=percentiles,
                                                    target=_index(args.index), output=_head(args.head),
                                                    version=args.version))
                if bar is not None:
                    bar.update(1)
    except (CliError, gradserve.GradserveError) as exc:
        return _fail(str(exc))
    finally:
        if bar is not None:
            bar.close()
    labels = [[_feature_name(r, header) for r in (f if isinstance(f, tuple) and not isinstance(f[0], str) else [f])]
              for f in features]
    if args.json:
        print(json.dumps([{"features": names, "grid_values": [g.tolist() for g in r["grid_values"]],
                           "average": r["average"].tolist(), "individual": r["individual"].tolist()}
                          for names, r in zip(labels, results)]))
    else:
        for names, r in zip(labels, results):
            _pdp_table(names, r)
    if args.plot:
        try:
            plot_partial_dependence(args.plot, results, labels)
        except CliError as exc:
            return _fail(str(exc))
    return 0


def _pdp_table(names: Sequence[str], result: Any) -> None:
    import numpy as np

    if len(names) == 1:
        print(f"{names[0]:>14}  {'average':>14}  (over {len(result['individual'])} ICE curves)")
        for g, a in zip(result["grid"], result["average"]):
            print(f"{g:>14.6g}  {a:>14.6g}")
        return
    print(f"average over {len(result['individual'])} rows: rows {names[0]}, columns {names[1]}")
    with np.printoptions(precision=4, suppress=True, linewidth=120):
        print(np.asarray(result["average"]))


def plot_partial_dependence(path: str, results: Sequence[Any], labels: Sequence[Sequence[str]], *,
                            curves: int = 50) -> None:
    """One panel per result (400x350 pixels each, up to 3 a row): the ICE curves of up to ``curves``
    rows and their average (all rows') over one feature, or a contour map of a two-way average."""
    import numpy as np

    plt = _require_matplotlib()
    count = len(results)
    columns = min(3, count)
    rows = -(-count // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.5 * rows), dpi=100, squeeze=False)
    for k, (result, names) in enumerate(zip(results, labels)):
        ax = axes[k // columns][k % columns]
        if len(names) == 1:
            grid, ice = np.asarray(result["grid"]), np.asarray(result["individual"])
            pick = np.random.default_rng(0).choice(len(ice), min(curves, len(ice)), replace=False)
            for i in pick:
                ax.plot(grid, ice[i], color="grey", linewidth=0.6, alpha=0.4)
            ax.plot(grid, result["average"], color="tab:orange", linewidth=2.5, label="average (partial dependence)")
            ax.set_xlabel(names[0])
            ax.set_ylabel("output")
            ax.set_title(f"{len(pick)} of {len(ice)} ICE curves", fontsize=10)
            ax.legend(fontsize=8)
        else:
            g0, g1 = result["grid_values"]
            shown = ax.contourf(g1, g0, result["average"], levels=12, cmap="viridis")
            fig.colorbar(shown, ax=ax, label="average output")
            ax.set_xlabel(names[1])
            ax.set_ylabel(names[0])
            ax.set_title("two-way partial dependence", fontsize=10)
    for k in range(count, rows * columns):
        axes[k // columns][k % columns].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
