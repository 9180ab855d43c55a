"""`jointrank compress --stream`: the command-line side of streaming compression, and the public names of
jointrank.streaming (compress a safetensors checkpoint layer by layer, bounded memory, resumable), kept importable
from here as before."""

from __future__ import annotations

import sys
from pathlib import Path

from .format import INDEX_NAME, SINGLE_NAME
from .streaming.layer import LayerJob, StreamOptions, factorise_unit, run_layer_job, unit_record
from .streaming.run import StreamResult, compress_checkpoint
from .streaming.source import TensorSource, is_streamable_source, read_layout

__all__ = ["INDEX_NAME", "LayerJob", "SINGLE_NAME", "StreamOptions", "StreamResult", "TensorSource",
           "compress_checkpoint", "factorise_unit", "is_streamable_source", "read_layout", "run_cli",
           "run_layer_job", "unit_record", "wants_stream"]


def wants_stream(args) -> bool:
    """Streaming is opt-in (--stream); --resume, --workers N>1, --backend ray and --seed only exist there."""
    return bool(getattr(args, "stream", False) or getattr(args, "resume", False)
                or (getattr(args, "workers", 1) or 1) > 1 or getattr(args, "backend", "local") != "local"
                or getattr(args, "seed", None) is not None)


def run_cli(args, config) -> int:
    """The streaming branch of `jointrank compress`: checks, runs, prints what the in-memory branch prints."""
    from .pipeline import Calibration, Evaluation, compress_model
    from .tables import params_summary

    options = StreamOptions(solver=config.solver, seed=0 if args.seed is None else args.seed, device=args.device,
                            dtype=args.dtype, workers=args.workers or 1, backend=args.backend, resume=args.resume,
                            overwrite=args.overwrite)
    calibration = Calibration(args.calibration) if getattr(args, "calibration", None) else None
    try:  # what streaming cannot do (eval, heal, calibration, dense) is refused there, naming the flags
        done = compress_model(args.model, args.out, config, stream=options, calibration=calibration,
                              heal=getattr(args, "heal", "none"), evaluate=Evaluation(args.eval) if args.eval else None,
                              dense=args.dense)
    except KeyboardInterrupt:
        print(f"jointrank: finished layers are kept in {Path(args.out).parent / ('.' + Path(args.out).name)}"
              ".partial; rerun with --resume to continue", file=sys.stderr)
        raise
    r = done.result
    print(params_summary(r.params_total_before, r.params_total_after, r.params_decoder_before,
                         r.params_decoder_after))
    resumed = f" ({done.layers_resumed} layers resumed)" if done.layers_resumed else ""
    print(f"\nstreamed {r.plan.num_layers} layers{resumed}: factorise {r.extra['stream']['factorise_seconds']:.1f} s, "
          f"total {done.seconds:.1f} s; saved checkpoint to {args.out}")
    return 0
