"""Build hook: compile the hot path with mypyc (typed Python → C), about 2x less CPU per request.

Also builds three small C extensions: dataplane/_direct.c, direct socket writes (see
dataplane/writepath.py); dataplane/_reads.c, batched socket reads (dataplane/readpath.py); and
dataplane/_fields.c, where a head ends and which of its fields the proxy reads (headers.py).

The C extensions use Linux system calls and are built on Linux only; elsewhere reads and
writes go through the transports. The same modules run unchanged as plain Python: set
FAILOVER_PROXY_PURE=1 to skip compiling
(for example where no C compiler is available; reads and writes then go through the
transports); that also removes compiled copies left in a source checkout, so they cannot shadow
edited sources. Everything else is in pyproject.toml.
"""

import os
import sys
from pathlib import Path

from setuptools import Extension, setup

HERE = Path(__file__).resolve().parent
COMPILED = [
    "failover_proxy/balance.py",
    "failover_proxy/capacity.py",
    "failover_proxy/policy.py",
    "failover_proxy/topology.py",
    "failover_proxy/routing.py",
    "failover_proxy/dataplane/chunked.py",
    "failover_proxy/dataplane/headers.py",
    "failover_proxy/dataplane/request.py",
    "failover_proxy/dataplane/upstream.py",
    "failover_proxy/dataplane/forward.py",
    "failover_proxy/dataplane/downstream.py",
    "failover_proxy/dataplane/tunnel.py",
    "failover_proxy/dataplane/state.py",
]

extensions = []
if os.environ.get("FAILOVER_PROXY_PURE") == "1":
    built = ["failover_proxy/*.so", "failover_proxy/dataplane/*.so", "*__mypyc*.so"]
    for stale in [path for pattern in built for path in HERE.glob(pattern)]:
        stale.unlink()
else:
    from mypyc.build import mypycify

    extensions = mypycify(["--strict", *COMPILED], opt_level="3")
if os.environ.get("FAILOVER_PROXY_PURE") != "1" and sys.platform.startswith("linux"):
    extensions += [
        Extension("failover_proxy.dataplane._direct", ["failover_proxy/dataplane/_direct.c"]),
        Extension("failover_proxy.dataplane._reads", ["failover_proxy/dataplane/_reads.c"]),
        Extension("failover_proxy.dataplane._fields", ["failover_proxy/dataplane/_fields.c"]),
    ]

setup(ext_modules=extensions)
