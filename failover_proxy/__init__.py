"""failover-proxy: a multi-cloud failover reverse proxy and traffic router.

The hot modules are compiled with mypyc when the package is built (see setup.py). In a source
checkout a compiled module older than its source would silently run the old code, so that is
refused here, with the command that rebuilds it.
"""

from pathlib import Path

__version__ = "0.1.0"


def _refuse_stale_builds() -> None:
    package = Path(__file__).resolve().parent
    if not (package.parent / "setup.py").exists():
        return  # an installed package: sources and builds come together
    for built in package.glob("**/*.so"):
        stem = built.name.split(".", 1)[0]
        sources = [built.parent / (stem + ".py"), built.parent / (stem + ".c")]
        source = next((path for path in sources if path.exists()), None)
        if source is not None and source.stat().st_mtime > built.stat().st_mtime:
            raise ImportError(
                f"{built.name} is older than {source.name}: rebuild with `make test` or "
                "`pip install -e .` (or FAILOVER_PROXY_PURE=1 pip install -e . for plain Python)"
            )


_refuse_stale_builds()
