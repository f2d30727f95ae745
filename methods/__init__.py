"""Pre-training method plugins and the building blocks they share.

Built-in plugins are imported by ``benchmark.core.registry`` on first use (see ``BUILTIN_METHODS``
there), so importing a building block never pulls in every method.
"""
