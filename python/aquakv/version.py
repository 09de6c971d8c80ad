"""The version string, from the compiled extension (what was built) else the installed distribution's.

A leaf module, so that any layer may stamp files with the version without importing the package's public face."""


def version() -> str:
    try:
        import torch  # noqa: F401  (libtorch must be loaded before the extension that links against it)

        from aquakv import _C

        return _C.__version__
    except ImportError:
        from importlib import metadata

        return metadata.version("aquakv")


def __getattr__(name: str) -> str:
    # aquakv.__version__ resolves through here, so the version (and torch) load only when asked for.
    if name == "__version__":
        return version()
    raise AttributeError(f"module 'aquakv.version' has no attribute {name!r}")
