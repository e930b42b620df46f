"""Commands around the engine: ``bench`` (methods side by side), ``trace`` / ``simulate`` (the real engine
over a recorded trace on a simulated device) and ``profile`` (this machine's verification latency table).
They use the core (:mod:`specframe.engine` and the registry) and, like it, never import a plugin module."""
