"""Device-agnostic interfaces and MoE math. Never imports device packages."""
