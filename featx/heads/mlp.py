"""The MLP head: Linear-ReLU-Dropout-Linear (the PyTorch transfer-learning tutorial's fixed-extractor head), trained with Adam in torch.

After `fit` the weights are plain numpy arrays and inference is numpy, so the head saves and loads without
pickles and predicts without torch.
"""
from __future__ import annotations

import math

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from .class_weights import balanced_weights
from .model import mlp_logits, softmax

TARGET_STEPS = 500  # default epochs: enough for about this many Adam steps, within [MIN_EPOCHS, MAX_EPOCHS]
MIN_EPOCHS, MAX_EPOCHS = 10, 100


class MLPHead(ClassifierMixin, BaseEstimator):
    """Linear(D, hidden) - ReLU - Dropout - Linear(hidden, classes) classifier.

    C is the inverse L2 strength as in the linear heads: Adam's weight decay on the weight matrices is
    1 / (C * rows). epochs=None trains for about 500 steps (10 to 100 epochs). Deterministic for a given seed.
    """

    def __init__(self, C=1.0, hidden=512, dropout=0.5, epochs=None, batch_size=256, lr=1e-3, class_weight=None, seed=0):
        self.C = C
        self.hidden = hidden
        self.dropout = dropout
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.class_weight = class_weight
        self.seed = seed

    def fit(self, X, y):
        import torch

        X = np.ascontiguousarray(X, dtype=np.float32)
        self.classes_, y_index = np.unique(y, return_inverse=True)
        n, d = X.shape
        k = len(self.classes_)
        batches = math.ceil(n / self.batch_size)
        epochs = self.epochs or min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(TARGET_STEPS / batches)))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            first, last = torch.nn.Linear(d, self.hidden), torch.nn.Linear(self.hidden, k)
            optimizer = torch.optim.Adam(
                [{"params": [first.weight, last.weight], "weight_decay": 1.0 / (self.C * n)},
                 {"params": [first.bias, last.bias], "weight_decay": 0.0}],
                lr=self.lr,
            )
            loss_fn = torch.nn.CrossEntropyLoss(weight=self._class_weights(y_index, k))
            features, targets = torch.from_numpy(X), torch.from_numpy(y_index.astype(np.int64))
            for _ in range(epochs):
                for batch in torch.randperm(n).split(self.batch_size):
                    optimizer.zero_grad(set_to_none=True)
                    loss_fn(self._train_forward(first, last, features[batch]), targets[batch]).backward()
                    optimizer.step()
        params = (first.weight, first.bias, last.weight, last.bias)
        self.w1_, self.b1_, self.w2_, self.b2_ = (p.detach().numpy().copy() for p in params)
        self.n_features_in_ = d
        self.n_epochs_ = epochs
        return self

    def _train_forward(self, first, last, x):
        """Linear-ReLU-Dropout-Linear in training mode (a rand mask: CPU bernoulli_ is several times slower)."""
        import torch

        hidden = torch.relu(first(x))
        if self.dropout:
            hidden = hidden * (torch.rand_like(hidden) >= self.dropout) / (1.0 - self.dropout)
        return last(hidden)

    def _class_weights(self, y_index: np.ndarray, k: int):
        import torch

        if self.class_weight is None:
            return None
        if self.class_weight == "balanced":
            weights = balanced_weights(y_index, k)  # every class is present: classes_ come from y
        else:
            weights = {i: self.class_weight.get(c, 1.0) for i, c in enumerate(self.classes_)}
        return torch.as_tensor([weights[i] for i in range(k)], dtype=torch.float32)

    def decision_function(self, X) -> np.ndarray:
        return mlp_logits(np.asarray(X), self.w1_, self.b1_, self.w2_, self.b2_)

    def predict_proba(self, X) -> np.ndarray:
        return softmax(self.decision_function(X))

    def predict(self, X) -> np.ndarray:
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]
