"""Built-in plugins of specframe (importable as ``specframe.plugins``).

Each module registers its components through the same pluggy hooks a third-party plugin uses.
"""
