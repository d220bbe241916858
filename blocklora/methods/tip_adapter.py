"""Tip-Adapter and Tip-Adapter-F (Zhang et al., ECCV 2022): a key-value cache of the few-shot set.

Keys: the few-shot training images' features averaged over 10 augmented views
(RandomResizedCrop(scale 0.5-1, bicubic) + flip; the raw features are averaged, then normalized,
as the reference code does); values: one-hot labels. For a normalized test feature f:

    logits = 100 · f · Wᵀ + α · exp(−β (1 − f · Kᵀ)) · L

with W the normalized text features of the dataset's template (docs/protocol.md §5; the reference
ensembles 7 templates on ImageNet, we use the one template everywhere). α and β start from the
reference's per-dataset values (:data:`DATASET_SETTINGS`: init α, search scales (β, α); init β = 1
everywhere; datasets not listed, e.g. the synthetic demo ones, take ``default``), then a grid
search picks them: β_i = i·(scale_β − 0.1)/200 + 0.1 (i < 200), α_j = j·(scale_α − 0.1)/20 + 0.1
(j < 20), keeping the first best in β-major order as the reference does.

Tip-Adapter-F makes the keys a learnable linear layer initialized with K and trains it with the
cross-entropy of the logits above at the initial α, β: AdamW (lr 1e-3, eps 1e-4, weight decay
1e-2 = torch's default, which the reference keeps), cosine to 0 stepped per iteration, batch 256,
20 epochs (EuroSAT 100), each epoch on a fresh augmented view of every training image (cached
views 10, 11, … so they are not the views averaged into the keys). The reference trains in fp16
(hence its eps); we train in fp32.

Model selection uses the few-shot VALIDATION split only. The reference code picks Tip-Adapter-F's
best epoch by test accuracy and, on ImageNet, searches α and β on the test set: a test-set leak.
Here the best epoch (by validation accuracy at the initial α, β) and the α, β search both use the
validation features; the test split is touched only by the final evaluation. The chosen α, β, the
best epoch and the validation accuracies go into the run record's ``train_stats``.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from blocklora.methods.frozen import FeatureMethod, accuracy, train_on_features
from blocklora.methods.registry import register_method

# init α, search scales [β, α] and Tip-Adapter-F epochs of the reference's released configs
DATASET_SETTINGS: dict[str, dict[str, Any]] = {
    "default": {"init_alpha": 1.0, "search_scale": [7, 3], "epochs": 20},
    "imagenet": {"init_alpha": 1.17, "search_scale": [7, 3]},
    "caltech101": {"init_alpha": 3.0, "search_scale": [12, 5]},
    "dtd": {"init_alpha": 2.0, "search_scale": [13, 13]},
    "eurosat": {"init_alpha": 2.0, "search_scale": [12, 10], "epochs": 100},
    "fgvc_aircraft": {"init_alpha": 5.0, "search_scale": [30, 30]},
    "food101": {"init_alpha": 1.17, "search_scale": [10, 10]},
    "oxford_flowers": {"init_alpha": 10.0, "search_scale": [50, 50]},
    "oxford_pets": {"init_alpha": 1.17, "search_scale": [7, 3]},
    "stanford_cars": {"init_alpha": 3.0, "search_scale": [20, 10]},
    "sun397": {"init_alpha": 1.17, "search_scale": [12, 10]},
    "ucf101": {"init_alpha": 3.0, "search_scale": [7, 3]},
}


def search_grid(scale: float, steps: int) -> list[float]:
    """``i·(scale − 0.1)/steps + 0.1`` for ``i`` in ``0 .. steps − 1``."""
    return [i * (scale - 0.1) / steps + 0.1 for i in range(steps)]


def tip_logits(
    features: torch.Tensor,
    affinity: torch.Tensor,
    classifier: torch.Tensor,
    values: torch.Tensor,
    alpha: float | torch.Tensor,
    beta: float | torch.Tensor,
    logit_scale: float,
) -> torch.Tensor:
    """CLIP logits plus α times the cache logits exp(−β(1 − affinity)) · values."""
    cache = torch.exp(-beta * (1 - affinity)) @ values
    return logit_scale * features @ classifier.T + alpha * cache


@register_method
class TipAdapter(FeatureMethod):
    name = "tip_adapter"
    summary = "Tip-Adapter: training-free cache of augmented few-shot features, α/β searched on val"
    defaults: ClassVar[dict[str, Any]] = {
        "template": None,
        "augment_passes": 10,
        "crop_scale": [0.5, 1.0],
        "init_alpha": None,
        "init_beta": 1.0,
        "search": True,
        "search_scale": None,
        "search_step": [200, 20],
        "dataset_settings": DATASET_SETTINGS,
    }
    hparam_types: ClassVar[dict[str, str]] = {
        "template": "str|null",
        "init_alpha": "float|null",
        "search_scale": "list|null",
    }

    def setting(self, key: str) -> Any:
        """``hp[key]`` if set, else the dataset's entry in ``dataset_settings``, else its default."""
        if self.hp.get(key) is not None:
            return self.hp[key]
        table = self.hp["dataset_settings"]
        return {**table["default"], **table.get(self.task.dataset, {})}[key]

    def setup(self) -> None:
        self.alpha = float(self.setting("init_alpha"))
        self.beta = float(self.hp["init_beta"])
        # A cache of the final shape (zero keys until fit or load fill it), so the state exists
        # from the start, as every method's does.
        dim = int(self.model.visual.output_dim)
        self.keys = torch.zeros(len(self.task.train), dim, device=self.device)
        self.values = F.one_hot(self.labels(self.task.train), self.task.num_classes).float()

    def build_cache(self, run) -> None:
        """Text classifier, cache keys (mean of augmented views, normalized) and one-hot values."""
        self.classifier = self.text_features().float()
        views = self.features(
            self.task.train, run, augment=True, passes=int(self.hp["augment_passes"]), normalize=False
        )
        self.keys = F.normalize(views.mean(dim=0), dim=-1)
        self.values = F.one_hot(self.labels(self.task.train), self.task.num_classes).float()

    def affinity(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.keys.T

    def logits(self, features: torch.Tensor, alpha: float | None = None, beta: float | None = None):
        alpha = self.alpha if alpha is None else alpha
        beta = self.beta if beta is None else beta
        return tip_logits(
            features,
            self.affinity(features),
            self.classifier,
            self.values,
            alpha,
            beta,
            self.hp["logit_scale"],
        )

    @torch.no_grad()
    def search(self, features: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        """Grid-search α, β on (validation) features; keep the first best in β-major order."""
        scale_beta, scale_alpha = (float(s) for s in self.setting("search_scale"))
        steps_beta, steps_alpha = (int(s) for s in self.hp["search_step"])
        betas, alphas = search_grid(scale_beta, steps_beta), search_grid(scale_alpha, steps_alpha)
        alpha_column = torch.tensor(alphas, device=features.device).view(-1, 1, 1)
        affinity = self.affinity(features)
        clip = self.hp["logit_scale"] * features @ self.classifier.T
        correct = torch.empty(len(betas), len(alphas), device=features.device)
        for i, beta in enumerate(betas):
            cache = torch.exp(-beta * (1 - affinity)) @ self.values
            logits = clip.unsqueeze(0) + alpha_column * cache.unsqueeze(0)
            correct[i] = (logits.argmax(dim=-1) == labels).float().sum(dim=-1)
        i, j = divmod(int(correct.flatten().argmax()), len(alphas))
        self.beta, self.alpha = betas[i], alphas[j]
        return {"val_accuracy": float(correct[i, j]) / len(labels)}

    def select(self, run, stats: dict[str, Any]) -> dict[str, Any]:
        """α, β: searched on the validation split (never the test split), or the initial values."""
        if not self.task.val:
            return {**stats, "alpha": self.alpha, "beta": self.beta, "searched": False}
        val, labels = self.features(self.task.val, run)[0], self.labels(self.task.val)
        with torch.no_grad():
            stats["zero_shot_val_accuracy"] = accuracy(
                self.hp["logit_scale"] * val @ self.classifier.T, labels
            )
            stats["init_val_accuracy"] = accuracy(self.logits(val), labels)
        if self.hp["search"]:
            stats.update(self.search(val, labels))
        else:
            stats["val_accuracy"] = stats["init_val_accuracy"]
        return {**stats, "alpha": self.alpha, "beta": self.beta, "searched": bool(self.hp["search"])}

    def fit(self, run) -> dict[str, Any]:
        started = time.perf_counter()
        self.build_cache(run)
        stats = self.select(run, {"init_alpha": self.alpha, "init_beta": self.beta})
        return {"iterations": 0, "train_seconds": time.perf_counter() - started, **stats}

    @torch.no_grad()
    def eval_logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits(features.float())

    def prepare_eval(self) -> None:
        self.classifier = self.text_features().float()

    def state(self) -> dict[str, torch.Tensor]:
        return {
            "keys": self.keys,
            "values": self.values,
            "alpha": torch.tensor(self.alpha),
            "beta": torch.tensor(self.beta),
        }

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.keys = tensors["keys"].to(self.device)
        self.values = tensors["values"].to(self.device)
        self.alpha, self.beta = float(tensors["alpha"]), float(tensors["beta"])


@register_method
class TipAdapterF(TipAdapter):
    name = "tip_adapter_f"
    summary = "Tip-Adapter-F: learnable cache keys (AdamW, 20 epochs), epoch and α/β chosen on val"
    defaults: ClassVar[dict[str, Any]] = {
        **TipAdapter.defaults,
        "optimizer": "adamw",
        "lr": 1e-3,
        "eps": 1e-4,
        "weight_decay": 1e-2,
        "betas": [0.9, 0.999],
        "momentum": 0.9,
        "eta_min": 0.0,
        "batch_size": 256,
        "epochs": None,
        "train_views": None,
    }
    hparam_types: ClassVar[dict[str, str]] = {"epochs": "int|null", "train_views": "int|null"}

    def setup(self) -> None:
        super().setup()
        self.cache_keys = nn.Linear(self.feature_dim, len(self.task.train), bias=False).to(self.device)
        nn.init.zeros_(self.cache_keys.weight)

    def extra_modules(self) -> list[nn.Module]:
        return [self.cache_keys]

    def modules_to_train(self) -> nn.Module:
        return self.cache_keys

    def affinity(self, features: torch.Tensor) -> torch.Tensor:
        return self.cache_keys(features)

    def epochs(self) -> int:
        return int(self.setting("epochs"))

    def fit(self, run) -> dict[str, Any]:
        started = time.perf_counter()
        self.build_cache(run)
        with torch.no_grad():
            self.cache_keys.weight.copy_(self.keys)
        epochs = self.epochs()
        views = self.features(
            self.task.train,
            run,
            augment=True,
            passes=int(self.hp["train_views"] or epochs),
            first_pass=int(self.hp["augment_passes"]),
        )
        labels = self.labels(self.task.train)
        if self.task.val:
            val, val_labels = self.features(self.task.val, run)[0], self.labels(self.task.val)
        best = {"accuracy": -1.0, "epoch": epochs, "weight": self.cache_keys.weight.detach().clone()}

        def keep_best(epoch: int) -> None:
            if not self.task.val:
                return
            with torch.no_grad():
                acc = accuracy(self.logits(val), val_labels)
            if acc > best["accuracy"]:
                best.update(accuracy=acc, epoch=epoch + 1, weight=self.cache_keys.weight.detach().clone())

        self.cache_keys.train()
        stats = train_on_features(
            list(self.cache_keys.parameters()),
            self.logits,
            views,
            labels,
            self.hp,
            run,
            epochs=epochs,
            desc=f"{self.name} {self.task.dataset} {self.task.shots}-shot",
            on_epoch_end=keep_best,
        )
        self.cache_keys.eval()
        with torch.no_grad():
            if self.task.val:
                self.cache_keys.weight.copy_(best["weight"])
        stats = {**stats, "best_epoch": best["epoch"], "init_alpha": self.alpha, "init_beta": self.beta}
        if self.task.val:
            stats["best_epoch_val_accuracy"] = best["accuracy"]
        stats = self.select(run, stats)
        return {**stats, "train_seconds": time.perf_counter() - started}

    def state(self) -> dict[str, torch.Tensor]:
        return {**super().state(), "keys": self.cache_keys.weight}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_state(tensors)
        if self.cache_keys.weight.shape != tensors["keys"].shape:  # a cache of another few-shot set
            self.cache_keys = nn.Linear(self.feature_dim, len(tensors["keys"]), bias=False).to(self.device)
        with torch.no_grad():
            self.cache_keys.weight.copy_(tensors["keys"])
