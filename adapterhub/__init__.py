"""adapterhub core: base models, the adapter format, training, evaluation and merging.

This package never imports the registry, the server or the CLI (DESIGN.md import
directions); those build on it. Heavy dependencies (torch, transformers, peft) are imported
inside the functions that need them, so `adapterhub.errors`, `adapterhub.formats` and
`adapterhub.names` stay cheap enough for the registry to use without pulling in torch.
"""

__version__ = "0.1.0"
