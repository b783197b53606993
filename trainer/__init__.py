"""What runs on the cluster: optimizers, training backends, models, data and the worker loop.

``trainer`` never imports ``service`` or ``api`` (imports point ``api → service → trainer``).
"""

__version__ = "0.1.0"
