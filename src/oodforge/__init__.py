"""oodforge: out-of-distribution detection for image classifiers without real outlier data.

Scores everywhere follow one convention: higher = more in-distribution (ID).
"""

__version__ = "0.1.0"
