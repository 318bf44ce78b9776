"""Only what pyproject.toml cannot say: the keyword tier's compiled scan.

The extension is optional. Where no C compiler is found the install still succeeds and the
keyword tier runs its reference regexes instead, with the same results, only slower (the
worker's `route_agent_started` log line says which one is in use: `keyword_scan`).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "router_worker.classify._keyword_scan",
            ["router_worker/classify/_keyword_scan.c"],
            optional=True,
        )
    ]
)
