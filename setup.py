"""The request path compiled to C with mypyc, when it can be; the same package interpreted when it cannot.

Everything else about the package is in pyproject.toml; this file only adds the extension modules. The request
path costs about a third less CPU compiled (bench/micro.py; docs/benchmarks.md). Compilation is skipped, and the
package installs as plain Python, when GATEWAY_MYPYC=0 is set, when mypyc cannot be imported (an install without
build isolation into a venv without mypy), or when building the extension fails (no C compiler, or no Python.h:
on Debian that is python3.11-dev); the last two say so in a warning. The .py files are installed either way, so
a traceback shows the source line, and a compiled module can be swapped for its source by deleting its .so.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

# The modules every proxied request runs through (bench/profile.py), and what they call per request. Left out:
# gateway/http1/transports.py (a zope.interface Interface: its metaclass cannot be compiled) and the modules that
# run at start-up or on the admin listener only.
COMPILED = [
    "gateway/auth/gatekeeper.py",
    "gateway/config/model.py",
    "gateway/headers.py",
    "gateway/http1/exchange.py",
    "gateway/http1/fields.py",
    "gateway/http1/framing.py",
    "gateway/http1/heads.py",
    "gateway/http1/lifecycle.py",
    "gateway/http1/response.py",
    "gateway/http1/server.py",
    "gateway/http1/serving.py",
    "gateway/http1/timers.py",
    "gateway/http1/upstream.py",
    "gateway/http1/writer.py",
    "gateway/operations/metrics.py",
    "gateway/proxy/client_end.py",
    "gateway/proxy/context.py",
    "gateway/proxy/endings.py",
    "gateway/proxy/exchange.py",
    "gateway/proxy/failures.py",
    "gateway/proxy/forwarding.py",
    "gateway/proxy/phases.py",
    "gateway/proxy/pool.py",
    "gateway/proxy/records.py",
    "gateway/proxy/streaming.py",
    "gateway/routing/__init__.py",
    "gateway/routing/decision.py",
    "gateway/routing/paths.py",
    "gateway/routing/router.py",
    "gateway/upstreams/attempts.py",
    "gateway/upstreams/balancers.py",
    "gateway/upstreams/budget.py",
    "gateway/upstreams/ejection.py",
    "gateway/upstreams/servers.py",
]


# The setuptools commands that build the extension modules (pip runs bdist_wheel, or editable_wheel for -e).
BUILDS = {"bdist_wheel", "editable_wheel", "build", "build_ext", "develop", "install"}


class OptionalBuildExt(build_ext):
    """Builds the compiled modules, or warns and leaves the package interpreted when the C build fails."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # CompileError, PlatformError, a missing compiler: each is a reason to fall back
            warnings.warn(f"gateway: building the compiled modules failed ({e}); they stay interpreted", stacklevel=2)
            # All or none: a module's shim without the shared library (gateway__mypyc) would not import.
            for ext in self.extensions:
                path = self.get_ext_fullpath(ext.name)
                if os.path.exists(path):
                    os.remove(path)


def ext_modules() -> list[object]:
    """mypyc's extension modules, or none when compilation is turned off or mypyc is missing."""
    if os.environ.get("GATEWAY_MYPYC", "1") == "0":
        # An editable install builds in place: modules compiled before would shadow their sources.
        for library in [*Path("gateway").rglob("*.so"), *Path().glob("gateway__mypyc*.so")]:
            library.unlink()
        return []
    if not BUILDS.intersection(sys.argv[1:]):
        return []  # metadata (egg_info, dist_info) or an sdist: mypyc's checks and C generation take a minute
    try:
        from mypyc.build import mypycify
    except ImportError:
        warnings.warn("gateway: mypyc is not installed; installing the package interpreted", stacklevel=2)
        return []
    return mypycify(COMPILED, opt_level="3", group_name="gateway")


setup(ext_modules=ext_modules(), cmdclass={"build_ext": OptionalBuildExt})
