"""The cipher: key files and material (``keys``), block-wise transforms (``blockwise``)."""
