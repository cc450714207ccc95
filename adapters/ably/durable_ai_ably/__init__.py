"""The Ably backend for durable-ai: durable AI sessions on Ably channels (work in progress).

`durable_ai_ably.testing.AblyEmulator` emulates the part of Ably's realtime and REST protocols that ably-python 3.x
uses, so applications can be tested offline.
"""
