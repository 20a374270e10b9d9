"""Streaming shards to training and evaluation: the webdataset loader (``dataset``) with its
remote reads, rank/worker ranges and crops, the DALI loader (``dali``), and both behind one
interface (``split``)."""
