"""Decomposition methods by name: one file each, all producing the same factor structure.

Every method turns the weights of one plan unit (one matrix, or the members of a joint group, which read the same
input) and a rank k into `linalg.Factors`: one input basis B (k, d_in) shared by the unit and one output factor
A_i (d_out_i, k) per member, with A_i B ≈ W_i. That is the structure `compress.install_unit` builds and checkpoints
store, so a new method costs one file here and one row in tests/test_methods.py, and nothing downstream changes.
Data-aware methods also receive the statistics of the unit's input on calibration text (`InputStats`); their basis
is in general not orthonormal, which storage does not care about.

A method is named in `JointRankConfig.method` as NAME or NAME:OPTION (e.g. ``balanced:heads``).
"""

from __future__ import annotations

from .registry import Method, available, factorise, method_of, parse, register, settings_dict, settings_for

# Registration happens on import; the order here is the order of `available()` and of the CLI help.
from . import svd as _svd  # noqa: E402,F401
from . import balanced as _balanced  # noqa: E402,F401
from . import asvd as _asvd  # noqa: E402,F401
from . import svd_llm as _svd_llm  # noqa: E402,F401
from . import llm_rom as _llm_rom  # noqa: E402,F401

from .asvd import ASVDSettings  # noqa: E402
from .balanced import BalancedSettings  # noqa: E402
from .llm_rom import LLMROMSettings  # noqa: E402
from .svd import SVDSettings  # noqa: E402
from .svd_llm import SVDLLMSettings  # noqa: E402

__all__ = ["ASVDSettings", "BalancedSettings", "LLMROMSettings", "SVDLLMSettings", "SVDSettings", "Method", "available", "factorise", "method_of", "parse", "register", "settings_dict", "settings_for"]
