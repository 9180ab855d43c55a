"""Streaming compression of a safetensors checkpoint, layer by layer, without building the model.

source     the checkpoint read from its headers and memory-mapped files (TensorSource, read_layout)
layer      one layer's job: read, run its units through the engine, write its shard
executors  where the jobs run: in order, on a local thread pool, or as Ray tasks
run        the whole run: plan, staging directory, progress and resume, final assembly
"""

from .layer import LayerJob, StreamOptions
from .run import StreamResult, compress_checkpoint
from .source import TensorSource, is_streamable_source, read_layout

__all__ = ["LayerJob", "StreamOptions", "StreamResult", "TensorSource", "compress_checkpoint",
           "is_streamable_source", "read_layout"]
