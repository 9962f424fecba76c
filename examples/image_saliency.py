"""Saliency of an image classifier: integrated-gradients attributions from gradserve, drawn over
the image and written to a PNG.

Usage (against ``gradserve serve``, which hosts the demo model ``cnn``: 16x16 grey images, 10
classes)::

    python examples/image_saliency.py --target 127.0.0.1:50051 --out saliency.png

Needs the SDK and matplotlib (``pip install 'gradserve[viz]'``); no TensorFlow.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np


def make_image(size: int = 16) -> np.ndarray:
    """A synthetic test image: a bright square and a faint diagonal on a dark background."""
    image = np.zeros((size, size), np.float32)
    image[4:9, 3:8] = 1.0
    image[np.arange(size), np.arange(size)] = 0.4
    return image[None, :, :, None]          # (batch=1, H, W, channels=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="integrated-gradients saliency map to a PNG")
    parser.add_argument("--target", default="127.0.0.1:50051", help="server address (default 127.0.0.1:50051)")
    parser.add_argument("--model", default="cnn", help="image model (default: the demo model cnn)")
    parser.add_argument("--out", default="saliency.png", help="PNG to write (default saliency.png)")
    parser.add_argument("--steps", type=int, default=32, help="integrated-gradients steps (default 32)")
    args = parser.parse_args(argv)

    try:
        import matplotlib
    except ImportError:
        print("this example needs matplotlib: pip install 'gradserve[viz]'", file=sys.stderr)
        return 2
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import gradserve

    image = make_image()
    with gradserve.Client(args.target) as client:
        probs = client.predict(args.model, image)
        cls = int(np.argmax(probs[0]))
        # Attributions of the predicted class from a black baseline; delta is the completeness
        # error (sum of attributions vs. the change of the output), small when steps suffice.
        attributions, delta = client.integrated_gradients(args.model, image, target=cls, steps=args.steps,
                                                          baseline=0.0, return_delta=True)
    heat = np.abs(attributions[0, :, :, 0])

    fig, axes = plt.subplots(1, 2, figsize=(8, 4), dpi=100)
    axes[0].imshow(image[0, :, :, 0], cmap="gray")
    axes[0].set_title("input")
    axes[1].imshow(image[0, :, :, 0], cmap="gray")
    shown = axes[1].imshow(heat, cmap="inferno", alpha=0.65)
    axes[1].set_title(f"|IG| for class {cls} (p={probs[0, cls]:.2f})")
    fig.colorbar(shown, ax=axes[1], fraction=0.046)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    plt.close(fig)
    print(f"class {cls}, convergence delta {float(np.abs(delta).max()):.2e}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
