"""The benchmark: ``python -m msdeformattn.bench`` (``make bench``, ``msdeformattn bench``).

The operator against its peers, and the detector against transformers; the flags
are documented in :mod:`.command`. One file per concern, in the order a run uses them:

- ``cases.py``: the input cases, shaped like a trained detector's;
- ``peers.py``: the contenders, our backends and the peers' implementations;
- ``agreement.py``: the check against the float64 formula before anything is timed;
- ``timing.py``: medians with ``torch.utils.benchmark``;
- ``memory.py``: peak memory, measured in a fresh process;
- ``operator_bench.py``: the operator benchmark's rows;
- ``detector.py``, ``encoder_layer.py``, ``pixel_decoder.py``: end to end against transformers;
- ``tables.py``: the markdown tables;
- ``command.py``: the command line, :func:`main`.
"""

from .command import main

__all__ = ["main"]
