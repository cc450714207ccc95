"""Built-in backends. Others (``durable-ai-nats``, ``durable-ai-ably``) register through entry points."""
