"""Examples built on the library's public API (the library itself never imports them)."""
