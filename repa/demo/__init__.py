"""The CPU demo: `repa demo` (see repa/demo/pipeline.py)."""
