"""The `adapterhub` command line: wires the core, the registry and the server together.

It owns no logic: each command parses options, calls one function of the other packages and
prints the result. User errors (`AdapterhubError`) become one line on stderr and exit code 1.
"""
