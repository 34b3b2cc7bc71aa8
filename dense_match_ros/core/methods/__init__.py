"""Matching method implementations, each registered by name in core.registry."""
