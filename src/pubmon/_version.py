"""The version, in a module of its own so that any layer can import it without the package's
lazy exports pulling in the layers above."""

__version__ = "0.1.0"
