"""The control plane: settings, job store, job lifecycle, Ray launcher and reconciler.

``service`` may import ``trainer``, never ``api``.
"""
