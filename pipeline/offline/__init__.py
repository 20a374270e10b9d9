"""The offline stage: source listings, decoding, encryption into shards (``build``), its ranks,
its output lock, the owner's source map and the embedded data sets."""
