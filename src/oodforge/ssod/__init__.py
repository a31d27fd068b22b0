"""SSOD (Pei, ICLR 2024): a classifier trained jointly with a binary OOD head whose outliers are
the image positions (the background) the classifier is unsure about. See :mod:`.model`."""

from .detector import combined_posterior
from .explain import explain_image
from .model import SSODModel
from .train import CPU_DEFAULT, CPU_FINETUNE, PAPER_SETTING, SSODObjective, train_ssod

__all__ = ["CPU_DEFAULT", "CPU_FINETUNE", "PAPER_SETTING", "SSODModel", "SSODObjective", "combined_posterior",
           "explain_image", "train_ssod"]
