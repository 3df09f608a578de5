"""curvecast serving: ONNX export and runtimes, the HTTP server, and the Python client.

Importing this package is cheap and torch-free: ``serve.client`` must stay importable without
torch or onnxruntime. The server lives in ``serve.app`` (``curvecast serve``).
"""
