"""Sample quality in the feature space of a classifier trained on real images, for small embedded datasets.

Class accuracy alone cannot see mode collapse: ten copies of one good digit per class score 100%. So beside it:
- the Fréchet distance (FD) between the samples' and the real training images' features;
- precision and recall (k = 3, `adm_metrics.precision_recall`) against the real training features;
- diversity: the mean pairwise feature distance within each class, averaged over the classes.
The floor is the same report for real held-out images (as many per class as the samples have) against the real
training images: what a perfect generator would score with that many images. The ceiling is the report for the
tokenizer's reconstructions of those same held-out images: what a generator that reproduced their codes exactly
would score, so a gap between samples and ceiling is the generator's and a gap between ceiling and floor the
tokenizer's. The features are the classifier's
penultimate (hidden) activations, not its logits. ImageNet keeps the Inception path (`metrics`, `run`).
"""

import dataclasses
from typing import Optional

import numpy as np
from sklearn.neural_network import MLPClassifier

from bigr_jax.evaluation import adm_metrics

HIDDEN_UNITS = 64


def _flat(images) -> np.ndarray:
  """(N, H, W[, C]) images, uint8 in [0, 255] or float in [0, 1], as (N, H * W) grayscale in [0, 1]."""
  images = np.asarray(images)
  scaled = images.astype(np.float32) / (255.0 if images.dtype == np.uint8 else 1.0)
  gray = scaled.mean(-1) if scaled.ndim == 4 else scaled
  return gray.reshape(len(gray), -1)


@dataclasses.dataclass
class FeatureSpace:
  """A one-hidden-layer classifier fitted on real training images: `features` are its hidden activations."""
  classifier: MLPClassifier

  @classmethod
  def fit(cls, images, labels, seed: int = 0) -> "FeatureSpace":
    classifier = MLPClassifier(hidden_layer_sizes=(HIDDEN_UNITS,), max_iter=500, random_state=seed)
    return cls(classifier.fit(_flat(images), np.asarray(labels)))

  def features(self, images) -> np.ndarray:
    hidden = _flat(images) @ self.classifier.coefs_[0] + self.classifier.intercepts_[0]
    return np.maximum(hidden, 0.0)  # MLPClassifier's default activation, relu

  def predict(self, images) -> np.ndarray:
    return self.classifier.predict(_flat(images))


def diversity(features: np.ndarray, labels: np.ndarray) -> Optional[float]:
  """Mean pairwise Euclidean distance between features of the same class, averaged over classes with >= 2
  images; None where no class has two."""
  per_class = []
  for label in np.unique(labels):
    x = features[labels == label].astype(np.float64)
    if len(x) < 2:
      continue
    squared = np.maximum((x * x).sum(1)[:, None] + (x * x).sum(1)[None] - 2 * x @ x.T, 0.0)
    per_class.append(np.sqrt(squared)[np.triu_indices(len(x), 1)].mean())
  return float(np.mean(per_class)) if per_class else None


def score(space: FeatureSpace, train_features: np.ndarray, images, labels) -> dict:
  """FD, precision, recall, diversity and class accuracy of `images` against the real training features."""
  labels = np.asarray(labels)
  features = space.features(images)
  fd = adm_metrics.FIDStatistics.from_activations(features).frechet_distance(
      adm_metrics.FIDStatistics.from_activations(train_features))
  precision, recall = adm_metrics.precision_recall(train_features, features)
  return {"fd": fd, "precision": precision, "recall": recall, "diversity": diversity(features, labels),
          "class_accuracy": float(np.mean(space.predict(images) == labels)), "num_images": int(len(labels))}


def matching_subset(held_out_labels: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Indices into the held-out set with as many images of each class as `labels` has (first ones first)."""
  held_out_labels = np.asarray(held_out_labels)
  picked = []
  for label, count in zip(*np.unique(labels, return_counts=True)):
    of_class = np.flatnonzero(held_out_labels == label)
    if len(of_class) < count:
      raise ValueError(f"the held-out split has {len(of_class)} images of class {label}; the floor needs {count}")
    picked.append(of_class[:count])
  return np.concatenate(picked)


@dataclasses.dataclass
class QualityReport:
  """Scores samples against real training images, with the floor from real held-out images."""
  space: FeatureSpace
  train_features: np.ndarray
  held_out_images: np.ndarray
  held_out_labels: np.ndarray
  held_out_reconstructions: Optional[np.ndarray] = None  # the tokenizer's, of held_out_images, in order

  @classmethod
  def from_splits(cls, train_images, train_labels, held_out_images, held_out_labels, seed: int = 0,
                  held_out_reconstructions=None):
    space = FeatureSpace.fit(train_images, train_labels, seed)
    if held_out_reconstructions is not None and len(held_out_reconstructions) != len(held_out_images):
      raise ValueError(f"{len(held_out_reconstructions)} reconstructions of {len(held_out_images)} held-out images")
    return cls(space, space.features(train_images), np.asarray(held_out_images), np.asarray(held_out_labels),
               held_out_reconstructions)

  def samples(self, images, labels) -> dict:
    return score(self.space, self.train_features, images, labels)

  def floor(self, labels) -> dict:
    """The report for real held-out images, as many per class as `labels` holds."""
    subset = matching_subset(self.held_out_labels, labels)
    return score(self.space, self.train_features, self.held_out_images[subset], self.held_out_labels[subset])

  def ceiling(self, labels) -> Optional[dict]:
    """The report for the tokenizer's reconstructions of the floor's images (None without reconstructions)."""
    if self.held_out_reconstructions is None:
      return None
    subset = matching_subset(self.held_out_labels, labels)
    return score(self.space, self.train_features, self.held_out_reconstructions[subset],
                 self.held_out_labels[subset])


def summary_line(samples: dict, floor: dict, ceiling: Optional[dict] = None) -> str:
  """Each figure of the samples, with the tokenizer's reconstructions' (ceiling) and the real images' (floor)."""
  names = (("fd", "FD", ".2f"), ("precision", "precision", ".2f"), ("recall", "recall", ".2f"),
           ("diversity", "diversity", ".2f"), ("class_accuracy", "class accuracy", ".0%"))
  shown = lambda value, fmt: "n/a" if value is None else f"{value:{fmt}}"  # diversity of one image per class
  beside = lambda key, fmt: (f"B-AE {shown(ceiling[key], fmt)}, " if ceiling else "") + f"real {shown(floor[key], fmt)}"
  return "; ".join(f"{label} {shown(samples[key], fmt)} ({beside(key, fmt)})" for key, label, fmt in names)
