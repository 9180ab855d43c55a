"""The public names of jointrank.streaming (compress a safetensors checkpoint layer by layer, bounded memory,
resumable), kept importable from here as before, and which `jointrank compress` flags ask for streaming. The
command's streaming branch is cli._compress_streaming over pipeline.compress_model(stream=StreamOptions(...))."""

from __future__ import annotations

from .format import INDEX_NAME, SINGLE_NAME
from .streaming.layer import LayerJob, StreamOptions, factorise_unit, run_layer_job, unit_record
from .streaming.run import StreamResult, compress_checkpoint
from .streaming.source import TensorSource, is_streamable_source, read_layout

__all__ = ["INDEX_NAME", "LayerJob", "SINGLE_NAME", "StreamOptions", "StreamResult", "TensorSource",
           "compress_checkpoint", "factorise_unit", "is_streamable_source", "read_layout",
           "run_layer_job", "unit_record", "wants_stream"]


def wants_stream(args) -> bool:
    """Streaming is opt-in (--stream); --resume, --workers N>1, --backend ray and --seed only exist there."""
    return bool(getattr(args, "stream", False) or getattr(args, "resume", False)
                or (getattr(args, "workers", 1) or 1) > 1 or getattr(args, "backend", "local") != "local"
                or getattr(args, "seed", None) is not None)
