"""The API's routes, one module per resource: jobs, packages, and the probes (health, readiness,
Prometheus metrics). Each calls :class:`~service.control_plane.ControlPlane` methods only."""
