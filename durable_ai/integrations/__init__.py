"""Integrations with the frameworks people already use: install each with its extra (``durable-ai[starlette]``)."""
