"""The adapter of llama-cpp-python: the only layer that touches a ``Llama`` or its context."""
