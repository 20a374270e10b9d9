"""The shard format between the stages: tar members and names (``format``), the manifest, and
verification against it."""
