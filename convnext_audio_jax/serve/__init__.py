"""The ``serve`` command: a web page and a JSON API for tagging and embeddings over the inference engine."""
