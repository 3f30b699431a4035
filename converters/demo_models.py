"""Small models trained with numpy: the demo's and the README's examples, no framework needed.

- ``linear``: least-squares linear regression on noisy ``y = 2x + 1``.
- ``logistic``: logistic regression (two Gaussian blobs), class probabilities via softmax.
- ``mlp``: a 2-layer MLP classifier trained by gradient descent on the same blobs.
Each is written as ONNX; ``fleet build`` turns it into a bundle.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from converters.builders import Dense, Mlp, write_onnx_mlp

DEMO_MODELS = ("linear", "logistic", "mlp")


def linear_regression(slope: float = 2.0, intercept: float = 1.0, seed: int = 0, n: int = 200) -> Mlp:
    """Fit ``y = a x + b`` to noisy samples by least squares (the seed's first example)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-5, 5, n)
    y = slope * x + intercept + rng.normal(0, 0.1, n)
    a, b = np.linalg.lstsq(np.stack([x, np.ones_like(x)], 1), y, rcond=None)[0]
    return Mlp([Dense(np.array([[a]], np.float32), np.array([b], np.float32))])


def _blobs(seed: int, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(-1.5, 1.0, (n // 2, 2)), rng.normal(1.5, 1.0, (n // 2, 2))]).astype(np.float32)
    y = np.repeat([0, 1], n // 2)
    return x, y


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def logistic_regression(seed: int = 0, steps: int = 300, lr: float = 0.5) -> Mlp:
    """Two-class logistic regression by gradient descent; the output is the two class scores (logits)."""
    x, y = _blobs(seed)
    w, b = np.zeros((2, 2)), np.zeros(2)
    onehot = np.eye(2)[y]
    for _ in range(steps):
        p = _softmax(x @ w.T + b)
        w -= lr * (p - onehot).T @ x / len(x)
        b -= lr * (p - onehot).mean(0)
    return Mlp([Dense(w.astype(np.float32), b.astype(np.float32))])


def mlp_classifier(seed: int = 0, hidden: int = 16, steps: int = 500, lr: float = 0.2) -> Mlp:
    """A 2 -> hidden -> 2 ReLU MLP trained by full-batch gradient descent on the blobs."""
    x, y = _blobs(seed)
    rng = np.random.default_rng(seed)
    w1, b1 = rng.normal(0, 0.5, (hidden, 2)), np.zeros(hidden)
    w2, b2 = rng.normal(0, 0.5, (2, hidden)), np.zeros(2)
    onehot = np.eye(2)[y]
    for _ in range(steps):
        h = np.maximum(x @ w1.T + b1, 0)
        g = (_softmax(h @ w2.T + b2) - onehot) / len(x)
        gh = (g @ w2) * (h > 0)
        w2 -= lr * g.T @ h
        b2 -= lr * g.sum(0)
        w1 -= lr * gh.T @ x
        b1 -= lr * gh.sum(0)
    return Mlp([Dense(w1.astype(np.float32), b1.astype(np.float32), relu=True), Dense(w2.astype(np.float32), b2.astype(np.float32))])


def write_demo_model(kind: str, path: Path, seed: int = 0) -> Path:
    if kind == "linear":
        model = linear_regression(seed=seed)
    elif kind == "logistic":
        model = logistic_regression(seed=seed)
    elif kind == "mlp":
        model = mlp_classifier(seed=seed)
    else:
        raise ValueError(f"unknown demo model {kind!r}; choose from {', '.join(DEMO_MODELS)}")
    return write_onnx_mlp(model, path)
