"""Request pipeline stages, one module each; their order is in proxy/pipeline.py."""
