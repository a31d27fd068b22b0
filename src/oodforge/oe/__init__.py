"""Outlier exposure with forged outliers: fine-tune a classifier so that it is unsure on outliers
forged from its own training set (SHIFT, SynOOD or refined stores). See :mod:`.objective`."""

from .objective import OE_LOSSES, OutlierExposure, energy_margin_loss, uniform_ce_loss

__all__ = ["OE_LOSSES", "OutlierExposure", "energy_margin_loss", "uniform_ce_loss"]
