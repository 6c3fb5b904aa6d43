"""Plugins: the Plugin protocol, the entry-point loader and built-in plugins."""
