"""Models: building them (``factory``), checkpoints, evaluation on shards, and authorized
inference on image files (``classifier``)."""
