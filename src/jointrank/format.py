"""The checkpoint format's names and version, in one place: every writer (in-memory save, streaming, Ray) and
every reader (load, verify, info, evaluate, sources) takes them from here, so they cannot drift apart.

(Until this module, the manifest's file name was defined twice, in sources.py and verify.py.)"""

MANIFEST_NAME = "jointrank_manifest.json"  # written last: a directory without it is not a finished checkpoint
MANIFEST_FORMAT = 1  # the manifest layout's version, stamped into every manifest
INDEX_NAME = "model.safetensors.index.json"  # transformers' names for sharded and single-file weights
SINGLE_NAME = "model.safetensors"
