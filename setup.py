"""Only what pyproject.toml cannot say: the compiled keyword scan and CPU engine head.

Both extensions are optional. Where no C compiler is found the install still succeeds: the
keyword tier runs its reference regexes and the CPU engine its numpy head instead, with the
same results, only slower (the worker's log says which ones are in use: `keyword_scan` on the
`route_agent_started` line, `cpu_head` on `engine_loaded`).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "router_worker.classify._keyword_scan",
            ["router_worker/classify/_keyword_scan.c"],
            optional=True,
        ),
        Extension(
            "router_worker.classify._cpu_head",
            ["router_worker/classify/_cpu_head.c"],
            optional=True,
        ),
    ]
)
