"""Places where untrusted things run: Python code (`python_exec`), MySQL servers (`mysql`).

Import-light on purpose: `bootstrap.py` and `evalplus_harness.py` run inside sandboxes as
plain scripts, and importing this package must not pull in torch or transformers.
"""
