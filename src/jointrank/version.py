"""The package version, in a module of its own so the modules that stamp it need not import the package root."""

__version__ = "0.1.0"
