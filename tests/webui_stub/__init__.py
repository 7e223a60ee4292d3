"""A stand-in for the AUTOMATIC1111 WebUI v1.10.1 host, for tests: its `modules` package, a tiny live model,
an extension loader and a pytest fixture. Written from reading the host's source; none of its code is copied."""
