"""Streaming shards to training and evaluation: the webdataset loader (``dataset``) with its
remote reads, rank/worker ranges and crops, and the DALI loader (``dali``)."""
