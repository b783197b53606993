"""The HTTP face of hutch: the FastAPI app, the Python client and the ``hutch`` CLI."""
