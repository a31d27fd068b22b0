"""Classifiers: backbones, training, checkpoints and cached feature extraction."""

from .backbones import ARCHS, build_model
from .base import Classifier, ForwardOutput
from .checkpoint import load_checkpoint, save_checkpoint, weights_hash
from .features import extract_features
from .featureset import FeatureSet
from .train import accuracy, train_classifier

__all__ = ["ARCHS", "Classifier", "FeatureSet", "ForwardOutput", "accuracy", "build_model", "extract_features",
           "load_checkpoint", "save_checkpoint", "train_classifier", "weights_hash"]
