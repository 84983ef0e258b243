"""The run executor: turns a queued run into steps, messages and events."""
