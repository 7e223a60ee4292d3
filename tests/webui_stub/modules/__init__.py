"""Stand-in for the WebUI's `modules` package (v1.10.1 API: same names, signatures and return shapes)."""
