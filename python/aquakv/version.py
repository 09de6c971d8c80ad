"""The version string: the installed distribution's, read from its metadata (no torch, so `aquakv --version` answers
at once); from the compiled extension only when aquakv runs uninstalled from a source tree.

A leaf module, so that any layer may stamp files with the version without importing the package's public face."""


def version() -> str:
    from importlib import metadata

    try:
        return metadata.version("aquakv")
    except metadata.PackageNotFoundError:
        import torch  # noqa: F401  (libtorch must be loaded before the extension that links against it)

        from aquakv import _C

        return _C.__version__


def __getattr__(name: str) -> str:
    # aquakv.__version__ resolves through here, so the version loads only when asked for.
    if name == "__version__":
        return version()
    raise AttributeError(f"module 'aquakv.version' has no attribute {name!r}")
