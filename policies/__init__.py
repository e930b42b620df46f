"""Built-in policy bundles of specframe (importable as ``specframe.policies``)."""
